"""A volume model's job: one series → one volume → patches through the shared batcher → stitched
probabilities → series-level findings (and a lesion mask for the DICOM SEG).

    headers (this thread) ─ plan: order along the normal, geometry checks (lightbox.volume)
    slices ─ decoded in the decode pool, file by file, in parallel, into one float32 volume
    model grid ─ SimpleITK resampling + window (lightbox.volume_input), source volume freed
    patches ─ into the model's Batcher with every other job's patches/images (one runtime call
              for several series), a bounded number in flight; outputs stitched with Gaussian
              weights (Stitcher) as they come back
    mask ─ probabilities → uint8 on the source grid (SimpleITK, linear then threshold)
    measures ─ connected lesions (SimpleITK): count, mL, largest (Feret) diameter, centroid LPS
    write ─ series_findings + job success in one transaction; mask saved first

Memory for a 512 × 512 × 600 CT: the float32 volume (600 MB) until it is resampled, then the
model-grid volume and the stitcher's two arrays (model spacing, so smaller than the source),
then a uint8 mask on the source grid (150 MB). At most ``2 × batch`` patches are in flight.
No torch here: worker nodes carry none.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from sqlalchemy import delete, insert, select, update

from db import jobs as job_states
from db.models import Instance, Job, Model, Series
from db.session import session_scope
from db.volume_tables import JobSeries, SeriesFinding
from lightbox.errors import PixelDecodeError, VolumeGeometryError
from lightbox.manifest import Manifest, VolumeSpec
from lightbox.roots import stored_file, to_storage
from lightbox.settings import Settings
from lightbox.volume import (
    SliceRef,
    Volume,
    VolumePlan,
    decode_file_slices,
    decode_groups,
    plan_files,
)
from lightbox.volume_input import Stitcher, crop_or_pad, iter_patches, model_grid

log = logging.getLogger(__name__)


@dataclass
class Lesions:
    count: int
    volume_ml: float
    largest_diameter_mm: float | None
    centroid: tuple[float, float, float] | None


def masks_dir(settings: Settings) -> Path:
    # On the shared storage, beside the heatmaps: the export (on any node) reads them.
    return settings.storage_dir / ".masks"


def mask_path(settings: Settings, job_id: int) -> Path:
    """Where a job's lesion mask lives (uint8 label map on the source series grid, plan order,
    with the source instance UIDs and frames): read by the SEG writer."""
    return masks_dir(settings) / f"job-{job_id}.npz"


def series_paths(settings: Settings, session: Any, job: Job) -> tuple[str, list[str]]:
    """The job's series (chosen by routing, else the study's series with most instances) and
    its stored files."""
    chosen = session.get(JobSeries, job.id)
    if chosen is not None:
        series_uid = chosen.series_instance_uid
    else:
        rows = session.execute(
            select(Series.series_instance_uid, Instance.id).join(
                Instance, Instance.series_id == Series.id).where(Series.study_id == job.study_id))
        counts: dict[str, int] = {}
        for uid, _ in rows:
            counts[uid] = counts.get(uid, 0) + 1
        if not counts:
            raise VolumeGeometryError("the study has no series with pixels")
        series_uid = max(counts, key=lambda u: (counts[u], u))
    paths = list(session.scalars(
        select(Instance.stored_path).join(Series, Instance.series_id == Series.id).where(
            Series.series_instance_uid == series_uid,
            Instance.study_revision <= job.study_revision,
            Instance.stored_path.is_not(None), Instance.rows.is_not(None))))
    return series_uid, [str(stored_file(settings, p)) for p in paths]


def decode_volume(plan: VolumePlan, decoder: Any, in_flight: int = 8) -> Volume:
    """Decode the plan's files in the decode pool (one task per file, or per run of
    :data:`~lightbox.volume.FRAMES_PER_TASK` frames of a multi-frame file; ``in_flight`` at a
    time, in parallel), each result copied into one float32 array as it arrives and then dropped, so
    decoded slices never pile up beside the volume; a corrupt slice fails the job naming its
    instance."""
    array = np.empty(plan.shape, dtype=np.float32)
    pending: deque[tuple[list[int], Future[list[np.ndarray]]]] = deque()

    def settle() -> None:
        indices, future = pending.popleft()
        for index, values in zip(indices, future.result(), strict=True):
            array[index] = values

    try:
        for indices in decode_groups(plan):
            refs = [plan.slices[i] for i in indices]
            pending.append((indices, decoder.submit_call(decode_file_slices, refs)))
            while len(pending) >= in_flight:
                settle()
        while pending:
            settle()
    except BaseException:
        for _, future in pending:
            future.cancel()
        raise
    return Volume(array=array, origin=plan.origin, spacing=plan.spacing,
                  direction=plan.direction, sources=plan.slices)


def infer_patches(runner: Any, model: Any, job_id: int, grid: np.ndarray, spec: VolumeSpec,
                  output: str) -> np.ndarray:
    """Sliding window over ``grid`` (z, y, x) through the model's shared batcher; returns the
    stitched first channel of ``output``."""
    stitcher: Stitcher | None = None
    batcher = runner.batcher_for(model) if hasattr(runner, "batcher_for") else None
    limit = 2 * max(1, int(getattr(batcher, "max_batch", 8) or 8))
    pending: deque[tuple[tuple[int, int, int], Any]] = deque()

    def settle(start: tuple[int, int, int], result: Any) -> None:
        nonlocal stitcher
        values = np.asarray(result.outputs.get(output, next(iter(result.outputs.values()))))
        values = values.reshape((-1, *spec.roi_size))
        if stitcher is None:
            stitcher = Stitcher(grid.shape, spec.roi_size, values.shape[0], spec.blend,
                                spec.sigma_scale)
        stitcher.add(start, values)

    if batcher is None:  # InlineRunner: one runtime call per handful of patches
        chunk: list[tuple[tuple[int, int, int], np.ndarray]] = []
        for start, patch in iter_patches(grid, spec.roi_size, spec.overlap):
            chunk.append((start, patch[np.newaxis]))
            if len(chunk) == 8:
                _run_chunk(model, chunk, settle)
                chunk = []
        if chunk:
            _run_chunk(model, chunk, settle)
    else:
        for start, patch in iter_patches(grid, spec.roi_size, spec.overlap):
            pending.append((start, batcher.submit(patch[np.newaxis], job_id)))
            while len(pending) >= limit:
                first, future = pending.popleft()
                settle(first, future.result())
        while pending:
            first, future = pending.popleft()
            settle(first, future.result())
    assert stitcher is not None
    probabilities: np.ndarray = stitcher.result()[0]
    return probabilities


def _run_chunk(model: Any, chunk: list[tuple[tuple[int, int, int], np.ndarray]], settle: Any
               ) -> None:
    from worker.batcher import BatchInfo, ImageResult

    outputs = model.runtime.infer(np.stack([p for _, p in chunk]))
    info = BatchInfo(0, len(chunk), ())
    for index, (start, _) in enumerate(chunk):
        settle(start, ImageResult({k: np.asarray(v)[index] for k, v in outputs.items()}, info))


def mask_on_source(probabilities: np.ndarray, grid: Volume, source: Volume,
                   threshold: float) -> np.ndarray:
    """Model-grid probabilities → uint8 mask on the source grid (linear, then threshold),
    never a float32 array of the source's size: one uint8 resampled image and the mask."""
    image = sitk.GetImageFromArray(np.clip(probabilities * 255.0, 0, 255).astype(np.uint8))
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    image.SetDirection(grid.direction)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in source.array.shape[::-1]])
    resampler.SetOutputOrigin(source.origin)
    resampler.SetOutputSpacing(source.spacing)
    resampler.SetOutputDirection(source.direction)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0)
    resampler.SetOutputPixelType(sitk.sitkUInt8)
    out = resampler.Execute(image)
    return (sitk.GetArrayViewFromImage(out) > int(round(threshold * 255))).view(np.uint8)


