"""`lightbox demo`: the whole path on one machine with nothing else running.

Starts the embedded Redis, a worker, the scheduler and a folder watcher as separate processes;
trains the seed model on SYNTHETIC radiographs if no production model exists; drops generated
studies, the two real chest CRs from pydicom-data (new UIDs each run) and two bad files into the
watched folder; waits until every study is decided; prints the findings; stops what it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import func, select

from cli.formatting import findings_table
from db.migrate import upgrade
from db.models import Finding, Job, Model, ModelStage, Study
from db.queries import findings, status, studies_pending
from db.session import session_scope
from lightbox.redis_server import (
    embedded_redis_running,
    embedded_socket,
    ensure_embedded_redis,
    stop_embedded_redis,
)
from lightbox.settings import Settings
from lightbox.synthetic import real_chest_crs, write_ct_study, write_study

DEMO_ENV = {
    "LIGHTBOX_QUIET_SECONDS": "2",
    "LIGHTBOX_SCHEDULER_INTERVAL": "0.5",
    "LIGHTBOX_WATCH_SETTLE_SECONDS": "0.3",
    "LIGHTBOX_WATCH_RESCAN_SECONDS": "5",
    "LIGHTBOX_WORKER_HEARTBEAT_SECONDS": "2",
}


@dataclass
class Services:
    """The processes the demo started, so it can stop exactly those."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    started_redis: bool = False

    def start(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))

    def check_alive(self) -> str | None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self, settings: Settings) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.started_redis:
            stop_embedded_redis(settings)


def _child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in DEMO_ENV.items():
        env.setdefault(key, value)
    env["LIGHTBOX_DATA_DIR"] = str(settings.data_path)
    # Worker, scheduler and watcher on one machine cannot share one probe port (an image sets
    # LIGHTBOX_METRICS_PORT for its one process): the demo's processes serve none.
    env["LIGHTBOX_METRICS_PORT"] = "0"
    return env


def _make_inputs(settings: Settings, studies: int, uids_volume: list[str] | None
                 ) -> tuple[list[str], str, str, int]:
    """Write the demo's files into a staging folder; return (routed study UIDs, real CR study,
    CT study, image count)."""
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    staging = settings.data_path / "demo-staging" / run
    rng = np.random.default_rng()
    uids, images = [], 0
    for i in range(studies):
        study = write_study(staging, rng, label=i % 2, images=1 + (i % 3 == 0), size=512,
                            patient_id=f"SYN{i:04d}")
        uids.append(study.study_instance_uid)
        images += len(study.paths)
    real_uid, real_paths = real_chest_crs(staging)
    uids.append(real_uid)
    images += len(real_paths)
    ct_uid = write_ct_study(staging)
    if uids_volume is not None:
        _write_volume_series(staging, rng, uids_volume)
    (staging / "notes.txt").write_text("not a DICOM file\n")
    good = next(staging.glob("*.dcm"))
    (staging / "truncated.dcm").write_bytes(good.read_bytes()[:2000])
    return uids, real_uid, ct_uid, images


def _write_volume_series(staging: Path, rng: np.random.Generator, uids_volume: list[str]) -> None:
    # A SYNTHETIC CT series (phantom with a lesion) whose slices arrive in shuffled order,
    # routed by the packaged series rule to the volume models.
    from lightbox.synthetic_volume import make_phantom, write_series

    phantom = make_phantom((24, 64, 64), lesions=1, seed=int(rng.integers(1 << 30)), noise=8.0,
                           lesion_radius=(3.0, 5.0))
    volume_paths = write_series(phantom.hu, staging / "ct-volume", spacing=(2.0, 2.0, 2.5),
                                shuffle_seed=int(rng.integers(1 << 30)),
                                description="SYNTHETIC phantom CT")
    uids_volume.append(str(pydicom.dcmread(volume_paths[0],
                                           stop_before_pixels=True).StudyInstanceUID))
    for index, path in enumerate(volume_paths):  # flat, shuffled names in the inbox
        path.rename(staging / f"ctvol-{index:03d}-{uuid.uuid4().hex[:6]}.dcm")
    (staging / "ct-volume").rmdir()


def _drop(staging: Path, inbox: Path) -> None:
    """Move files in by rename so the watcher never sees a half-written file."""
    inbox.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, inbox / path.name)
    staging.rmdir()


