"""The one settings object. Every knob is a ``LIGHTBOX_*`` environment variable.

Defaults give the embedded mode: everything under ``LIGHTBOX_DATA_DIR`` (a SQLite file, an
embedded Redis on a Unix socket, managed storage, quarantine, model bundles), so
``lightbox demo`` runs on a machine with nothing else installed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

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
    runtime: str = Field(default="auto", description="Model runtime: auto, onnxruntime, tensorrt.")
    onnx_threads: int = Field(
        default=0, description="ONNX Runtime intra-op threads per run (0 = cores ÷ parallel "
        "runs).")
    onnx_parallel_runs: int = Field(
        default=0, description="ONNX Runtime batches run at once per model, one batcher "
        "thread each, sharing one session (0 = cores ÷ threads; both 0: one single-threaded "
        "run per core).")
    log_level: str = Field(default="INFO")

    # -- trainer --
    train_cache: Path | None = Field(
        default=None, description="Prepared training images (.npy keyed by file sha256 and "
        "preprocessing spec); default <data dir>/cache/prepared. Env: LIGHTBOX_TRAIN_CACHE.")
    train_threshold_policy: str = Field(
        default="youden", description='Default threshold choice on validation for `lightbox '
        'train`: "youden" or "sensitivity:0.90".')

    # -- worker speed (batching, decode pool, TensorRT) --
    worker_concurrency: int = Field(
        default=0, description="Jobs in flight per worker process (Celery threads); their "
        "images are batched together, so this bounds the cross-study batch (0 = sized to the "
        "node, worker/layout.py).")
    batch_max_size: int = Field(
        default=0, description="Most images in one runtime call (Triton's preferred batch; "
        "0 = sized to the node).")
    batch_max_wait_ms: float = Field(
        default=-1.0, description="Longest an image waits for a fuller batch (queue delay; "
        "negative = sized to the node, 0 = no wait).")
    decode_workers: int = Field(
        default=0, description="Decode/preprocess processes per worker (0 = sized to the "
        "node).")
    decode_share_mb: int = Field(
        default=256, description="Prepared tensors kept per worker so that every model a "
        "study is routed to shares one decode per image (0 = no sharing).")
    engine_cache_dir: Path | None = Field(
        default=None, description="TensorRT engine cache; default <data dir>/engines.")
    trt_precision: str = Field(default="fp16", description="TensorRT precision: fp32, fp16.")
    trt_device: int = Field(default=0, description="CUDA device index the worker runs on.")

    # -- PACS (SCP, STOW-RS, pull, export) --
    scp_ae_title: str = Field(default="LIGHTBOX", description="AE title of `lightbox scp`.")
    scp_port: int = Field(default=11112, description="TCP port of `lightbox scp`.")
    scp_bind_address: str = Field(default="0.0.0.0", description="Address the SCP listens on.")
    scp_allowed_callers: str = Field(
        default="",
        description="Calling AE titles accepted by the SCP, comma separated, each optionally "
        "AE@host; others are rejected at association. Required: the SCP refuses to start "
        "without it; '*' accepts any caller (not for production).",
    )
    scp_max_associations: int = Field(default=16, description="Concurrent associations.")
    scp_min_free_mb: float = Field(
        default=256.0,
        description="Free space the storage must keep; below it C-STORE answers 0xA700.",
    )
    scp_tls_cert: Path | None = Field(default=None, description="PEM certificate: enables TLS.")
    scp_tls_key: Path | None = Field(default=None, description="PEM private key for TLS.")
    scp_tls_ca: Path | None = Field(
        default=None, description="PEM CA bundle: when set, TLS clients must present a cert."
    )
    api_host: str = Field(default="127.0.0.1", description="Address of `lightbox api`.")
    api_port: int = Field(default=8080, description="Port of `lightbox api` (STOW-RS).")
    api_token: str | None = Field(
        default=None, description="Bearer token for the REST/DICOMweb API (required)."
    )
    pacs_ae_title: str = Field(default="PACS", description="AE title of the PACS to pull from.")
    pacs_host: str = Field(default="127.0.0.1", description="Host of the PACS to pull from.")
    pacs_port: int = Field(default=104, description="DICOM port of the PACS to pull from.")
    export_destinations: list[dict[str, Any]] = Field(
        default_factory=list,
        description='Export destinations, JSON: [{"name": "pacs", "type": "dicom", '
        '"ae_title": "PACS", "host": "h", "port": 104}, {"name": "web", "type": "stow", '
        '"url": "https://h/dicom-web", "token": "t"}].',
    )
    export_max_attempts: int = Field(
        default=6, description="An export is dead after this many transient failures."
    )
    export_backoff_seconds: float = Field(
        default=10.0, description="First retry delay; doubles per attempt."
    )
    export_backoff_max_seconds: float = Field(default=900.0, description="Retry delay cap.")
    export_interval: float = Field(default=2.0, description="Seconds between outbox passes.")
    export_timeout: float = Field(
        default=30.0, description="Network timeout of one export attempt (seconds)."
    )


    # -- reliability (reconciliation, retention, priorities) --
    heartbeat_timeout_seconds: float = Field(
        default=120.0,
        description="A running job whose heartbeat is older than this is requeued (worker lost).",
    )
    lost_message_grace_seconds: float = Field(
        default=60.0,
        description="A queued job whose message is missing from Redis for this long is resent.",
    )
    reconcile_interval: float = Field(
        default=10.0, description="Seconds between the scheduler's Redis/heartbeat reconciliations."
    )
    stat_aging_seconds: float = Field(
        default=900.0,
        description="A routine job waiting this long is sent again at STAT priority (no starving).",
    )
    retention_days: float | None = Field(
        default=None,
        description="Stored pixels older than this are deleted (findings kept); unset keeps all.",
    )

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
