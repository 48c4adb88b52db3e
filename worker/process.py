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
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from db import jobs as job_states
from db.models import Instance, Job, Model, ModelStage, Series, Study
from db.session import session_scope
from lightbox import metrics
from lightbox.errors import LightboxError, ModelNotFoundError, PixelDecodeError
from lightbox.heatmaps import save_heatmap
from lightbox.manifest import Manifest
from lightbox.roots import stored_file
from lightbox.settings import Settings
from lightbox.tabular import fused_input, prepare_header_file
from worker.batcher import ImageResult
from worker.findings import finding_rows, scores_of
from worker.model_cache import LoadedModel, ModelCache
from worker.pipeline import ImageRef, InlineRunner, JobRunner, same_input
from worker.volume_job import run_volume_job, series_paths
from worker.writer import JobResult, write_results

__all__ = ["ImageRef", "run_job", "worker_name", "write_results"]

log = logging.getLogger(__name__)
NON_RETRYABLE = (PixelDecodeError,)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _study_images(settings: Settings, session,  # type: ignore[no-untyped-def]
                  job: Job) -> list[ImageRef]:
    rows = session.execute(
        select(Instance.sop_instance_uid, Series.series_instance_uid, Instance.stored_path)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == job.study_id, Instance.study_revision <= job.study_revision,
               Instance.rows.is_not(None), Instance.stored_path.is_not(None))
        .order_by(Series.series_instance_uid, Instance.sop_instance_uid)
    )
    return [ImageRef(sop, series, str(stored_file(settings, stored)))
            for sop, series, stored in rows]


def _load_shadows(runner: JobRunner, job_id: int,
                  shadows: list[tuple[int, str]]) -> list[LoadedModel]:
    """The shadow versions that load; a broken shadow bundle never fails the production job."""
    loaded = []
    for model_id, bundle_path in shadows:
        try:
            loaded.append(runner.cache.get(model_id, bundle_path))
        except Exception as exc:  # noqa: BLE001 - logged, the job goes on
            log.warning("job %s: shadow model %s not loaded: %s", job_id, model_id,
                        type(exc).__name__)
    return loaded


def _infer(runner: JobRunner, job_id: int, model: LoadedModel, shadows: list[LoadedModel],
           images: list[ImageRef]) -> tuple[list[ImageResult],
                                           list[tuple[LoadedModel, list[ImageResult]]]]:
    """Production results, and each shadow version's. Shadow versions taking the same input
    share the production model's decode (each decoded image joins both batchers); others
    decode on their own. A shadow failure costs its rows only."""
    if not images:
        return [], [(s, []) for s in shadows]
    shared = [s for s in shadows if same_input(model, s)]
    everything = runner.infer_shared([model, *shared], job_id, images)
    results = everything[0]
    assert results is not None
    done = [(s, r) for s, r in zip(shared, everything[1:], strict=True) if r is not None]
    for shadow in shadows:
        if shadow in shared:
            continue
        try:
            done.append((shadow, runner.infer_images(shadow, job_id, images)))
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("job %s: shadow model %s failed: %s", job_id, shadow.model_id,
                        type(exc).__name__)
    return results, done


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


def _fusion_source(session, model_row: Model) -> tuple[int, str] | str | None:  # type: ignore[no-untyped-def]
    """A fusion head's image model as (id, bundle path), by the name and version its manifest
    names; a message when that version is not registered; None for any other model."""
    fusion = (model_row.manifest or {}).get("fuse_with")
    if not fusion:
        return None
    row = session.scalars(select(Model).where(Model.name == fusion["model"],
                                              Model.version == fusion["version"])).first()
    if row is None:
        return (f"fusion head {model_row.name} {model_row.version} needs image model "
                f"{fusion['model']} {fusion['version']}, which is not registered")
    return row.id, row.bundle_path


def _fused(runner: JobRunner, job_id: int, head: LoadedModel, image_model: LoadedModel,
           images: list[ImageRef]) -> list[ImageResult]:
    """A late-fusion head on each image: the image model first (pixels decoded once, by its
    preprocessing), then the head on the image's encoded header values (read without pixels)
    followed by the image model's scores."""
    if not images:
        return []
    seen = runner.infer_images(image_model, job_id, images)
    tensors = [fused_input(prepare_header_file(image.path, head.manifest),
                           scores_of(image_model.manifest, result.outputs), head.manifest)
               for image, result in zip(images, seen, strict=True)]
    return runner.infer_tensors(head, job_id, tensors)


def _batches(results: list[ImageResult]) -> list[dict[str, Any]]:
    seen: dict[int, dict[str, Any]] = {}
    for result in results:
        info = result.batch
        entry = seen.setdefault(info.batch_id, {"id": info.batch_id, "size": info.size,
                                                "jobs": list(info.job_ids), "images": 0})
        entry["images"] += 1
    return list(seen.values())


def _observe_success(model: str, images: int, received_at: datetime | None) -> None:
    metrics.JOBS_FINISHED.labels("succeeded").inc()
    metrics.IMAGES_PROCESSED.labels(model).inc(images)
    if received_at is not None:
        if received_at.tzinfo is None:  # SQLite gives naive UTC
            received_at = received_at.replace(tzinfo=timezone.utc)
        metrics.RECEIVED_TO_FINDING.observe(
            max(0.0, (datetime.now(timezone.utc) - received_at).total_seconds()))


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
        images = _study_images(settings, session, job)
        bundle_path, model_name = model_row.bundle_path, model_row.name
        received_at = session.scalar(select(Study.last_received_at)
                                     .where(Study.id == job.study_id))
        fusion = _fusion_source(session, model_row)
        shadows = [(r.id, r.bundle_path) for r in session.scalars(
            select(Model).where(Model.name == model_row.name, Model.shadow.is_(True),
                                Model.stage == ModelStage.staging, Model.id != model_row.id))]
        volume_series = (series_paths(settings, session, job)
                         if (model_row.manifest or {}).get("volume") else None)
    runner.heartbeats.add(job_id)
    try:
        model = runner.cache.get(job.model_id, bundle_path)
        if volume_series is not None and model.manifest.volume is not None:
            run_volume_job(settings, runner, model, job, *volume_series)
            _observe_success(model_name, sum(len(p) for p in volume_series[1:2]), received_at)
            return "succeeded"
        if isinstance(fusion, str):
            raise ModelNotFoundError(fusion)
        if fusion is not None:
            if shadows:
                log.warning("job %s: shadow versions do not run beside a fusion head", job_id)
            results = _fused(runner, job_id, model, runner.cache.get(*fusion), images)
            shadow_results: list[tuple[LoadedModel, list[ImageResult]]] = []
        elif shadows:
            results, shadow_results = _infer(runner, job_id, model,
                                             _load_shadows(runner, job_id, shadows), images)
        else:
            results = runner.infer_images(model, job_id, images) if images else []
            shadow_results = []
        refs = [(i.series_instance_uid, i.sop_instance_uid) for i in images]
        rows = finding_rows(job.id, job.study_id, model.manifest, model.model_id, refs,
                            [r.outputs for r in results])
        for shadow, outputs in shadow_results:
            rows += finding_rows(job.id, job.study_id, shadow.manifest, shadow.model_id, refs,
                                 [r.outputs for r in outputs], shadow=True)
        heatmaps = _save_heatmaps(settings, job_id, model.manifest, images, results)
        runner.commit(JobResult(job_id, rows, _batches(results)))
        _observe_success(model_name, len(images), received_at)
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
            metrics.JOBS_FINISHED.labels(job.state.value).inc()
            return job.state.value
    finally:
        runner.heartbeats.discard(job_id)
