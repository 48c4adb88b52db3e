"""Processing one job: claim → load instances → decode and preprocess → infer → write.

Findings and the job's final state are written in one transaction. The write first deletes
any findings the same job wrote before (a redelivered message after a crash), so a job's
findings exist exactly once. Older revisions' findings for the same study and model name are
marked superseded, not deleted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, select, update

from db import jobs as job_states
from db.models import Finding, Instance, Job, Model, Series
from db.session import session_scope
from lightbox.errors import LightboxError, PixelDecodeError
from lightbox.preprocess import prepare_file
from lightbox.settings import Settings
from worker.model_cache import LoadedModel, ModelCache

log = logging.getLogger(__name__)
NON_RETRYABLE = (PixelDecodeError,)


@dataclass(frozen=True)
class ImageRef:
    sop_instance_uid: str
    series_instance_uid: str
    path: str


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _study_images(session, job: Job) -> list[ImageRef]:  # type: ignore[no-untyped-def]
    rows = session.execute(
        select(Instance.sop_instance_uid, Series.series_instance_uid, Instance.stored_path)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == job.study_id, Instance.study_revision <= job.study_revision,
               Instance.rows.is_not(None), Instance.stored_path.is_not(None))
        .order_by(Series.series_instance_uid, Instance.sop_instance_uid)
    )
    return [ImageRef(*row) for row in rows]


def _infer(model: LoadedModel, images: list[ImageRef]) -> np.ndarray:
    """Scores (N, labels) for the study's images, in one runtime call."""
    tensors = []
    for image in images:
        try:
            tensors.append(prepare_file(image.path, model.manifest))
        except PixelDecodeError as exc:
            raise PixelDecodeError(f"instance {image.sop_instance_uid}: {exc}") from exc
    batch = np.stack(tensors)
    outputs = model.runtime.infer(batch)
    scores = outputs.get(model.manifest.output_name)
    if scores is None:
        scores = next(iter(outputs.values()))
    return np.asarray(scores, dtype=np.float32).reshape(len(images), -1)


def _finding_rows(job: Job, model: LoadedModel, images: list[ImageRef],
                  scores: np.ndarray) -> list[dict[str, object]]:
    rows = []
    manifest = model.manifest
    for image, image_scores in zip(images, scores, strict=True):
        for label, score in zip(manifest.labels, image_scores, strict=True):
            threshold = manifest.threshold_for(label)
            rows.append({
                "job_id": job.id, "study_id": job.study_id,
                "series_instance_uid": image.series_instance_uid,
                "sop_instance_uid": image.sop_instance_uid, "label": label,
                "score": float(score), "threshold": threshold,
                "positive": bool(score >= threshold), "superseded": False,
            })
    return rows


def write_results(settings: Settings, job_id: int, rows: list[dict[str, object]]) -> None:
    """One transaction: replace this job's findings, supersede older revisions, succeed."""
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id, with_for_update=True)
        assert job is not None
        session.execute(delete(Finding).where(Finding.job_id == job_id))
        if rows:
            session.execute(Finding.__table__.insert(), rows)
        model_name = session.scalar(select(Model.name).where(Model.id == job.model_id))
        older = select(Job.id).join(Model, Job.model_id == Model.id).where(
            Job.study_id == job.study_id, Job.study_revision < job.study_revision,
            Model.name == model_name)
        session.execute(update(Finding).where(Finding.job_id.in_(older)).values(superseded=True))
        job_states.succeed(session, job)


def run_job(settings: Settings, cache: ModelCache, job_id: int) -> str:
    """Run one job to a recorded outcome. Returns the job's state."""
    worker = worker_name()
    with session_scope(settings.sqlalchemy_url) as session:
        job = job_states.claim(session, job_id, worker)
        if job is None:
            current = session.get(Job, job_id)
            log.info("job %s not claimable (%s); message dropped", job_id,
                     current.state.value if current else "missing")
            return current.state.value if current else "missing"
        model_row = session.get(Model, job.model_id)
        assert model_row is not None
        images = _study_images(session, job)
        bundle_path = model_row.bundle_path
    beat = _Heartbeat(settings, job_id)
    beat.start()
    try:
        model = cache.get(job.model_id, bundle_path)
        scores = _infer(model, images) if images else np.zeros((0, len(model.manifest.labels)))
        rows = _finding_rows(job, model, images, scores)
        write_results(settings, job_id, rows)
        log.info("job %s succeeded: %d image(s), %d finding(s)", job_id, len(images), len(rows))
        return "succeeded"
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job, then re-judged
        code = exc.code if isinstance(exc, LightboxError) else type(exc).__name__
        log.warning("job %s failed: %s: %s", job_id, code, exc)
        with session_scope(settings.sqlalchemy_url) as session:
            job = session.get(Job, job_id, with_for_update=True)
            assert job is not None
            job_states.fail(session, job, code=code, detail=f"{type(exc).__name__}: {exc}",
                            retryable=not isinstance(exc, NON_RETRYABLE),
                            max_attempts=settings.job_max_attempts)
            return job.state.value
    finally:
        beat.stop()


class _Heartbeat:
    """Touches the running job's heartbeat so the scheduler can tell a live job from a dead one."""

    def __init__(self, settings: Settings, job_id: int) -> None:
        self.settings, self.job_id = settings, job_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_seconds):
            try:
                with session_scope(self.settings.sqlalchemy_url) as session:
                    job_states.heartbeat(session, self.job_id)
            except Exception:  # noqa: BLE001 - a missed beat is not a failed job
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)