def _ensure_model(settings: Settings, console: Console) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        model = session.scalars(select(Model).where(
            Model.name == "chest", Model.stage == ModelStage.production)).first()
    if model is not None:
        console.print(f"model chest {model.version} is in production")
        return
    console.print("no production chest model: training the seed CNN on SYNTHETIC radiographs")
    from cli.commands.train import train_with_progress

    result = train_with_progress(settings, name="chest")
    console.print(f"trained chest {result.version}: validation AUROC "
                  f"{result.metrics.get('auroc', float('nan')):.3f} (synthetic data)")


def _ensure_volume_models(settings: Settings, console: Console) -> bool:
    """The two 3-D CT models (segmentation, lesion present), trained on SYNTHETIC phantoms in
    seconds when none is in production. False when they cannot be: a node without the trainer
    (no torch, e.g. the `cpu` container image) runs the demo without its CT series."""
    from lightbox.synthetic_volume import VOLUME_MODEL_NAMES

    for kind, name in VOLUME_MODEL_NAMES.items():
        with session_scope(settings.sqlalchemy_url) as session:
            model = session.scalars(select(Model).where(
                Model.name == name, Model.stage == ModelStage.production)).first()
        if model is not None:
            console.print(f"model {name} {model.version} is in production")
            continue
        try:
            from trainer.volume_train import train_volume_model
        except ImportError as exc:
            console.print(f"no production {name} model and no trainer here ({exc}; install "
                          "lightbox[train]): the demo runs without its CT series")
            return False
        console.print(f"no production {name} model: training a tiny 3-D {kind} network on "
                      "SYNTHETIC CT phantoms")

        result = train_volume_model(settings, kind, volumes=24, steps=25)  # type: ignore[arg-type]
        console.print(f"trained {name} {result.manifest.version} in {result.seconds:.0f} s "
                      f"(synthetic data): {result.manifest.metrics}")
    return True


def _volume_outputs(settings: Settings, console: Console, study_uid: str) -> int:
    """Print the CT series' findings and write its SEG and SR under outputs/ (they go to PACS
    through the export outbox when LIGHTBOX_EXPORT_DESTINATIONS is set)."""
    from cli.formatting import series_findings_table
    from db.volume_queries import series_findings
    from scheduler.export.dicom.volume_export import build_volume_objects, volume_findings
    from scheduler.export.outbox import outputs_dir

    with session_scope(settings.sqlalchemy_url) as session:
        rows = series_findings(session, study_uid=study_uid)
        console.print(series_findings_table(rows, title="Series findings (SYNTHETIC CT)"))
        written = []
        for job_id in sorted({r["job_id"] for r in rows}):
            job = session.get(Job, job_id)
            found = volume_findings(session, job) if job is not None else []
            if job is not None and found:
                written += build_volume_objects(settings, session, job, found,
                                                outputs_dir(settings, job_id))
    for kind, _uid, path in written:
        console.print(f"{kind.upper()} written: {path}")
    if not rows:
        console.print(f"[red]CT series study …{study_uid[-18:]} has no series findings[/red]")
        return 1
    return 0


def _throughput(settings: Settings, uids: list[str]) -> tuple[int, float]:
    with session_scope(settings.sqlalchemy_url) as session:
        study_ids = select(Study.id).where(Study.study_instance_uid.in_(uids))
        first, last = session.execute(
            select(func.min(Job.started_at), func.max(Job.finished_at))
            .where(Job.study_id.in_(study_ids))).one()
        images = session.scalar(select(func.count(func.distinct(Finding.sop_instance_uid)))
                                .where(Finding.study_id.in_(study_ids))) or 0
    seconds = (last - first).total_seconds() if first and last else 0.0
    return int(images), seconds


def _serve(settings: Settings, console: Console, services: Services, env: dict[str, str],
           logs: Path) -> int:
    """Keep everything running with `lightbox api` beside it, until Ctrl-C or a process dies."""
    import secrets

    import httpx

    token = env.get("LIGHTBOX_API_TOKEN") or secrets.token_urlsafe(18)
    services.start("api", ["api"], {**env, "LIGHTBOX_API_TOKEN": token}, logs)
    url = f"http://{settings.api_host}:{settings.api_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if (problem := services.check_alive()) is not None or time.monotonic() > deadline:
            console.print(f"[red]{problem or 'the API did not answer'}; see {logs}/api.log[/red]")
            return 1
        time.sleep(0.3)
    console.rule("Dashboard")
    console.print(f"open {url}/ and sign in with the token [bold]{token}[/bold]")
    console.print(f"API: curl -H 'Authorization: Bearer {token}' {url}/api/v1/studies")
    console.print("the worker, scheduler and watcher keep running; Ctrl-C stops everything")
    try:
        while (problem := services.check_alive()) is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping")
        return 0
    console.print(f"[red]{problem}; see {logs}[/red]")
    return 1


