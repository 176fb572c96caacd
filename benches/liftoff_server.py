"""A `liftoff serve` on loopback ports for the Python benchmarks: start it, read its metrics,
stop it."""
import os
import socket
import subprocess
import time

import httpx


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, args):
    """`binary serve` on free loopback ports with `args`; waits until healthy.
    Returns (process, port, management port)."""
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [binary, "serve", "--host", "127.0.0.1", "--port", str(port), "--management-port", str(mport), *args],
        env=dict(os.environ, TAKEOFF_LOG_LEVEL="warn"), stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"liftoff exited: {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port, mport
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("liftoff did not become healthy")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def metric_sum(mport, name):
    """The sum of a metric's samples over all label sets; NaN or infinity is an error."""
    total = 0.0
    for line in httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            value = float(line.rsplit(" ", 1)[1])
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"{name} is {value}")
            total += value
    return total
