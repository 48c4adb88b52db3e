"""The one settings object. Every knob is a ``LIGHTBOX_*`` environment variable.

Defaults give the embedded mode: everything under ``LIGHTBOX_DATA_DIR`` (a SQLite file, an
embedded Redis on a Unix socket, managed storage, quarantine, model bundles), so
``lightbox demo`` runs on a machine with nothing else installed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIGHTBOX_", extra="ignore")

    data_dir: Path = Field(default=Path("lightbox-data"), description="All state lives here.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default is a SQLite file in the data dir."
    )
    redis_url: str | None = Field(
        default=None, description="Redis URL; default is an embedded Redis in the data dir."
    )
    quiet_seconds: float = Field(
        default=30.0, description="A study is ready when no instance arrived for this long."
    )
    scheduler_interval: float = Field(default=1.0, description="Seconds between scheduler passes.")
    watch_rescan_seconds: float = Field(
        default=30.0, description="Full rescan of a watched folder, for files missed by events."
    )
    watch_settle_seconds: float = Field(
        default=1.0, description="A dropped file is read once it was unchanged this long."
    )
    rules_file: Path | None = Field(default=None, description="Routing rules (YAML).")
    visibility_timeout: int = Field(
        default=3600,
        description="Redis redelivers an unacknowledged job after this many seconds.",
    )
    job_max_attempts: int = Field(default=3, description="A job is dead after this many tries.")
    worker_heartbeat_seconds: float = Field(default=10.0)
    runtime: str = Field(default="auto", description="Model runtime: auto, onnxruntime.")
    onnx_threads: int = Field(default=0, description="ONNX Runtime intra-op threads (0 = cores).")
    log_level: str = Field(default="INFO")

    # -- trainer --

    # -- worker speed (batching, decode pool, TensorRT) --

    # -- PACS (SCP, STOW-RS, pull, export) --

    # -- reliability (reconciliation, retention, priorities) --

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def storage_dir(self) -> Path:
        return self.data_path / "storage"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_path / "quarantine"

    @property
    def models_dir(self) -> Path:
        return self.data_path / "models"

    @property
    def heatmaps_dir(self) -> Path:
        return self.data_path / "heatmaps"

    @property
    def redis_dir(self) -> Path:
        return self.data_path / "redis"

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'lightbox.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process from the environment."""
    return Settings()


def reload_settings() -> Settings:
    """Forget cached settings (tests and the demo change the environment)."""
    get_settings.cache_clear()
    return get_settings()
