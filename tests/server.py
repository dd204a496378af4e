"""Run `jaxserve serve` in a subprocess on a free loopback port, for tests and nothing else."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, checkpoints, api_key: str | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [
            sys.executable,
            "-m",
            "jaxserve.cli",
            "--log-level",
            "INFO",
            "serve",
            "--port",
            str(self.port),
            "--checkpoints",
            str(checkpoints),
            *args,
        ]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(os.devnull, "w") if os.environ.get("JAXSERVE_QUIET_SERVER") else None
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT if self.log else None, env=env)

    def wait_ready(self, timeout: float = 600) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        raise TimeoutError("server did not become healthy")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self, timeout: float = 60) -> int:
        """SIGINT, as a user's Ctrl-C; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