def run_demo(settings: Settings, console: Console, *, studies: int, timeout: float,
             serve: bool = False) -> int:
    settings.data_path.mkdir(parents=True, exist_ok=True)
    console.rule("Lightbox demo")
    console.print(f"data directory: {settings.data_path}")
    upgrade(settings.sqlalchemy_url)
    services = Services()
    try:
        if not settings.redis_url:
            services.started_redis = not embedded_redis_running(settings)
            ensure_embedded_redis(settings)
            console.print(f"embedded Redis on {embedded_socket(settings)}")
        _ensure_model(settings, console)
        with_volumes = _ensure_volume_models(settings, console)
        env, logs = _child_env(settings), settings.data_path / "logs"
        inbox = settings.data_path / "inbox"
        services.start("worker", ["worker"], env, logs)
        services.start("scheduler", ["scheduler"], env, logs)
        services.start("watch", ["watch", str(inbox)], env, logs)
        volume_uids: list[str] = []
        uids, real_uid, ct_uid, images = _make_inputs(settings, studies,
                                                      volume_uids if with_volumes else None)
        staging = settings.data_path / "demo-staging"
        for run_dir in list(staging.iterdir()):
            _drop(run_dir, inbox)
        console.print(f"dropped {len(uids)} chest studies ({images} images, incl. 2 real CRs), "
                      "1 one-slice CT study, "
                      + ("1 CT series of 24 slices in shuffled order " if with_volumes else "")
                      + "and 2 bad files into the watched folder")
        all_uids = [*uids, ct_uid, *volume_uids]
        started = time.monotonic()
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} studies"), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("processing", total=len(all_uids))
            while True:
                with session_scope(settings.sqlalchemy_url) as session:
                    pending = studies_pending(session, all_uids)
                progress.update(task, completed=len(all_uids) - pending)
                if pending == 0:
                    break
                if (problem := services.check_alive()) is not None:
                    console.print(f"[red]{problem}; see {logs}[/red]")
                    return 1
                if time.monotonic() - started > timeout:
                    console.print(f"[red]timed out with {pending} studies pending; see {logs}[/red]")
                    return 1
                time.sleep(0.3)
        with session_scope(settings.sqlalchemy_url) as session:
            rows = [r for uid in uids for r in findings(session, study_uid=uid)]
            report = status(session)
        console.print(findings_table(rows, title="Findings (this run)"))
        n_images, seconds = _throughput(settings, uids)
        missing = [uid for uid in uids if not any(r["study_instance_uid"] == uid for r in rows)]
        real_rows = [r for r in rows if r["study_instance_uid"] == real_uid]
        console.print(f"real chest CRs (pydicom-data): {len(real_rows)} finding(s) on study "
                      f"…{real_uid[-18:]}")
        console.print(f"CT study …{ct_uid[-18:]}: one slice, no routing rule (recorded as "
                      "unrouted)")
        volume_failed = _volume_outputs(settings, console, volume_uids[0]) if volume_uids else 0
        for q in report["quarantined"][:2]:
            console.print(f"quarantined file {q['id']} (name kept only as a digest): "
                          f"{q['reason']}")
        rate = n_images / seconds if seconds > 0 else float("nan")
        console.print(f"throughput: {n_images} images in {seconds:.2f} s of job time = "
                      f"{rate:.1f} images/s ({len(uids)} studies, end to end "
                      f"{time.monotonic() - started:.1f} s incl. {DEMO_ENV['LIGHTBOX_QUIET_SECONDS']} s quiet time)")
        console.print(f"why the CT study has no finding: lightbox explain {ct_uid}")
        if missing:
            console.print(f"[red]{len(missing)} studies have no findings[/red]")
            return 1
        if volume_failed:
            return volume_failed
        return _serve(settings, console, services, env, logs) if serve else 0
    finally:
        services.stop(settings)
        console.print("stopped worker, scheduler and watcher"
                      + (" and the embedded Redis" if services.started_redis else ""))
