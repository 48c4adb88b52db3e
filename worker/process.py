"""Processing one job: claim → decode and preprocess → infer (batched with other jobs) → write.

Findings and the job's final state are written in one transaction (with every other job that
finished at the same moment, :mod:`worker.writer`). The write first deletes any findings the
same job wrote before (a redelivered message after a crash), so a job's findings exist exactly
once. Older revisions' findings for the same study and model name are marked superseded, not
deleted. Heatmaps (when the manifest names a ``cam_output``) are saved before that commit, so
a succeeded job's heatmaps are always on disk.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import numpy as np
from sqlalchemy import select

from db import jobs as job_states
from db.models import Instance, Job, Model, Series
from db.session import session_scope
from lightbox.errors import LightboxError, PixelDecodeError
from lightbox.heatmaps import save_heatmap
from lightbox.manifest import Manifest
from lightbox.settings import Settings
from worker.batcher import ImageResult
from worker.model_cache import ModelCache
from worker.pipeline import ImageRef, InlineRunner, JobRunner
from worker.volume_job import run_volume_job, series_paths
from worker.writer import JobResult, write_results

__all__ = ["ImageRef", "run_job", "worker_name", "write_results"]

log = logging.getLogger(__name__)
NON_RETRYABLE = (PixelDecodeError,)


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


def _scores(manifest: Manifest, result: ImageResult) -> np.ndarray:
    scores = result.outputs.get(manifest.output_name)
    if scores is None:
        scores = next(iter(result.outputs.values()))
    return np.asarray(scores, dtype=np.float32).reshape(-1)


def _finding_rows(job: Job, manifest: Manifest, images: list[ImageRef],
                  results: list[ImageResult]) -> list[dict[str, Any]]:
    rows = []
    for image, result in zip(images, results, strict=True):
        for label, score in zip(manifest.labels, _scores(manifest, result), strict=True):
            threshold = manifest.threshold_for(label)
            rows.append({
                "job_id": job.id, "study_id": job.study_id,
                "series_instance_uid": image.series_instance_uid,
                "sop_instance_uid": image.sop_instance_uid, "label": label,
                "score": float(score), "threshold": threshold,
                "positive": bool(score >= threshold), "superseded": False,
            })
    return rows


def _save_heatmaps(settings: Settings, job_id: int, manifest: Manifest,
                   images: list[ImageRef], results: list[ImageResult]) -> int:
    if not manifest.cam_output:
        return 0
    saved = 0
    for image, result in zip(images, results, strict=True):
        cam = result.outputs.get(manifest.cam_output)
        if cam is not None:
            save_heatmap(settings, job_id, image.sop_instance_uid, cam)
            saved += 1
    return saved


def _batches(results: list[ImageResult]) -> list[dict[str, Any]]:
    seen: dict[int, dict[str, Any]] = {}
    for result in results:
        info = result.batch
        entry = seen.setdefault(info.batch_id, {"id": info.batch_id, "size": info.size,
                                                "jobs": list(info.job_ids), "images": 0})
        entry["images"] += 1
    return list(seen.values())


def run_job(settings: Settings, runner: JobRunner | ModelCache, job_id: int) -> str:
    """Run one job to a recorded outcome. Returns the job's state.

    ``runner`` is the worker's :class:`~worker.pipeline.WorkerPipeline` (batched across the
    jobs in flight) or, for one-off use, a bare :class:`ModelCache` (run inline)."""
    if isinstance(runner, ModelCache):
        inline = InlineRunner(settings, runner)
        try:
            return run_job(settings, inline, job_id)
        finally:
            inline.close()
    with session_scope(settings.sqlalchemy_url) as session:
        job = job_states.claim(session, job_id, worker_name())
        if job is None:
            current = session.get(Job, job_id)
            log.info("job %s not claimable (%s); message dropped", job_id,
                     current.state.value if current else "missing")
            return current.state.value if current else "missing"
        model_row = session.get(Model, job.model_id)
        assert model_row is not None
        images = _study_images(session, job)
        bundle_path = model_row.bundle_path
        volume_series = (series_paths(session, job)
                         if (model_row.manifest or {}).get("volume") else None)
    runner.heartbeats.add(job_id)
    try:
        model = runner.cache.get(job.model_id, bundle_path)
        if volume_series is not None and model.manifest.volume is not None:
            run_volume_job(settings, runner, model, job, *volume_series)
            return "succeeded"
        results = runner.infer_images(model, job_id, images) if images else []
        rows = _finding_rows(job, model.manifest, images, results)
        heatmaps = _save_heatmaps(settings, job_id, model.manifest, images, results)
        runner.commit(JobResult(job_id, rows, _batches(results)))
        log.info("job %s succeeded: %d image(s), %d finding(s), %d heatmap(s)", job_id,
                 len(images), len(rows), heatmaps)
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
        runner.heartbeats.discard(job_id)
