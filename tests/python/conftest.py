"""Shared by the client tests: one `liftoff serve` of the default model for the whole session,
with the test checkpoints under its `--model-root`."""
import os
import sys
import subprocess
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "models")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from ports import free_port  # noqa: E402




@pytest.fixture(scope="session")
def server():
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [os.environ.get("LIFTOFF_BIN", "target/release/liftoff"), "serve", "--host", "127.0.0.1",
         "--port", str(port), "--management-port", str(mport), "--max-sequence-length", "1024",
         "--model-root", FIXTURES],
        env=dict(os.environ, TAKEOFF_LOG_LEVEL="warn"), stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except Exception:
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("liftoff did not become healthy")
    yield port, mport
    proc.terminate()
    proc.wait(timeout=30)
