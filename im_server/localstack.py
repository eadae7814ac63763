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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

__all__ = [
    "PG_BIN", "REDIS_BIN", "Postgres", "Redis", "RedisHA", "ServerProcess", "Stack", "TLSFiles",
    "free_port", "make_tls",
]

PG_BIN = Path(os.environ.get("IM_PG_BIN", "/usr/lib/postgresql/15/bin"))
REDIS_BIN = os.environ.get("IM_REDIS_BIN", "redis-server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path) -> TLSFiles:
    """A throwaway CA and a certificate for 127.0.0.1 and localhost (openssl, one day)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(directory / "ca.crt", directory / "host.crt", directory / "host.key")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_key, csr, ext = directory / "ca.key", directory / "host.csr", directory / "host.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", files.ca, "-days", "1",
         "-subj", "/CN=im localstack CA"],
        ["req", *ec, "-keyout", files.key, "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", files.cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    os.chmod(files.key, 0o644)  # read by the server processes only, in a private temp dir
    return files


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
    """A PostgreSQL 15 cluster in ``directory`` (run as user ``postgres`` when we are root).

    With ``standby_of`` it is a streaming standby of that (running) cluster, cloned with
    ``pg_basebackup -R``; :meth:`promote` makes it a primary.
    """

    def __init__(self, directory: Path, *, fsync: bool = True,
                 standby_of: Postgres | None = None) -> None:
        self.dir = directory
        self.data = directory / "pgdata"
        self.port = free_port()
        self.fsync = fsync
        self.standby_of = standby_of
        self.address = f"127.0.0.1:{self.port}"  # for multi-host DSNs (the dsn uses the socket)
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
        if not self.data.exists() and self.standby_of:
            subprocess.run(
                [*self._as, str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1",
                 "-p", str(self.standby_of.port), "-U", "im", "-D", str(self.data), "-R",
                 "-X", "stream", "--no-sync", "--checkpoint=fast"],
                check=True, capture_output=True,
            )
        elif not self.data.exists():
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
        while not self.standby_of:  # a standby has the primary's database already
            done = subprocess.run(
                [*self._as, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", "im", "im"], capture_output=True,
            )
            if done.returncode == 0 or b"already exists" in done.stderr:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"createdb failed: {done.stderr.decode().strip()}")
            time.sleep(0.2)

    def sql(self, query: str) -> str:
        """Run one statement with psql over TCP; its unaligned output."""
        done = subprocess.run(
            [*self._as, str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
             "im", "-d", "im", "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", query],
            check=True, capture_output=True, text=True, timeout=30,
        )
        return done.stdout.strip()

    def promote(self) -> None:
        """Make a standby a primary (returns once it takes writes)."""
        subprocess.run([*self._as, str(PG_BIN / "pg_ctl"), "promote", "-w", "-t", "30",
                        "-D", str(self.data)], check=True, capture_output=True)

    def freeze(self, frozen: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the postmaster and every backend: open sockets go silent,
        as with a host cut off by a partition. (Each backend is a session of its own,
        so not reached by a signal to the postmaster's group.)"""
        if not self.proc or self.proc.poll() is not None:
            return
        sig = signal.SIGSTOP if frozen else signal.SIGCONT
        os.kill(self.proc.pid, sig)  # first: a stopped postmaster forks no more backends
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rpartition(")")[2].split()[1])
                if ppid == self.proc.pid:
                    os.kill(int(stat.parent.name), sig)
            except (OSError, ValueError):
                continue  # gone meanwhile

    def stop(self, *, immediate: bool = False) -> None:
        """Fast shutdown; ``immediate``: no shutdown checkpoint, as a crash leaves it."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Redis:
    """A Redis server (or, with ``sentinel``, a Sentinel) without persistence on a free port;
    ``restart()`` keeps the port. With ``tls`` it listens TLS only."""

    def __init__(self, directory: Path, *, tls: TLSFiles | None = None,
                 args: Sequence[str] = (), sentinel: bool = False) -> None:
        self.dir = directory
        self.port = free_port()
        self.tls = tls
        self.args = list(args)
        self.sentinel = sentinel
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> list[str]:
        lines = ["bind 127.0.0.1", f"dir {self.dir}"]
        if self.tls:
            lines += [
                "port 0", f"tls-port {self.port}", f"tls-cert-file {self.tls.cert}",
                f"tls-key-file {self.tls.key}", f"tls-ca-cert-file {self.tls.ca}",
                "tls-auth-clients no", "tls-replication yes",
            ]
        else:
            lines.append(f"port {self.port}")
        if not self.sentinel:
            lines += ['save ""', "appendonly no"]
        return lines + self.args

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / ("sentinel.conf" if self.sentinel else "redis.conf")
        if not conf.exists():  # a Sentinel rewrites its file: a restart keeps what it learnt
            conf.write_text("\n".join(self._config()) + "\n")
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS_BIN, str(conf), *(["--sentinel"] if self.sentinel else [])],
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

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)


class RedisHA:
    """Redis over TLS as on profile ``ha``: a master, replicas and three Sentinels (master
    name ``imcloud``, quorum 2, down after 3 s). The server's ACL user is ``im``; the
    Sentinels' default user has a password of its own."""

    MASTER = "imcloud"

    def __init__(self, directory: Path, *, replicas: int = 1, sentinels: int = 3) -> None:
        self.dir = directory
        self.tls = make_tls(directory / "tls")
        self.password = secrets.token_hex(8)  # user im
        self.sentinel_password = secrets.token_hex(8)
        data_password = secrets.token_hex(8)  # default user: replication and Sentinels
        acl = [f"requirepass {data_password}", f"masterauth {data_password}",
               f"user im on >{self.password} ~* &* +@all"]
        self.servers = [Redis(directory / f"redis{i}", tls=self.tls, args=acl)
                        for i in range(1 + replicas)]
        master = self.servers[0]
        for replica in self.servers[1:]:
            replica.args.append(f"replicaof 127.0.0.1 {master.port}")
        watch = [
            f"requirepass {self.sentinel_password}",
            f"sentinel sentinel-pass {self.sentinel_password}",
            f"sentinel monitor {self.MASTER} 127.0.0.1 {master.port} 2",
            f"sentinel auth-pass {self.MASTER} {data_password}",
            f"sentinel down-after-milliseconds {self.MASTER} 3000",
            f"sentinel failover-timeout {self.MASTER} 10000",
        ]
        self.sentinels = [Redis(directory / f"sentinel{i}", tls=self.tls, args=watch,
                                sentinel=True) for i in range(sentinels)]
        # IM_REDIS_URL's host is not used with Sentinels: user, password and db are.
        self.url = f"rediss://im:{self.password}@127.0.0.1:{master.port}/0"

    def env(self) -> dict[str, str]:
        return {
            "IM_REDIS_URL": self.url,
            "IM_TLS_CA_FILE": str(self.tls.ca),
            "IM_REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
            "IM_REDIS_SENTINEL_MASTER": self.MASTER,
            "IM_REDIS_SENTINEL_PASSWORD": self.sentinel_password,
        }

    def _sentinel(self, sentinel: Redis) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=sentinel.port, ssl=True,
                           ssl_ca_certs=str(self.tls.ca), password=self.sentinel_password,
                           socket_timeout=1, socket_connect_timeout=1)

    def _sentinel_state(self, sentinel: Redis) -> dict[str, Any]:
        with self._sentinel(sentinel) as client:
            state = client.sentinel_master(self.MASTER)
            assert isinstance(state, dict)
            return state

    def switchover(self) -> None:
        """``SENTINEL FAILOVER``: a replica becomes master, the old master its replica."""
        with self._sentinel(self.sentinels[0]) as client:
            client.sentinel_failover(self.MASTER)

    def master_port(self) -> int | None:
        """The master port most Sentinels answer (None while they disagree or are down)."""
        ports = []
        for sentinel in self.sentinels:
            try:
                ports.append(int(self._sentinel_state(sentinel)["port"]))
            except Exception:  # a Sentinel that does not answer has no say
                continue
        best = max(set(ports), key=ports.count, default=None)
        return best if best is not None and ports.count(best) * 2 > len(self.sentinels) else None

    def server(self, port: int) -> Redis:
        return next(s for s in self.servers if s.port == port)

    def start(self, timeout: float = 60) -> RedisHA:
        """Start everything; return once every Sentinel knows the others and the replicas."""
        try:
            for proc in (*self.servers, *self.sentinels):
                proc.start()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    states = [self._sentinel_state(s) for s in self.sentinels]
                except Exception:
                    states = []
                if states and all(
                    st["num-other-sentinels"] == len(self.sentinels) - 1
                    and st["num-slaves"] == len(self.servers) - 1 for st in states
                ):
                    return self
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Sentinels not in agreement within {timeout}s: {states}")
                time.sleep(0.2)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in (*self.sentinels, *self.servers):
            proc.stop()  # SIGKILL: also ends a server a test froze with SIGSTOP


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
