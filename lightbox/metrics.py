"""Prometheus metrics of every long-running process, and the probe server that serves them.

The metric objects live here, in the core, so components record into them without importing
one another; each process exposes only what it recorded (a worker has no C-STORE counts).
Gauges that describe the whole system (jobs by state, queue depth per priority) are read from
the database and Redis when scraped, by the scheduler and the API
(:mod:`cli.commands.probes`, which may import the components).

Each process serves ``/metrics``, ``/healthz`` (the process is alive) and ``/readyz`` (what it
needs answers: its database and Redis; a worker's models are loaded; the SCP listens) on
``LIGHTBOX_METRICS_PORT`` (:func:`serve_probes`); ``lightbox api`` serves them beside the API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lightbox.errors import ConfigurationError
from lightbox.settings import Settings

log = logging.getLogger(__name__)

# Seconds from an instance's arrival to its finding: minutes are normal (quiet time, queue).
LATENCY_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, float("inf"))

RECEIVED_TO_FINDING = Histogram(
    "lightbox_received_to_finding_seconds",
    "From the last instance of a study received to its findings committed.",
    buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram(
    "lightbox_worker_stage_seconds", "Worker time per stage: decode (per image), inference "
    "(per batch), commit (per group of jobs).", ["stage"], buckets=STAGE_BUCKETS)
BATCH_SIZE = Histogram("lightbox_batch_size", "Images per runtime call.",
                       buckets=BATCH_BUCKETS)
IMAGES_PROCESSED = Counter("lightbox_images_processed_total",
                           "Images whose findings were committed.", ["model"])
JOBS_FINISHED = Counter("lightbox_jobs_finished_total", "Jobs a worker finished, by outcome.",
                        ["outcome"])
CSTORE = Counter("lightbox_cstore_total", "C-STORE requests answered, by status.", ["status"])
STOW = Counter("lightbox_stow_instances_total", "STOW-RS instances, by outcome.", ["outcome"])
EXPORTS = Counter("lightbox_exports_total", "Export attempts, by outcome.", ["outcome"])
QUARANTINED = Counter("lightbox_quarantined_total", "Files quarantined, by reason code.",
                      ["reason"])
WORKER_RUNTIME = Gauge("lightbox_worker_runtime_info",
                       "1 for the model runtime this worker serves on.", ["runtime"])


class GpuCollector(Collector):
    """GPU utilisation and memory through nvidia-ml-py, on nodes where it imports and a GPU
    answers; elsewhere it yields nothing."""

    def __init__(self) -> None:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._count = pynvml.nvmlDeviceGetCount()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        util = GaugeMetricFamily("lightbox_gpu_utilization_ratio", "GPU busy fraction.",
                                 labels=["gpu"])
        used = GaugeMetricFamily("lightbox_gpu_memory_used_bytes", "GPU memory in use.",
                                 labels=["gpu"])
        total = GaugeMetricFamily("lightbox_gpu_memory_total_bytes", "GPU memory.",
                                  labels=["gpu"])
        for index in range(self._count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError:
                continue
            util.add_metric([str(index)], rates.gpu / 100.0)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
        yield from (util, used, total)


_registered: set[str] = set()
_register_lock = threading.Lock()


def register_once(name: str, collector: Collector) -> None:
    """Register a custom collector once per process (tests build several apps)."""
    with _register_lock:
        if name not in _registered:
            REGISTRY.register(collector)
            _registered.add(name)


def register_gpu_collector() -> bool:
    """Register GPU metrics where nvidia-ml-py and a driver are present. Returns whether."""
    with _register_lock:
        if "gpu" in _registered:
            return True
        try:
            REGISTRY.register(GpuCollector())
        except Exception:  # noqa: BLE001 - ImportError or NVMLError: no GPU metrics here
            return False
        _registered.add("gpu")
        return True


# -- readiness checks: each returns None when fine, raises with the reason otherwise --
Check = Callable[[], None]


def redis_check(settings: Settings) -> Check:
    def check() -> None:
        from lightbox.redis_server import broker_url, redis_client

        redis_client(broker_url(settings, start=False)).ping()
    return check


_flags: dict[str, threading.Event] = {}


def ready_flag(name: str) -> threading.Event:
    """A per-process readiness flag a component sets when it can serve (a worker's models
    loaded, the SCP listening) and clears when it stops taking work."""
    with _register_lock:
        return _flags.setdefault(name, threading.Event())


def flag_check(event: threading.Event, what: str) -> Check:
    def check() -> None:
        if not event.is_set():
            raise RuntimeError(what)
    return check


def readiness(checks: dict[str, Check]) -> tuple[bool, str]:
    """Run every check; the answer names each one that failed (reason class only: no data)."""
    failed = []
    for name, check in checks.items():
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - a failing check is the answer, not a crash
            failed.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
    return (not failed, "ready\n" if not failed else "not ready\n" + "\n".join(failed) + "\n")


class _ProbeHandler(BaseHTTPRequestHandler):
    checks: dict[str, Check] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._answer(200, b"ok\n")
        elif path == "/readyz":
            ok, text = readiness(self.checks)
            self._answer(200 if ok else 503, text.encode())
        else:
            self._answer(404, b"not found\n")

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # scraped every few seconds: not worth a log line each


def serve_probes(settings: Settings, checks: dict[str, Check]) -> ThreadingHTTPServer | None:
    """Serve /metrics, /healthz and /readyz on ``LIGHTBOX_METRICS_PORT`` from a daemon thread
    (0: off, returns None). GPU metrics are added where a GPU answers."""
    if not settings.metrics_port:
        return None
    register_gpu_collector()
    handler = type("ProbeHandler", (_ProbeHandler,), {"checks": checks})
    try:
        server = ThreadingHTTPServer((settings.metrics_bind_address, settings.metrics_port),
                                     handler)
    except OSError as exc:
        raise ConfigurationError(
            f"LIGHTBOX_METRICS_PORT={settings.metrics_port}: cannot listen on "
            f"{settings.metrics_bind_address}:{settings.metrics_port} ({exc.strerror or exc}); "
            "give each process its own port, or 0 for none") from exc
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    log.info("metrics and probes on %s:%d", settings.metrics_bind_address, settings.metrics_port)
    return server
