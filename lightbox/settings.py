"""The one settings object. Every knob is a ``LIGHTBOX_*`` environment variable.

Defaults give the embedded mode: everything under ``LIGHTBOX_DATA_DIR`` (a SQLite file, an
embedded Redis on a Unix socket, managed storage, quarantine, model bundles), so
``lightbox demo`` runs on a machine with nothing else installed.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from lightbox.errors import ConfigurationError

ENV_PREFIX = "LIGHTBOX_"
# Variables the test suite reads itself (external servers' URLs); never settings.
TEST_PREFIX = "LIGHTBOX_TEST_"
RUNTIMES = ("auto", "onnxruntime", "tensorrt")
DECODE_DEVICES = ("auto", "cpu")
TRT_PRECISIONS = ("fp32", "fp16")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
DESTINATION_KEYS = {"dicom": ("name", "ae_title", "host", "port"), "stow": ("name", "url")}
# Settings whose values are secrets (masked by `lightbox config show`).
SECRET_FIELDS = ("api_token",)

# "Not set" for the roots that default under the data dir (no environment value holds a NUL).
_UNSET = Path("\0unset")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIGHTBOX_", extra="ignore")

    data_dir: Path = Field(default=Path("lightbox-data"), description="All state lives here.")
    # Paths in the database are relative to these two roots, which every node sets for itself:
    # a shared volume may be mounted at a different path on each node.
    storage_dir: Path = Field(
        default=_UNSET,  # <data dir>/storage, filled in by _roots
        description="Shared storage root: instances, spool, heatmaps, outputs; default "
        "<data dir>/storage. In a cluster: a ReadWriteMany volume mounted on every node.")
    models_dir: Path = Field(
        default=_UNSET,  # <data dir>/models, filled in by _roots
        description="Model bundles root; default <data dir>/models.")
    cluster: bool = Field(
        default=False, description="Cluster mode: commands check the schema revision at start "
        "instead of migrating (run `lightbox db upgrade` as a step of its own).")
    metrics_port: int = Field(
        default=0, description="Port of this process's /metrics, /healthz and /readyz "
        "(0 = off; `lightbox api` serves them beside the API).")
    metrics_bind_address: str = Field(
        default="0.0.0.0", description="Address the metrics and probe server listens on.")
    shutdown_grace_seconds: float = Field(
        default=120.0, description="On SIGTERM, in-flight work gets this long to finish "
        "(the pod's terminationGracePeriodSeconds); what is left is requeued.")
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
    log_level: str = Field(default="INFO", description="Logging level: " + ", ".join(LOG_LEVELS))
    umask: str = Field(
        default="077", description="File mode mask of every lightbox command (octal): 077 = "
        "files 0600, folders 0700 (they hold patient data).")
    worker_db_timeout_seconds: float = Field(
        default=30.0, gt=0, description="PostgreSQL lock, statement and idle-in-transaction "
        "timeout of worker sessions: a worker frozen inside a transaction loses its locks "
        "after this long (keep it under the heartbeat timeout).")

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
    decode_device: str = Field(
        default="auto", description="Where compressed images (JPEG 2000, HTJ2K, JPEG) are "
        "decoded and prepared: auto = on the GPU where nvImageCodec and CuPy import and a CUDA "
        "device answers (the gpu-decode extra), else the decode processes; cpu = always the "
        "decode processes.")
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
    scp_max_associate_kb: int = Field(
        default=256,
        description="Largest A-ASSOCIATE-RQ PDU the SCP reads (KiB); a longer one is aborted "
        "(A-ABORT) after its 6-byte header, before any AE title check.",
    )
    scp_max_pdu_kb: int = Field(
        default=16384,
        description="Maximum PDU length the SCP announces and enforces (KiB) for P-DATA; a "
        "longer PDU is aborted after its header.",
    )
    scp_association_timeout: float = Field(
        default=10.0,
        description="Seconds a new connection may take to finish the TLS handshake and to send "
        "its A-ASSOCIATE-RQ (and to close after an abort); then it is closed.",
    )
    scp_max_connections_per_host: int = Field(
        default=8,
        description="Open connections (associated or not) per peer address; more are closed "
        "at once with an A-ABORT, so one host cannot take every association slot.",
    )
    max_inflated_mb: float = Field(
        default=512.0,
        description="Largest data set a Deflated transfer syntax file may inflate to (MiB), on "
        "every channel and in the worker; larger is refused (0xC210, quarantined).",
    )
    stow_max_body_mb: float = Field(
        default=1024.0,
        description="Largest STOW-RS request body (MiB); larger is refused with HTTP 413.",
    )
    stow_max_parts: int = Field(
        default=1000,
        description="Most parts in one STOW-RS request; more is refused with HTTP 413 (no part "
        "of it is stored or quarantined).",
    )
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
    api_tokens: list[dict[str, Any]] = Field(
        default_factory=list,
        description='Named API tokens with a role, JSON: [{"name": "ris", "token": "...", '
        '"role": "read"}, {"name": "alice", "token": "...", "role": "operator"}]; read: '
        "queries; operator: also retry, cancel, promote, STOW-RS. LIGHTBOX_API_TOKEN is one "
        "more operator token.",
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

    @model_validator(mode="after")
    def _roots(self) -> Settings:
        """Absolute roots, defaulting under the data dir (the embedded mode's layout)."""
        if self.storage_dir == _UNSET:
            self.storage_dir = self.data_path / "storage"
        if self.models_dir == _UNSET:
            self.models_dir = self.data_path / "models"
        self.storage_dir = self.storage_dir.expanduser().resolve()
        self.models_dir = self.models_dir.expanduser().resolve()
        return self
    @field_validator("runtime")
    @classmethod
    def _runtime(cls, value: str) -> str:
        if value not in RUNTIMES:
            raise ValueError(f"{value!r} is not one of {', '.join(RUNTIMES)}")
        return value

    @field_validator("decode_device")
    @classmethod
    def _decode_device(cls, value: str) -> str:
        if value not in DECODE_DEVICES:
            raise ValueError(f"{value!r} is not one of {', '.join(DECODE_DEVICES)}")
        return value

    @field_validator("trt_precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in TRT_PRECISIONS:
            raise ValueError(f"{value!r} is not one of {', '.join(TRT_PRECISIONS)}")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
        return value

    @field_validator("umask")
    @classmethod
    def _umask(cls, value: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", value):
            raise ValueError(f"{value!r} is not an octal mask such as 077")
        return value

    @field_validator("export_destinations")
    @classmethod
    def _destinations(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Shape only (the exporter builds the destinations): a bad entry is a configuration
        error at start, not a traceback at the first export."""
        names = set()
        for index, raw in enumerate(value):
            kind = raw.get("type", "dicom")
            if kind not in DESTINATION_KEYS:
                raise ValueError(f"entry {index}: type {kind!r} is not one of dicom, stow")
            missing = [k for k in DESTINATION_KEYS[kind] if not raw.get(k)]
            if missing:
                raise ValueError(f"entry {index} ({kind}) lacks {', '.join(missing)}")
            if kind == "dicom" and not str(raw["port"]).isdigit():
                raise ValueError(f"entry {index}: port {raw['port']!r} is not a number")
            if raw["name"] in names:
                raise ValueError(f"entry {index}: name {raw['name']!r} used twice")
            names.add(raw["name"])
        return value

    @property
    def file_umask(self) -> int:
        return int(self.umask, 8)

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def quarantine_dir(self) -> Path:
        return self.data_path / "quarantine"

    @property
    def heatmaps_dir(self) -> Path:
        # On the shared storage: the worker writes them, export (on any node) reads them.
        return self.storage_dir / ".heatmaps"

    @property
    def redis_dir(self) -> Path:
        return self.data_path / "redis"

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'lightbox.db'}"


def variable(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per ``LIGHTBOX_*`` variable that is no setting (a typo would otherwise be
    ignored and its default used without a word), naming the closest known one."""
    known = [variable(name) for name in Settings.model_fields]
    messages = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name.startswith(TEST_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        messages.append(f"{name} is not a Lightbox setting{hint}")
    return messages


def _one_line(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{variable(field)}: {message}")
    return "; ".join(parts)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, or :class:`ConfigurationError` with one line that names
    the variable and what it allows."""
    environ = os.environ if environ is None else environ
    unknown = unknown_variables(environ)
    if unknown:
        raise ConfigurationError("; ".join(unknown))
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError(_one_line(exc)) from None
    except SettingsError as exc:  # a value that is not JSON where JSON is expected
        match = re.search(r'field "(\w+)"', str(exc))
        field = variable(match.group(1)) if match else "a LIGHTBOX_ variable"
        raise ConfigurationError(f"{field}: not valid JSON") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process from the environment."""
    return load_settings()


def reload_settings() -> Settings:
    """Forget cached settings (tests and the demo change the environment)."""
    get_settings.cache_clear()
    return get_settings()
