"""Throwaway PostgreSQL, Redis and server processes on free local ports.

Used by the tests and by ``python -m im_server.bench --spawn``. Everything lives
under one temporary directory and is stopped and removed by :meth:`Stack.close`.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

__all__ = ["PG_BIN", "REDIS_BIN", "Postgres", "Redis", "ServerProcess", "Stack", "free_port"]

PG_BIN = Path(os.environ.get("IM_PG_BIN", "/usr/lib/postgresql/15/bin"))
REDIS_BIN = os.environ.get("IM_REDIS_BIN", "redis-server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


class Postgres:
    """A PostgreSQL 15 cluster in ``directory`` (run as user ``postgres`` when we are root)."""

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.dir = directory
        self.data = directory / "pgdata"
        self.port = free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        # The unix socket in ``directory``: no TCP stack on every commit's round trip.
        self.dsn = f"postgresql://im@{quote(str(directory), safe='')}:{self.port}/im"

    def _chown(self, path: Path) -> None:
        if self._as:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.dir)
        if not self.data.exists():
            subprocess.run(
                [*self._as, str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "im",
                 "--auth=trust", "-E", "UTF8", "--no-sync"],
                check=True, capture_output=True,
            )
        options = [
            "-c", f"port={self.port}", "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.dir}", "-c", "max_connections=200",
            "-c", "shared_buffers=128MB", "-c", f"fsync={'on' if self.fsync else 'off'}",
        ]
        log = open(self.dir / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [*self._as, str(PG_BIN / "postgres"), "-D", str(self.data), *options],
            stdout=log, stderr=log, start_new_session=True,
        )
        _wait_port(self.port, self.proc, "postgres")
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(
                [*self._as, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", "im", "im"], capture_output=True,
            )
            if done.returncode == 0 or b"already exists" in done.stderr:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"createdb failed: {done.stderr.decode().strip()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Redis:
    """A Redis server without persistence on a free port; ``restart()`` keeps the port."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"],
            stdout=log, stderr=log, start_new_session=True,
        )
        _wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


class ServerProcess:
    """``python -m im_server`` as a child process with the given settings."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["IM_PORT"])
        self.env = env
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "im_server"], env={**os.environ, **self.env},
            stdout=log, stderr=log, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"im_server exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"im_server on port {self.port} not ready within {timeout}s")

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Stack:
    """PostgreSQL + Redis (unless URLs are given) + N server processes, all torn down by close."""

    def __init__(
        self,
        *,
        database_url: str | None = None,
        redis_url: str | None = None,
        fsync: bool = True,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="im-stack-"))
        os.chmod(self.dir, 0o755)
        self.postgres = None if database_url else Postgres(self.dir / "pg", fsync=fsync)
        self.redis = None if redis_url else Redis(self.dir / "redis")
        self.database_url = database_url or self.postgres.dsn  # type: ignore[union-attr]
        self.redis_url = redis_url or self.redis.url  # type: ignore[union-attr]
        self.admin_token = secrets.token_urlsafe(16)
        self.token_secret = secrets.token_urlsafe(32)
        self.extra_env = extra_env or {}
        self.servers: list[ServerProcess] = []

    def start(self) -> Stack:
        try:
            if self.postgres:
                self.postgres.start()
            if self.redis:
                self.redis.start()
        except BaseException:
            self.close()
            raise
        return self

    def env(self, node_id: str, port: int) -> dict[str, str]:
        return {
            "IM_DATABASE_URL": self.database_url,
            "IM_REDIS_URL": self.redis_url,
            "IM_ADMIN_TOKEN": self.admin_token,
            "IM_TOKEN_SECRET": self.token_secret,
            "IM_HOST": "127.0.0.1",
            "IM_PORT": str(port),
            "IM_NODE_ID": node_id,
            "IM_MIGRATE_ON_START": "true",
            **self.extra_env,
        }

    def add_server(self, **overrides: str) -> ServerProcess:
        n = len(self.servers) + 1
        env = {**self.env(f"node{n}", free_port()), **overrides}
        server = ServerProcess(env, self.dir / f"node{n}.log")
        self.servers.append(server)
        server.start()
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        if self.redis:
            self.redis.stop()
        if self.postgres:
            self.postgres.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
