"""Volume path throughput: series/s end to end for 100-slice 512 × 512 CT series, against a naive
peer on the same model, and where the time goes.

Series are made from pydicom-data's real CT slice ``693_UNCR.dcm`` (and ``693_J2KR.dcm``, the
same slice in JPEG 2000) with UIDs, ImagePositionPatient and InstanceNumber rewritten (5 mm
apart, arrival shuffled). The model is the demo's tiny MONAI 3-D UNet (random weights: speed does
not depend on them), exported to ONNX for Lightbox and run in torch for the peer.

- Lightbox: files ingested and routed by a series rule, jobs run by the worker's code
  (:func:`worker.process.run_job` through a :class:`~worker.pipeline.WorkerPipeline`: decode
  pool, shared batcher, ONNX Runtime), several series in flight.
- Naive peer (in process: no Celery round trip is counted for it, which flatters it): every
  slice read whole with pydicom, sorted by InstanceNumber, rescaled, resampled with torch's
  trilinear interpolate, torch eager sliding window (MONAI ``sliding_window_inference``, batch
  1, Gaussian), a commit per finding.

The breakdown (decode, assembly, resampling, inference, write) times the same core functions
one after another on one series per variant.

    .venv/bin/python -m bench.volumes [--series 2] [--slices 100]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bench._common import DEFAULT_OUT, emit
from db.migrate import upgrade
from db.model_registry import register_bundle
from db.models import Job, Study
from db.session import session_scope
from db.volume_tables import SeriesFinding
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec, write_bundle_manifest
from lightbox.settings import Settings
from lightbox.volume import plan_files
from lightbox.volume_input import model_grid
from scheduler.ingest.folder import ingest_paths
from scheduler.scheduling.dispatch import PassReport, dispatch_ready
from scheduler.scheduling.route import load_rules

RULES = """
rules:
  - name: ct-volume
    select: series
    match: {Modality: [CT]}
    range: {Slices: [16, null]}
    models: [ct-lesion]
