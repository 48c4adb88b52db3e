"""REST API benchmark: the study list and the study page on a large PostgreSQL database.

Fills a fresh PostgreSQL database by COPY with N studies (default 250,000), each one CR/DX/CT
series of 2 or 3 images, one job, a finding per image and label for done studies (about
1,000,000 in all) and
the events a real run writes (dispatched, claimed, succeeded or failed); 90 % done, 3 % dead,
2 % queued, 5 % unrouted. Then it starts a real `lightbox api` process on that database and
times, over HTTP, with keep-alive, one request at a time:

- ``list``: the newest page of studies, no filter;
- ``list_filtered``: modality CR + label + minimum score, 50 per page, followed 10 pages deep
  by the ``after`` cursor (each page timed);
- ``list_state``: ``state=failed`` (3 % of studies: the rarest filter walks furthest);
- ``study``: the page of a random study (series, jobs, findings, exports and the timeline).

It reports p50/p95/max of each in milliseconds; the goal is p95 ≤ 50 ms.

    .venv/bin/python bench/api.py [--studies 250000] [--requests 200] [--keep]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import DEFAULT_OUT, emit  # noqa: E402
from db.migrate import upgrade  # noqa: E402

PG_ADMIN = os.environ.get("LIGHTBOX_TEST_POSTGRES_URL",
                          "postgresql+psycopg://postgres@127.0.0.1:5432/test")
UID_ROOT = "1.2.826.0.1.3680043.10.999"
TOKEN = "bench-token-0123456789"
GOAL_MS = 50.0
LABELS = ("pneumonia", "effusion")
MODALITIES = (("CR", "CHEST", 0.8), ("DX", "CHEST", 0.1), ("CT", "ABDOMEN", 0.1))


def _ts(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f+00")


class Copier:
    """COPY ... FROM STDIN in text format, flushed every ``chunk`` rows."""

    def __init__(self, cursor: Any, table: str, columns: str, chunk: int = 50_000) -> None:
        self.cursor, self.sql, self.chunk = cursor, f"COPY {table} ({columns}) FROM STDIN", chunk
        self.buffer, self.rows = io.StringIO(), 0

    def add(self, *values: object) -> None:
        self.buffer.write("\t".join("\\N" if v is None else str(v) for v in values) + "\n")
        self.rows += 1
        if self.rows % self.chunk == 0:
            self.flush()

    def flush(self) -> None:
        data = self.buffer.getvalue()
        if data:
            with self.cursor.copy(self.sql) as copy:
                copy.write(data)
        self.buffer = io.StringIO()


def fill(url: str, studies: int, seed: int = 0) -> dict[str, Any]:
    """Bulk-insert the synthetic history; returns row counts and the seconds it took."""
    rng = random.Random(seed)
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    engine = sa.create_engine(url)
    manifest = json.dumps({"name": "chest", "version": "bench", "labels": list(LABELS),
                           "thresholds": dict.fromkeys(LABELS, 0.5),
                           "metrics": {"auroc": 0.9}})
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        # Tables are flushed in chunks in whatever order they fill, so a finding may reach the
        # server before its job: foreign-key triggers are off for this bulk load (superuser).
        cur.execute("SET session_replication_role = replica")
        cur.execute("INSERT INTO models (id, name, version, stage, bundle_path, manifest, "
                    "registered_at) VALUES (1, 'chest', 'bench', 'production', '/nonexistent', "
                    "%s, now())", (manifest,))
        tables = {
            "studies": Copier(cur, "studies", "id, study_instance_uid, status, revision, "
                              "dispatched_revision, priority, first_received_at, "
                              "last_received_at, routed_at"),
            "series": Copier(cur, "series", "id, study_id, series_instance_uid, modality, tags"),
            "instances": Copier(cur, "instances", "id, series_id, sop_instance_uid, "
                                "sop_class_uid, transfer_syntax_uid, stored_path, size_bytes, "
                                "sha256, rows, columns, study_revision, received_at, source"),
            "jobs": Copier(cur, "jobs", "id, study_id, study_revision, model_id, state, "
                           "priority, attempts, created_at, enqueued_at, started_at, "
                           "finished_at, worker, error_code, error_detail"),
            "findings": Copier(cur, "findings", "id, job_id, study_id, series_instance_uid, "
                               "sop_instance_uid, label, score, threshold, positive, "
                               "superseded, created_at"),
            "events": Copier(cur, "events", "id, at, kind, study_instance_uid, job_id, detail"),
        }
        instance_id = finding_id = event_id = job_id = 0
        span = 30 * 86400
        for i in range(1, studies + 1):
            uid = f"{UID_ROOT}.{i}"
            received = now - timedelta(seconds=span * (1 - i / studies) + rng.random())
            roll = rng.random()
            modality, body, _ = next(m for m, p in zip(MODALITIES, (0.8, 0.9, 1.0),
                                                       strict=True) if roll < p)
            fate = rng.random()
            unrouted = modality == "CT" or fate < 0.05
            priority = "stat" if rng.random() < 0.05 else "routine"
            routed = received + timedelta(seconds=30)
            tables["studies"].add(i, uid, "unrouted" if unrouted else "dispatched", 1,
                                  0 if unrouted else 1, priority, _ts(received), _ts(received),
                                  _ts(routed))
            series_uid = f"{uid}.1"
            tables["series"].add(i, i, series_uid, modality, json.dumps(
                {"Modality": modality, "BodyPartExamined": body, "ViewPosition": "PA"}))
            sops = []
            # 2 or 3 images: about 1,000,000 findings (2 labels each) over 250,000 studies
            for k in range(3 if rng.random() < 0.47 else 2):
                instance_id += 1
                sop = f"{series_uid}.{k + 1}"
                sops.append(sop)
                tables["instances"].add(
                    instance_id, i, sop, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1",
                    f"/data/storage/{uid}/{series_uid}/{sop}.dcm", 8_000_000, "0" * 64, 2048,
                    2048, 1, _ts(received), "scp:MODALITY1" if k == 0 else "folder")
            if unrouted:
                event_id += 1
                tables["events"].add(event_id, _ts(routed), "study_unrouted", uid, None,
                                      json.dumps({"reason": "no routing rule matched",
                                                  "revision": 1}))
                continue
            job_id += 1
            event_id += 1
            tables["events"].add(event_id, _ts(routed), "study_dispatched", uid, None,
                                 json.dumps({"revision": 1, "models": ["chest"]}))
            state = "dead" if fate < 0.08 else ("queued" if fate < 0.10 else "succeeded")
            start, end = routed + timedelta(seconds=1), routed + timedelta(seconds=2)
            tables["jobs"].add(job_id, i, 1, 1, state, priority, 0 if state == "queued" else 1,
                               _ts(routed), _ts(routed), None if state == "queued" else _ts(start),
                               None if state == "queued" else _ts(end),
                               None if state == "queued" else "worker-1",
                               "decode_failed" if state == "dead" else None,
                               "pixel data cannot be decoded" if state == "dead" else None)
            if state == "queued":
                continue
            event_id += 1
            tables["events"].add(event_id, _ts(start), "job_started", None, job_id,
                                 json.dumps({"state": "running", "attempt": 1,
                                             "worker": "worker-1"}))
            event_id += 1
            tables["events"].add(event_id, _ts(end), "job_succeeded" if state == "succeeded"
                                 else "job_failed", None, job_id,
                                 json.dumps({"state": state, "attempt": 1}))
            if state != "succeeded":
                continue
            for sop in sops:
                for label in LABELS:
                    finding_id += 1
                    score = rng.random()
                    tables["findings"].add(finding_id, job_id, i, series_uid, sop, label,
                                           f"{score:.4f}", 0.5, "t" if score >= 0.5 else "f",
                                           "f", _ts(end))
        for table in tables.values():
            table.flush()
        for table in ("studies", "series", "instances", "jobs", "findings", "events"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT coalesce(max(id), 1) FROM {table}))")
        raw.commit()
        cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
        engine.dispose()
    return {"rows": {name: t.rows for name, t in tables.items()},
            "fill_seconds": round(time.perf_counter() - started, 1)}


def _counts(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = {t: conn.scalar(sa.text(f"SELECT count(*) FROM {t}"))
                for t in ("studies", "series", "instances", "jobs", "findings", "events")}
    engine.dispose()
    return {"rows": rows, "fill_seconds": None}


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * len(ordered))) - 1)]
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(p95, 2), "max_ms": round(ordered[-1], 2)}


def _timed(client: httpx.Client, path: str, params: dict[str, Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    response = client.get(path, params=params)
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed, response.json()


def measure(base: str, studies: int, requests: int, api_pid: int,
            seed: int = 1) -> dict[str, Any]:
    """Latency per case, and the API process's CPU per request (what the Python side costs,
    whatever else the shared cores are doing)."""
    import psutil

    api = psutil.Process(api_pid)
    rng = random.Random(seed)
    out: dict[str, list[float]] = {"list": [], "list_filtered": [], "list_state": [],
                                   "study": []}
    cpu: dict[str, float] = {}

    def cpu_now() -> float:
        times = api.cpu_times()
        return float(times.user + times.system)
    with httpx.Client(base_url=base, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        for _ in range(5):  # warm the pool and the caches
            _timed(client, "/api/v1/studies", {"limit": 50})
        mark = cpu_now()
        for _ in range(requests):
            out["list"].append(_timed(client, "/api/v1/studies", {"limit": 50})[0])
        cpu["list"], mark = cpu_now() - mark, cpu_now()
        filtered = {"modality": "CR", "label": "pneumonia", "min_score": 0.8, "limit": 50}
        while len(out["list_filtered"]) < requests:
            after = None
            for _ in range(10):
                ms, page = _timed(client, "/api/v1/studies",
                                  {**filtered, **({"after": after} if after else {})})
                out["list_filtered"].append(ms)
                assert len(page["items"]) == 50, "the filter matched too few studies"
                after = page["next"]
        cpu["list_filtered"], mark = cpu_now() - mark, cpu_now()
        for _ in range(requests):
            ms, page = _timed(client, "/api/v1/studies", {"state": "failed", "limit": 50})
            assert all(s["state"] == "failed" for s in page["items"])
            out["list_state"].append(ms)
        cpu["list_state"], mark = cpu_now() - mark, cpu_now()
        for _ in range(requests):
            uid = f"{UID_ROOT}.{rng.randint(1, studies)}"
            ms, page = _timed(client, f"/api/v1/studies/{uid}", {})
            assert page["timeline"], uid
            out["study"].append(ms)
        cpu["study"] = cpu_now() - mark
    return {name: {**_percentiles(samples),
                   "api_cpu_ms_per_request": round(cpu[name] * 1000 / len(samples), 2)}
            for name, samples in out.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plot(result: dict[str, Any]):  # type: ignore[no-untyped-def]
    def draw(figure) -> None:  # type: ignore[no-untyped-def]
        ax = figure.add_subplot(1, 1, 1)
        names = list(result["latency"])
        p50 = [result["latency"][n]["p50_ms"] for n in names]
        p95 = [result["latency"][n]["p95_ms"] for n in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p95, width=0.4, label="p95")
        ax.axhline(GOAL_MS, color="red", linestyle="--", label=f"goal p95 ≤ {GOAL_MS:.0f} ms")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("ms per request (HTTP, one at a time)")
        rows = result["rows"]
        ax.set_title(f"lightbox api on PostgreSQL: {rows['studies']:,} studies, "
                     f"{rows['findings']:,} findings")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=250_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    parser.add_argument("--reuse", metavar="DATABASE",
                        help="Measure a database kept by an earlier --keep run (no fill).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    name = args.reuse or f"lightbox_bench_api_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    if not args.reuse:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    proc = None
    try:
        upgrade(url)
        filled = fill(url, args.studies) if not args.reuse else _counts(url)
        print(f"filled in {filled['fill_seconds']} s: {filled['rows']}", file=sys.stderr)
        port = _free_port()
        with tempfile.TemporaryDirectory() as data:
            env = {**os.environ, "LIGHTBOX_DATA_DIR": data, "LIGHTBOX_DATABASE_URL": url,
                   "LIGHTBOX_API_TOKEN": TOKEN, "LIGHTBOX_API_PORT": str(port),
                   "LIGHTBOX_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
            log = open(Path(data) / "api.log", "ab")  # noqa: SIM115 - the child keeps a copy
            proc = subprocess.Popen([sys.executable, "-m", "cli.main", "api"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("lightbox api did not start: "
                                     + (Path(data) / "api.log").read_text()[-2000:])
                time.sleep(0.3)
            latency = measure(base, filled["rows"]["studies"], args.requests, proc.pid)
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if not (args.keep or args.reuse):
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    result = {"database": "postgresql", "studies": filled["rows"]["studies"], **filled,
              "requests_per_case": args.requests, "goal_p95_ms": GOAL_MS, "latency": latency,
              "meets_goal": all(v["p95_ms"] <= GOAL_MS for v in latency.values())}
    summary = (f"api: {filled['rows']['studies']:,} studies / {filled['rows']['findings']:,} "
               "findings on PostgreSQL: p95 " + ", ".join(
                   f"{k} {v['p95_ms']:.1f} ms" for k, v in latency.items())
               + f" (goal ≤ {GOAL_MS:.0f} ms: {'met' if result['meets_goal'] else 'NOT met'}; "
               f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    emit("api", result, summary, args.out, plot(result))


if __name__ == "__main__":
    main()