def measure(mask: np.ndarray, geometry: Volume, min_lesion_ml: float = 0.0) -> Lesions:
    """Connected lesions of ``mask`` (on ``geometry``'s grid) in physical units; components
    smaller than ``min_lesion_ml`` are removed from ``mask`` (in place) and not counted."""
    image = sitk.GetImageFromArray(mask)
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    labels = sitk.ConnectedComponent(image)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputeFeretDiameterOn()
    stats.Execute(labels)
    ids = list(stats.GetLabels())
    small = [i for i in ids if stats.GetPhysicalSize(i) < min_lesion_ml * 1000.0]
    if small:
        components = sitk.GetArrayViewFromImage(labels)
        mask[np.isin(components, small)] = 0
        ids = [i for i in ids if i not in set(small)]
    if not ids:
        return Lesions(0, 0.0, None, None)
    sizes = {i: stats.GetPhysicalSize(i) for i in ids}
    total = sum(sizes.values())
    centroid = np.sum([np.asarray(stats.GetCentroid(i)) * sizes[i] for i in ids], axis=0) / total
    return Lesions(count=len(ids), volume_ml=total / 1000.0,
                   largest_diameter_mm=max(stats.GetFeretDiameter(i) for i in ids),
                   centroid=(float(centroid[0]), float(centroid[1]), float(centroid[2])))