"""
VARIANTS = {"uncompressed": "693_UNCR.dcm", "jpeg2000": "693_J2KR.dcm"}


def write_ct_series(out: Path, source_name: str, slices: int, seed: int) -> list[Path]:
    source = pydicom.dcmread(get_testdata_file(source_name))
    study, series = generate_uid(), generate_uid()
    z0 = float(source.ImagePositionPatient[2])
    order = list(range(slices))
    random.Random(seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, k in enumerate(order, start=1):
        ds = source.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [*source.ImagePositionPatient[:2], f"{z0 + 5.0 * k:.2f}"]
        ds.InstanceNumber = slices - k  # numbering runs against position on purpose
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        path = out / f"{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_bundle(directory: Path) -> tuple[Path, Any]:
    import torch

    from trainer.volume_train import build_volume_network, export_volume_onnx, volume_spec

    torch.manual_seed(0)
    network = build_volume_network("segmentation").eval()
    spec = volume_spec("segmentation")
    manifest = Manifest(name="ct-lesion", version="bench", architecture="monai_unet3d_tiny",
                        input=InputSpec(channels=1, depth=spec.roi_size[0],
                                        height=spec.roi_size[1], width=spec.roi_size[2]),
                        output_name="probabilities", preprocessing=PreprocessSpec(),
                        labels=["lesion"], thresholds={"lesion": 0.5}, level="study",
                        volume=spec, training_data={"synthetic": True})
    directory.mkdir(parents=True, exist_ok=True)
    export_volume_onnx(network, directory / "model.onnx", manifest)
    write_bundle_manifest(directory, manifest)
    return directory, network


def run_lightbox(settings: Settings, folder: Path, workers: int) -> dict[str, Any]:
    from worker.decode_pool import DecodePool
    from worker.model_cache import ModelCache
    from worker.pipeline import WorkerPipeline
    from worker.process import run_job

    rules_file = settings.data_path / "rules.yaml"
    rules_file.write_text(RULES)
    started = time.perf_counter()
    ingest_paths(settings, [folder])
    dispatch_ready(settings, load_rules(rules_file), PassReport())
    with session_scope(settings.sqlalchemy_url) as session:
        jobs = [j.id for j in session.query(Job).order_by(Job.id)]
    pipeline = WorkerPipeline(settings, ModelCache(settings, "onnxruntime"), DecodePool(workers))
    pipeline.decoder.warm_up()
    try:
        run_started = time.perf_counter()
        with ThreadPoolExecutor(max(1, len(jobs))) as pool:
            outcomes = list(pool.map(lambda j: run_job(settings, pipeline, j), jobs))
        run_seconds = time.perf_counter() - run_started
    finally:
        pipeline.close()
    return {"series": len(jobs), "outcomes": outcomes, "seconds_with_ingest":
            time.perf_counter() - started, "seconds_jobs": run_seconds,
            "series_per_s": len(jobs) / run_seconds}


def run_naive(settings: Settings, paths: list[Path], network: Any) -> float:
    """One series the naive way; returns seconds."""
    import torch
    from monai.inferers import sliding_window_inference

    from trainer.volume_train import volume_spec

    spec = volume_spec("segmentation")
    started = time.perf_counter()
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: int(d.InstanceNumber))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                   for d in datasets]).astype(np.float32)
    spacing_xy = float(datasets[0].PixelSpacing[0])
    z = 5.0
    size = [max(1, round(hu.shape[0] * z / spec.spacing[2])),
            max(1, round(hu.shape[1] * spacing_xy / spec.spacing[1])),
            max(1, round(hu.shape[2] * spacing_xy / spec.spacing[0]))]
    with torch.no_grad():
        tensor = torch.nn.functional.interpolate(torch.from_numpy(hu)[None, None], size=size,
                                                 mode="trilinear", align_corners=False)
        low = spec.window_center - spec.window_width / 2
        tensor = ((tensor - low) / spec.window_width).clamp(0, 1)
        output = sliding_window_inference(tensor, spec.roi_size, 1, network,
                                          overlap=spec.overlap, mode="gaussian")
    score = float(output.max())
    with session_scope(settings.sqlalchemy_url) as session:  # a commit per finding
        study_id = session.query(Study.id).first()
        job_id = session.query(Job.id).first()
        if study_id and job_id:
            session.add(SeriesFinding(job_id=job_id[0], study_id=study_id[0],
                                      series_instance_uid=str(datasets[0].SeriesInstanceUID),
                                      label="lesion", score=score, threshold=0.5,
                                      positive=score >= 0.5))
    return time.perf_counter() - started


def breakdown(paths: list[Path], bundle: Path, settings: Settings) -> dict[str, float]:
    """The stages one after another on one series (decode in this process, one core)."""
    import onnxruntime as ort

    from lightbox.manifest import load_manifest
    from worker.volume_job import _InlineCalls, decode_volume, infer_patches, mask_on_source
    from worker.volume_job import measure as measure_lesions

    manifest = load_manifest(bundle)
    spec = manifest.volume
    assert spec is not None
    times: dict[str, float] = {}
    t = time.perf_counter()
    plan = plan_files(paths)
    times["assembly_s"] = time.perf_counter() - t
    t = time.perf_counter()
    volume = decode_volume(plan, _InlineCalls())
    times["decode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    grid = model_grid(volume, spec)
    times["resampling_s"] = time.perf_counter() - t
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])

    class Runtime:
        def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            return {"probabilities": session.run(None, {"image": batch})[0]}

    class Model:
        runtime = Runtime()

    t = time.perf_counter()
    probabilities = infer_patches(object(), Model(), 0, grid.array, spec, "probabilities")
    times["inference_s"] = time.perf_counter() - t
    t = time.perf_counter()
    mask = mask_on_source(probabilities, grid, volume, spec.segment_threshold)
    measure_lesions(mask, volume)
    times["write_s"] = time.perf_counter() - t  # mask back to the source grid + measures
    times["model_grid_voxels"] = float(grid.array.size)
    return times


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=2, help="series per variant (Lightbox)")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="decode processes")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated: uncompressed,jpeg2000")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"slices": args.slices, "rows_columns": 512, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="bench-volumes-") as tmp_name:
        tmp = Path(tmp_name)
        bundle, network = make_bundle(tmp / "bundle")
        for variant in args.variants.split(","):
            source = VARIANTS[variant]
            settings = Settings(data_dir=tmp / variant / "data", quiet_seconds=0.0)
            upgrade(settings.sqlalchemy_url)
            with session_scope(settings.sqlalchemy_url) as session:
                register_bundle(session, bundle, promote=True)
            series_paths = [write_ct_series(tmp / variant / "in" / str(i), source, args.slices,
                                            seed=i) for i in range(args.series)]
            _say(f"{variant}: {args.series} series written; breakdown")
            stages = breakdown(series_paths[0], bundle, settings)
            _say(f"{variant}: breakdown {stages}; Lightbox")
            lightbox = run_lightbox(settings, tmp / variant / "in", args.workers)
            _say(f"{variant}: Lightbox {lightbox['series_per_s']:.3f} series/s; naive peer")
            naive_seconds = run_naive(settings, series_paths[0], network)
            _say(f"{variant}: naive {naive_seconds:.1f} s/series")
            results["variants"][variant] = {
                "lightbox": lightbox, "naive_seconds_per_series": naive_seconds,
                "naive_series_per_s": 1.0 / naive_seconds,
                "speedup": lightbox["series_per_s"] * naive_seconds, "breakdown": stages}

    def plot(figure: Any) -> None:
        left, right = figure.subplots(1, 2)
        names = list(results["variants"])
        x = np.arange(len(names))
        left.bar(x - 0.2, [results["variants"][n]["lightbox"]["series_per_s"] for n in names],
                 0.4, label="Lightbox")
        left.bar(x + 0.2, [results["variants"][n]["naive_series_per_s"] for n in names], 0.4,
                 label="naive peer")
        left.set_xticks(x, names)
        left.set_ylabel("series/s (100 × 512²)")
        left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
        stages = ["decode_s", "assembly_s", "resampling_s", "inference_s", "write_s"]
        bottom = np.zeros(len(names))
        for stage in stages:
            values = np.array([results["variants"][n]["breakdown"][stage] for n in names])
            right.bar(names, values, bottom=bottom, label=stage[:-2])
            bottom += values
        right.set_ylabel("seconds per series, one core")
        right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)

    summary = "volumes: " + "; ".join(
        f"{n} {v['lightbox']['series_per_s']:.3f} series/s vs naive "
        f"{v['naive_series_per_s']:.3f} ({v['speedup']:.1f}x)"
        for n, v in results["variants"].items())
    emit("volumes", results, summary, args.out, plot)


if __name__ == "__main__":
    main()
