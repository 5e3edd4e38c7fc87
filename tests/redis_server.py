"""A real redis-server on a free loopback port with its own temporary directory, for the
fleet tests and benchmarks: start, stop, kill and restart it, pause it (SIGSTOP)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from typing import TYPE_CHECKING

import pytest  # for needs(); the benchmarks that import this module have it too

if TYPE_CHECKING:
    from pathlib import Path


def needs(*tools: str) -> pytest.MarkDecorator:
    """Skip where one of *tools* is not installed, unless under CI (``$CI`` set), where
    the test runs and fails: CI installs them (``.ci/run``), a newcomer may not have."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return pytest.mark.skipif(
        bool(missing) and not in_ci,
        reason=f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)})",
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process (Debian's package); ``persist`` keeps an fsync'd AOF;
    ``tls`` serves TLS only, with a certificate from a CA of its own (``ca_file``)."""

    def __init__(
        self,
        directory: Path,
        *,
        persist: bool = False,
        password: str | None = None,
        tls: bool = False,
    ):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.exe = exe
        self.dir = directory
        self.port = free_port()
        self.persist = persist
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.tls = tls
        self.ca_file = str(directory / "ca.crt") if tls else None
        if tls:
            _make_certificates(directory)

    @property
    def url(self) -> str:
        auth = f"default:{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until it answers PING (bounded)."""
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--daemonize", "no", "--loglevel", "warning"]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            d = self.dir
            args[2] = "0"  # TLS only: no plain port
            args += ["--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(d / "server.crt")]
            args += ["--tls-key-file", str(d / "server.key")]
            args += ["--tls-ca-cert-file", str(d / "ca.crt")]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return
            time.sleep(0.01)  # polling a readiness state, with a deadline
        raise TimeoutError(f"redis-server on port {self.port} not ready within {timeout} s")

    def ping(self) -> bool:
        """Whether it answers PING now (a NOAUTH error counts: it is up)."""
        try:
            with contextlib.ExitStack() as stack:
                s = stack.enter_context(
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
                )
                if self.tls:
                    context = ssl.create_default_context(cafile=self.ca_file)
                    s = stack.enter_context(context.wrap_socket(s, server_hostname="127.0.0.1"))
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP it: connections stay open, nothing answers (a partition)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT it."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL it and reap it (no shutdown save)."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL past a bound)."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def _make_certificates(directory: Path) -> None:
    """A CA of its own and a server certificate for 127.0.0.1 it signed (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=kill_switch test CA",
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.cnf",
    )  # fmt: skip
