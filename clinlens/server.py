"""Start and stop a real MONAI Label server running the clinlens app (CLI, demo and tests)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

APP_DIR = Path(__file__).resolve().parent.parent / "monailabel_app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(studies: str, host: str = "127.0.0.1", port: int = 8000, conf: dict | None = None,
                   app_dir: str | Path = APP_DIR) -> list[str]:
    """`python -m monailabel.main start_server ...` with the interpreter running clinlens."""
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir),
           "--studies", str(studies), "--host", host, "--port", str(port)]
    for k, v in (conf or {}).items():
        cmd += ["--conf", k, str(v)]
    return cmd


def server_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")
    env.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
    env.setdefault("MONAI_LABEL_SESSIONS", "false")
    # idle OpenMP threads sleep instead of spinning: the server, its training subprocess and any
    # other job share few cores, and spinning threads slow each other down several times over
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra or {})
    return env


def wait_until_ready(proc: subprocess.Popen, ready, timeout: float, what: str, log_path=None,
                     interval: float = 0.5) -> None:
    """Poll `ready()` (HTTP errors count as not ready) until true; RuntimeError if `proc` exits first,
    TimeoutError after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; log: {log_path}")
        try:
            if ready():
                return
        except requests.RequestException:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not answer within {timeout}s; log: {log_path}")


class Server:
    """A server subprocess; `with Server(studies) as s: requests.get(s.url + "/info/")`."""

    def __init__(self, studies, port: int | None = None, conf: dict | None = None, log_path=None,
                 env: dict | None = None, timeout: float = 180):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = server_command(studies, port=self.port, conf=conf)
        self.env = server_env(env)
        self.log_path = Path(log_path) if log_path else None
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_until_ready(self.proc, lambda: requests.get(self.url + "/info/", timeout=5).status_code == 200,
                             self.timeout, "server (/info/)", self.log_path)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            import signal

            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---- client side: requests shaped exactly as the stock viewers send them (demo, tests, benchmarks)
SLICER_BOUNDARY = "----------lImIt_of_THE_fIle_eW_$"


def wait_task(url: str, kind: str = "train", timeout: float = 600, poll: float = 1.0) -> dict:
    """Poll MONAI Label's background task status (`GET <url>/<kind>/`: train, scoring, batch/infer)
    until it is DONE, ERROR or STOPPED; TimeoutError otherwise."""
    deadline, st = time.time() + timeout, {}
    while time.time() < deadline:
        st = requests.get(f"{url}/{kind}/").json() or {}
        if st.get("status") in ("DONE", "ERROR", "STOPPED"):
            return st
        time.sleep(poll)
    raise TimeoutError(f"{kind} task not finished after {timeout:.0f}s: {st}")


def slicer_post(url: str, params: dict) -> requests.Response:
    """Multipart exactly as Slicer's MONAILabel client sends it: its boundary and a `params` field."""
    import json

    body = (f"--{SLICER_BOUNDARY}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n"
            f"{json.dumps(params)}\r\n--{SLICER_BOUNDARY}--\r\n").encode()
    return requests.post(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={SLICER_BOUNDARY}"})


def read_multipart(response: requests.Response) -> dict:
    """Parts of a multipart answer (what Slicer parses) by field name: `params` and `image`."""
    from requests_toolbelt import MultipartDecoder

    parts = {}
    for part in MultipartDecoder(response.content, response.headers["content-type"]).parts:
        name = part.headers[b"Content-Disposition"].split(b'name="')[1].split(b'"')[0].decode()
        parts[name] = part
    return parts