def save_mask(path: Path, mask: np.ndarray, sources: tuple[SliceRef, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, mask=mask,
                        sop_instance_uids=np.array([s.sop_instance_uid for s in sources]),
                        frames=np.array([s.frame or 0 for s in sources]))
    tmp.replace(path)


@dataclass
class SeriesAnalysis:
    """What the model says about one series: ``(label, score, threshold)`` per label, and for
    segmentation the lesions and their uint8 mask on the source grid (plan order)."""

    scores: list[tuple[str, float, float]]
    lesions: Lesions | None = None
    mask: np.ndarray | None = None


def analyse_series(runner: Any, model: Any, plan: VolumePlan, job_id: int) -> SeriesAnalysis:
    """The series of ``plan`` through the model: decode → model grid → inference (one input,
    or sliding window + stitching) → lesions and mask. No database: the job writes the result,
    the memory benchmark (bench/volume_memory.py) measures exactly this."""
    manifest: Manifest = model.manifest
    spec = manifest.volume
    assert spec is not None
    decoder = getattr(runner, "decoder", None) or _InlineCalls()
    source = decode_volume(plan, decoder, in_flight=4 * max(1, int(getattr(decoder, "workers", 1))))
    grid = model_grid(source, spec, release=True)  # the HU volume freed; geometry kept
    if spec.mode == "fixed":
        tensor = crop_or_pad(grid.array, spec.roi_size)[np.newaxis]
        if hasattr(runner, "batcher_for"):
            result = runner.batcher_for(model).submit(tensor, job_id).result()
            outputs = result.outputs
        else:
            outputs = {k: np.asarray(v)[0] for k, v in model.runtime.infer(tensor[None]).items()}
        scores = np.asarray(outputs.get(manifest.output_name, next(iter(outputs.values()))))
        return SeriesAnalysis([(label, float(score), manifest.threshold_for(label))
                               for label, score in zip(manifest.labels, scores.reshape(-1),
                                                       strict=False)])
    probabilities = infer_patches(runner, model, job_id, grid.array, spec, manifest.output_name)
    grid.array = np.empty((0, 0, 0), np.float32)  # the stitched map replaces the input
    # Lesions are measured on the model grid (small); speckle removed there is removed
    # from the probabilities too, then the mask goes back to the source grid for the SEG.
    grid_mask = (probabilities > spec.segment_threshold).view(np.uint8)
    before = grid_mask.copy()
    lesions = measure(grid_mask, grid, spec.min_lesion_ml)
    probabilities[(before > 0) & (grid_mask == 0)] = 0.0
    del before, grid_mask
    shape = (len(plan.slices), plan.slices[0].rows, plan.slices[0].columns)
    mask = mask_on_source(probabilities, grid, _shaped(source, shape), spec.segment_threshold)
    score = float(probabilities.max()) if probabilities.size else 0.0
    return SeriesAnalysis([(manifest.labels[0], score, spec.segment_threshold)], lesions, mask)


def run_volume_job(settings: Settings, runner: Any, model: Any, job: Job,
                   series_uid: str, paths: list[str]) -> int:
    """Infer one series and write its findings; returns the number of finding rows."""
    spec = model.manifest.volume
    assert spec is not None
    if not paths:
        raise VolumeGeometryError(f"series {series_uid} has no stored instances")
    plan = plan_files(paths, spec.spacing_tolerance)
    if len(plan.slices) < spec.min_slices:
        raise VolumeGeometryError(f"series {series_uid} has {len(plan.slices)} slices; the "
                                  f"model needs at least {spec.min_slices}")
    analysis = analyse_series(runner, model, plan, job.id)
    rows = [_row(job, series_uid, label, score, threshold)
            for label, score, threshold in analysis.scores]
    if analysis.lesions is not None and analysis.mask is not None:
        lesions, row = analysis.lesions, rows[0]
        row["positive"] = lesions.count > 0
        row.update(lesion_count=lesions.count, volume_ml=lesions.volume_ml,
                   largest_diameter_mm=lesions.largest_diameter_mm)
        if lesions.centroid is not None:
            row.update(centroid_x=lesions.centroid[0], centroid_y=lesions.centroid[1],
                       centroid_z=lesions.centroid[2])
        mask_file = mask_path(settings, job.id)
        save_mask(mask_file, analysis.mask, plan.slices)
        row["mask_path"] = to_storage(settings, mask_file)
    write_series_findings(settings, job.id, rows)
    log.info("volume job %s: series of %d slices, %d finding(s)", job.id, len(plan.slices),
             len(rows))
    return len(rows)


def _shaped(volume: Volume, shape: tuple[int, int, int]) -> Volume:
    """The volume's geometry with an array of ``shape`` that takes no memory (a broadcast view:
    only its shape is read)."""
    return Volume(array=np.broadcast_to(np.zeros((), np.uint8), shape), origin=volume.origin,
                  spacing=volume.spacing, direction=volume.direction, sources=volume.sources)


def _row(job: Job, series_uid: str, label: str, score: float, threshold: float
         ) -> dict[str, Any]:
    return {"job_id": job.id, "study_id": job.study_id, "series_instance_uid": series_uid,
            "label": label, "score": score, "threshold": threshold,
            "positive": bool(score >= threshold), "superseded": False}


def write_series_findings(settings: Settings, job_id: int, rows: list[dict[str, Any]]) -> None:
    """Replace the job's series findings, supersede older revisions', succeed: one commit."""
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise LookupError(f"job {job_id} vanished")
        session.execute(delete(SeriesFinding).where(SeriesFinding.job_id == job_id))
        if rows:
            session.execute(insert(SeriesFinding), rows)
        if job.study_revision > 1:
            model_name = session.scalar(select(Model.name).where(Model.id == job.model_id))
            older = select(Job.id).join(Model, Job.model_id == Model.id).where(
                Job.study_id == job.study_id, Job.study_revision < job.study_revision,
                Model.name == model_name)
            session.execute(update(SeriesFinding).where(SeriesFinding.job_id.in_(older))
                            .values(superseded=True))
        job_states.succeed(session, job)


class _InlineCalls:
    """Runs ``submit_call`` in the caller (InlineRunner has no decode pool)."""

    def submit_call(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except PixelDecodeError as exc:
            future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - carried to the job like a pool error
            future.set_exception(exc)
        return future
