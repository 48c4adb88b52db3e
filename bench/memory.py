"""Worker memory over a long run: resident memory every 1,000 studies (goal: flat within 10 %).

    .venv/bin/python -m bench.memory [--studies 3000] [--every 1000]

To make a long run feasible on a small CPU machine the studies are SMALL synthetic CRs
(one 256×256 image each, lightbox.synthetic) — what is measured is the pipeline's own memory
(Celery, batcher, writer, model cache, decode processes), not big-image buffers, which live
only for one decode. Every study goes the real way: registered, dispatched, sent through Redis,
processed by a real ``lightbox worker``. RSS is sampled for the worker process and for its
decode processes when the worker is ready (idle) and each time another ``--every`` studies
have committed; the baseline is the first sample after ``--every`` studies (warm), and the
figure is the largest deviation of a later sample from it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.progress import Progress
from sqlalchemy import func, select

from bench._common import (
    DEFAULT_OUT,
    dispatch_all,
    emit,
    installation,
    send_all,
    spawn,
    stop,
    wait_until,
)
from db.model_registry import register_bundle
from db.models import Job, JobState, WorkerNode
from db.session import session_scope
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.ingest.registration import register_file


def sample(pid: int) -> dict[str, float]:
    main = psutil.Process(pid)
    children = 0
    for child in main.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    worker = main.memory_info().rss
    return {"worker_mb": round(worker / 2**20, 1), "decode_processes_mb": round(children / 2**20, 1),
            "total_mb": round((worker + children) / 2**20, 1)}


def _succeeded(settings: Settings) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(
            Job.state == JobState.succeeded)) or 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=3000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--database-url", help="default SQLite")
    parser.add_argument("--redis-url", help="default embedded Redis")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from trainer.train import train_seed_cnn

    work = Path(tempfile.mkdtemp(prefix="lightbox-memory-"))
    samples: list[dict[str, Any]] = []
    try:
        with installation(work / "data", database_url=args.database_url,
                          redis_url=args.redis_url) as (settings, env), Progress() as progress:
            setup = progress.add_task("training model", total=1)
            trained = train_seed_cnn(Settings(data_dir=work / "model"), name="chest",
                                     images=240, epochs=1, seed=0, register=False)
            with session_scope(settings.sqlalchemy_url) as session:
                register_bundle(session, Path(trained.bundle_dir), promote=True)
            progress.advance(setup)
            rng = np.random.default_rng(0)
            task = progress.add_task("writing and registering studies", total=args.studies)
            for i in range(args.studies):
                study = write_study(work / "in" / str(i), rng, label=i % 2, images=1)
                for path in study.paths:
                    register_file(settings, path, move=True)
                progress.advance(task)
            dispatch_all(settings)
            worker = spawn(["-m", "cli.main", "worker"], env, work / "worker.log")
            try:
                def ready() -> bool:
                    with session_scope(settings.sqlalchemy_url) as session:
                        return session.scalar(select(func.count()).select_from(WorkerNode)) > 0

                wait_until(ready, 300, "the worker to be ready", 0.2, worker)
                samples.append({"studies": 0, **sample(worker.pid)})
                run = progress.add_task("processing", total=args.studies)
                started = time.perf_counter()
                send_all(settings)
                next_mark = args.every
                while next_mark <= args.studies:
                    done = wait_until(lambda m=next_mark: (c := _succeeded(settings)) >= m and c,
                                      3600, f"{next_mark} studies", 0.1, worker)
                    progress.update(run, completed=done)
                    samples.append({"studies": int(done), "seconds": round(
                        time.perf_counter() - started, 1), **sample(worker.pid)})
                    next_mark += args.every
            finally:
                stop(worker)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    warm = [s for s in samples if s["studies"] >= args.every]
    base = warm[0]["total_mb"] if warm else float("nan")
    deviation = max((abs(s["total_mb"] - base) / base for s in warm), default=0.0)
    growth = (warm[-1]["total_mb"] - base) / base if warm else 0.0
    seconds = warm[-1]["seconds"] if warm else float("nan")
    result = {"studies": args.studies, "every": args.every,
              "study": "synthetic CR, 1 image 256×256 (small, so the run is feasible here)",
              "samples": samples, "baseline_total_mb": base,
              "max_deviation_from_baseline": round(deviation, 4),
              "growth_first_to_last": round(growth, 4), "goal_max_deviation": 0.10,
              "studies_per_s": round(warm[-1]["studies"] / seconds, 1) if warm else None}

    def plot(figure: Any) -> None:
        axis = figure.subplots()
        xs = [s["studies"] for s in samples]
        for key, label in (("total_mb", "worker + decode processes"),
                           ("worker_mb", "worker process"),
                           ("decode_processes_mb", "decode processes")):
            axis.plot(xs, [s[key] for s in samples], marker="o", label=label)
        if warm:
            axis.axhspan(base * 0.9, base * 1.1, color="green", alpha=0.1,
                         label="±10 % of the first warm sample")
        axis.set_xlabel("studies processed")
        axis.set_ylabel("RSS (MiB)")
        axis.set_ylim(bottom=0)
        axis.set_title("worker memory over a long run")
        axis.legend()

    summary = (f"memory: {args.studies} studies, worker+decode RSS {base:.0f} MiB after "
               f"{args.every}, max deviation {deviation * 100:.1f} % (goal ≤ 10 %), growth "
               f"{growth * 100:+.1f} % first→last warm sample")
    emit("memory", result, summary, args.out, plot)


if __name__ == "__main__":
    main()
