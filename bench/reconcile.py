"""Reconciliation benchmark: what the scheduler's safety checks cost as the backlog grows.

For each backlog size N (queued jobs whose messages wait in Redis) it times, in one run:
- baseline: the outbox sending N new messages (``send_pending``) and an idle scheduler pass
  without reconciliation;
- reconcile, nothing lost: the heartbeat and lost-message checks, which read every waiting
  message id from Redis;
- recovery: Redis flushed (restarted empty), then the reconcile pass that finds the N lost
  jobs plus the outbox pass that sends them again.

    .venv/bin/python bench/reconcile.py [--sizes 1000 5000 20000] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import DEFAULT_OUT, emit, installation  # noqa: E402
from db.models import Job, JobState, Model, ModelStage, Study, StudyStatus  # noqa: E402
from db.session import session_scope  # noqa: E402
from lightbox.celery_app import make_celery  # noqa: E402
from lightbox.redis_server import broker_url, redis_client  # noqa: E402
from scheduler.scheduling.dispatch import PassReport, send_pending  # noqa: E402
from scheduler.scheduling.passes import reconcile, run_pass  # noqa: E402

console = Console(stderr=True)


def _fill(url: str, n: int) -> None:
    """N dispatched studies with one queued, unsent job each (bulk insert)."""
    old = datetime.now(timezone.utc) - timedelta(hours=1)
    with session_scope(url) as session:
        model = Model(name="chest", version="bench", stage=ModelStage.production,
                      bundle_path="/nonexistent", manifest={})
        session.add(model)
        session.flush()
        session.execute(Study.__table__.insert(), [
            {"study_instance_uid": f"1.2.3.{i}", "status": StudyStatus.dispatched.value,
             "revision": 1, "dispatched_revision": 1, "priority": "routine",
             "first_received_at": old, "last_received_at": old} for i in range(1, n + 1)])
        session.execute(Job.__table__.insert(), [
            {"study_id": i, "study_revision": 1, "model_id": model.id, "priority": "routine",
             "state": JobState.queued.value, "attempts": 0, "created_at": old}
            for i in range(1, n + 1)])


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(n: int, work: Path) -> dict[str, float]:
    with installation(work / f"n{n}") as (settings, _env):
        settings = settings.model_copy(update={"lost_message_grace_seconds": 0.0,
                                               "stat_aging_seconds": 1e9})
        app = make_celery(settings)
        _fill(settings.sqlalchemy_url, n)
        report = PassReport()
        send_s = _timed(lambda: send_pending(settings, app, report))
        assert report.jobs_sent == n
        idle_s = _timed(lambda: run_pass(settings, app, [], reconcile_now=False))
        check = PassReport()
        reconcile_s = _timed(lambda: reconcile(settings, check))
        assert check.jobs_lost == 0
        client = redis_client(broker_url(settings, start=False))
        client.flushdb()
        lost = PassReport()
        recover_s = _timed(lambda: (reconcile(settings, lost), send_pending(settings, app, lost)))
        assert lost.jobs_lost == n and lost.jobs_sent == n
        return {"jobs": n, "baseline_send_s": round(send_s, 4),
                "baseline_idle_pass_s": round(idle_s, 4),
                "reconcile_nothing_lost_s": round(reconcile_s, 4),
                "recover_after_redis_flush_s": round(recover_s, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lightbox-bench-reconcile-") as tmp, \
            Progress(console=console, transient=True) as progress:
        task = progress.add_task("backlog sizes", total=len(args.sizes))
        for n in args.sizes:
            rows.append(measure(n, Path(tmp)))
            progress.advance(task)
    biggest = rows[-1]

    def plot(figure) -> None:  # type: ignore[no-untyped-def]
        ax = figure.add_subplot(1, 1, 1)
        sizes = [r["jobs"] for r in rows]
        for key, label in (("baseline_send_s", "baseline: outbox sends N"),
                           ("baseline_idle_pass_s", "baseline: idle pass"),
                           ("reconcile_nothing_lost_s", "reconcile, nothing lost"),
                           ("recover_after_redis_flush_s", "recover N lost (reconcile + resend)")):
            ax.plot(sizes, [r[key] for r in rows], marker="o", label=label)
        ax.set_xlabel("queued jobs with a message in Redis")
        ax.set_ylabel("seconds")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title("Scheduler reconciliation cost (SQLite + embedded Redis)")
        ax.legend()

    summary = (f"reconcile: {biggest['jobs']} queued jobs checked against Redis in "
               f"{biggest['reconcile_nothing_lost_s']:.3f}s (outbox sending them: "
               f"{biggest['baseline_send_s']:.2f}s); all {biggest['jobs']} lost messages "
               f"found and resent in {biggest['recover_after_redis_flush_s']:.2f}s")
    emit("reconcile", {"results": rows}, summary, args.out, plot)


if __name__ == "__main__":
    main()
