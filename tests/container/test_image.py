"""The CPU container image as `docker run` users meet it, built and run with buildah (no Docker
daemon here): env-only configuration with two tensor-parallel workers inside the container, a
read-only model mount, a streamed /generate_stream, the manifest at /code/config.yaml,
HF_TOKEN, the health check, the non-root user, plain-text logs, SIGTERM leaving no process, and
the Grafana dashboard's queries against the metrics the server really exports.

Run by scripts/test.sh; skipped, with the reason printed, where buildah cannot run (not root,
not installed). LIFTOFF_BIN is the binary put into the image.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests", "fixtures", "models", "tiny-llama2-f32")
IMAGE = "liftoff-cpu:test"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "dashboards", "liftoff.json")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from ports import free_port  # noqa: E402


def why_not_buildah():
    if shutil.which("buildah") is None:
        return "buildah is not installed (apt-get install buildah debootstrap)"
    if os.geteuid() != 0:
        return "building and running images with buildah needs root here"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (it makes the Debian base image)"
    # Whether this machine lets buildah make and mount a container at all.
    probe = subprocess.run(BUILDAH + ["from", "scratch"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"buildah cannot make a container here: {probe.stderr.strip()[-300:]}"
    name = probe.stdout.strip()
    mount = subprocess.run(BUILDAH + ["mount", name], capture_output=True, text=True)
    subprocess.run(BUILDAH + ["rm", name], capture_output=True)
    if mount.returncode != 0:
        return f"buildah cannot mount a container here: {mount.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def image():
    reason = why_not_buildah()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    if os.environ.get("LIFTOFF_BIN"):
        env["LIFTOFF_RELEASE_BIN"] = os.environ["LIFTOFF_BIN"]
    start = time.time()
    out = subprocess.run([os.path.join(ROOT, "scripts", "container_build.sh"), "cpu", IMAGE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"built {IMAGE} in {time.time() - start:.0f} s: {out.stderr.strip().splitlines()[-1]}")
    return IMAGE


class Container:
    """One `buildah run` of the image's entrypoint in a fresh working container."""

    def __init__(self, image, env, mounts=(), command=("docker-entrypoint.sh",)):
        self.name = f"liftoff-test-{uuid.uuid4().hex[:8]}"
        subprocess.run(BUILDAH + ["from", "--pull-never", "--name", self.name, image], check=True,
                       capture_output=True)
        args = BUILDAH + ["run", "--isolation", "chroot", "--network", "host",
                          "-e", f"LIFTOFF_TEST_CONTAINER={self.name}"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        self.mounts = [a for host, inside in mounts for a in ("-v", f"{host}:{inside}:ro")]
        args += self.mounts
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args + [self.name, "--"] + list(command), stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def output(self):
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def run(self, env, *command):
        """Another process in the container (as `docker exec` runs one), with its mounts."""
        args = BUILDAH + ["run", "--isolation", "chroot", "--network", "host"] + self.mounts
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        return subprocess.run(args + [self.name, "--"] + list(command), capture_output=True, text=True, timeout=60)

    def close(self):
        # Killing `buildah run` leaves the container's processes running: kill them by the
        # marker in their environment.
        for pid in pids_with("", f"LIFTOFF_TEST_CONTAINER={self.name}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        subprocess.run(BUILDAH + ["rm", self.name], capture_output=True)


def wait_healthy(port, container, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert container.proc.poll() is None, container.output()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("not healthy: " + container.output()[-3000:])


def pids_with(argv0, marker):
    """Processes whose command line starts with `argv0` and whose environment holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(argv0.encode()) and marker.encode() in environ:
            found.append(int(pid))
    return found


def uid_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[1])


def alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except OSError:
        return False


def check_dashboard(metrics_text):
    """Every metric a dashboard query reads exists in the live /metrics, with the labels the
    query groups by or shows."""
    families = {}
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?", line)
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
        families.setdefault(m.group(1), set()).update(labels)
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    checked = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            names = re.findall(r"\b(liftoff_[a-z_]+)", expr)
            assert names, expr
            wanted = set(re.findall(r"by \(([^)]*)\)", expr))
            wanted = {w.strip() for group in wanted for w in group.split(",")} - {"le"}
            wanted |= set(re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")))
            for name in names:
                assert name in families, f"{panel['title']}: {name} is not exported"
                missing = wanted - families[name]
                assert not missing, f"{panel['title']}: {name} has no label(s) {missing}"
                checked += 1
    assert checked >= 15, checked


def test_env_only_tp2_stream_health_dashboard_and_sigterm(image):
    port, mport = free_port(), free_port()
    env = {"TAKEOFF_MODEL_NAME": "/mnt/model", "TAKEOFF_DEVICE": "cpu", "TAKEOFF_PORT": str(port),
           "TAKEOFF_MANAGEMENT_PORT": str(mport), "TAKEOFF_MAX_BATCH_SIZE": "4", "TAKEOFF_TENSOR_PARALLEL": "2",
           "TAKEOFF_DRAIN_TIMEOUT_SECS": "10"}
    c = Container(image, env, mounts=[(MODEL, "/mnt/model")])
    try:
        wait_healthy(port, c)
        info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=10).json()
        model = info["models"][0]
        assert model["tensor_parallel"] == 2 and model["max_batch_size"] == 4 and model["device"] == "cpu"
        workers = [w["pid"] for w in model["workers"]]
        assert len(workers) == 2 and all(alive(p) for p in workers)
        server = pids_with("liftoff", f"TAKEOFF_PORT={port}")
        server = [p for p in server if p not in workers]
        assert len(server) == 1, server
        # Not root inside the container: the server and its workers.
        assert all(uid_of(p) == 1000 for p in server + workers)
        # Streamed generation.
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/generate_stream", timeout=60,
                          json={"text": "Hello", "max_new_tokens": 6, "sampling_temperature": 0}) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data:")]
        assert len(events) >= 2, events
        # The image's HEALTHCHECK command, run inside the container.
        health = c.run({"TAKEOFF_PORT": str(port)}, "liftoff", "health")
        assert health.returncode == 0, health.stderr
        bad = c.run({"TAKEOFF_PORT": str(free_port())}, "liftoff", "health")
        assert bad.returncode != 0
        # The dashboard reads metrics that exist.
        check_dashboard(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        # SIGTERM: the server drains and stops, and its workers with it.
        os.kill(server[0], signal.SIGTERM)
        try:
            c.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            raise AssertionError("still running 40 s after SIGTERM: " + c.output()[-3000:])
        deadline = time.time() + 10
        while any(alive(p) for p in server + workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in server + workers), "a process outlived SIGTERM"
        log = c.output()
        assert "serving the inference API" in log and "shutting down" in log, log[-2000:]
        assert "\x1b[" not in log, "terminal colour codes in a log that is not a terminal"
    finally:
        c.close()


def test_manifest_mount_hf_token_and_image_config(image):
    port, mport = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "config.yaml")
        with open(manifest, "w") as f:
            f.write(f"takeoff:\n  server_config:\n    port: {port}\n    management_port: {mport}\n"
                    "  readers_config:\n    mounted:\n      model_name: /mnt/model\n      device: cpu\n"
                    "      consumer_group: mounted\n      max_batch_size: 2\n")
        os.chmod(tmp, 0o755)
        os.chmod(manifest, 0o644)
        c = Container(image, {}, mounts=[(MODEL, "/mnt/model"), (manifest, "/code/config.yaml")])
        try:
            wait_healthy(port, c)
            r = httpx.post(f"http://127.0.0.1:{port}/generate", timeout=60,
                           json={"text": "Hello", "consumer_group": "mounted", "max_new_tokens": 4})
            assert r.status_code == 200 and "text" in r.json(), r.text
            # The HEALTHCHECK finds the manifest's port by itself (no TAKEOFF_PORT here).
            health = c.run({}, "liftoff", "health")
            assert health.returncode == 0, health.stderr
            # The entrypoint's mapping, seen by the program it starts.
            env = c.run({"HF_TOKEN": "hf_test_token", "LIFTOFF_BIN": "printenv"}, "docker-entrypoint.sh",
                        "TAKEOFF_ACCESS_TOKEN", "TAKEOFF_CONFIG_FILE")
            assert env.stdout.split() == ["hf_test_token", "/code/config.yaml"], env
        finally:
            c.close()
    config = json.loads(subprocess.run(BUILDAH + ["inspect", "--type", "image", image], check=True,
                                       capture_output=True, text=True).stdout)["Docker"]["config"]
    assert config["User"] == "liftoff"
    assert config["Healthcheck"]["Test"] == ["CMD", "liftoff", "health"]
    assert config["Entrypoint"] == ["docker-entrypoint.sh"]
