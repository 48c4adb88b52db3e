"""Peak memory of the worker's volume path against the size of the volume itself.

    .venv/bin/python -m bench.volume_memory [--slices 300 600] [--size 512]

For each series length a SYNTHETIC 512 × 512 CT series is written to disk
(:func:`lightbox.synthetic_volume.write_large_series`: 0.7 × 0.7 mm pixels, 1 mm slices,
shuffled arrival) and a fresh Python process runs the worker's own code on it,
:func:`worker.volume_job.analyse_series`: headers planned, slices decoded (in that process, as
``InlineRunner`` does; a worker's decode processes each hold one file at a time) into one float32
volume, resampled to the model's grid (SimpleITK, in slabs), windowed, sliding-window patches
through the real :class:`~worker.batcher.Batcher` and ONNX Runtime, stitched with Gaussian
weights, lesions measured and the mask put back on the source grid. The model is a small ONNX
graph (a band-pass on windowed intensity; memory does not depend on the weights) with the
manifest of a typical CT segmentation model: 1.5 mm isotropic grid, 32 × 64 × 64 patches.

Peak RSS comes from the kernel's high-water mark (``VmHWM``), reset after imports, model load
and planning (``/proc/self/clear_refs``), so no short peak is missed between samples; the
baseline is ``VmRSS`` at that moment. A sampling thread (every 20 ms) records the curve for the
plot. The figure is peak − baseline against the float32 volume's own bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import DEFAULT_OUT, ROOT, emit

MIB = 2**20
MODEL_SPACING = (1.5, 1.5, 1.5)
ROI = (32, 64, 64)
# The goal of issue 17: "the volume itself plus a few hundred MB".
GOAL_EXTRA_MIB = 300


def write_bundle(directory: Path, spacing: tuple[float, float, float] = MODEL_SPACING,
                 roi: tuple[int, int, int] = ROI) -> Path:
    """A sliding-window segmentation bundle: ONNX band-pass on windowed intensity (lesions of
    the synthetic phantom come out ~1, everything else ~0)."""
    import onnx
    from onnx import TensorProto, helper

    from lightbox.manifest import (
        InputSpec,
        Manifest,
        PreprocessSpec,
        VolumeSpec,
        write_bundle_manifest,
    )

    directory.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, *roi])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 1, *roi])
    const = [helper.make_node("Constant", [], [n], value=helper.make_tensor(
        n, TensorProto.FLOAT, [], [v])) for n, v in (("low", 0.535), ("high", 0.65), ("k", 300.0))]
    nodes = [*const,
             helper.make_node("Sub", ["image", "low"], ["a"]),
             helper.make_node("Mul", ["a", "k"], ["ak"]),
             helper.make_node("Sigmoid", ["ak"], ["sa"]),
             helper.make_node("Sub", ["high", "image"], ["b"]),
             helper.make_node("Mul", ["b", "k"], ["bk"]),
             helper.make_node("Sigmoid", ["bk"], ["sb"]),
             helper.make_node("Mul", ["sa", "sb"], ["probabilities"])]
    model = helper.make_model(helper.make_graph(nodes, "bandpass", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(directory / "model.onnx"))
    write_bundle_manifest(directory, Manifest(
        name="ct-lesion-memory", version="bench-1", architecture="onnx_bandpass",
        input=InputSpec(channels=1, depth=roi[0], height=roi[1], width=roi[2]),
        output_name="probabilities", preprocessing=PreprocessSpec(), labels=["lesion"],
        thresholds={"lesion": 0.5}, level="study", training_data={"synthetic": True},
        volume=VolumeSpec(spacing=spacing, window_center=40, window_width=1000,
                          mode="sliding_window", roi_size=roi, overlap=0.25, min_slices=4,
                          min_lesion_ml=0.1)))
    return directory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class _Runner:
    """The parts of :class:`~worker.pipeline.WorkerPipeline` a volume job uses: one batcher
    per model (the real one) and no decode pool (decode in this process)."""

    def __init__(self, batcher: Any) -> None:
        self.batcher = batcher
        self.decoder = None

    def batcher_for(self, model: Any) -> Any:
        return self.batcher


def measure_path(folder: Path, bundle: Path, max_batch: int = 4) -> dict[str, Any]:
    """Run the volume path on the series in ``folder`` in this process; peak RSS over the
    baseline taken just before it. Meant for a fresh process (see :func:`run_child`)."""
    import numpy as np

    from lightbox.manifest import load_manifest
    from lightbox.settings import Settings
    from lightbox.volume import plan_files
    from worker.batcher import Batcher
    from worker.model_cache import LoadedModel
    from worker.runtime import load_runtime
    from worker.volume_job import analyse_series

    settings = Settings(data_dir=folder.parent / "data")
    manifest = load_manifest(bundle, verify=False)
    runtime = load_runtime("onnxruntime", bundle, settings)
    model = LoadedModel(1, manifest, runtime)
    batcher = Batcher(runtime, max_batch=max_batch, max_wait_s=0.005, name="volume")
    runtime.infer(np.zeros((1, 1, *ROI), np.float32))  # warm: arenas allocated before baseline
    plan = plan_files(sorted(folder.iterdir()))
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts here
    baseline = _status_kib("VmRSS")
    curve: list[tuple[float, float]] = []
    done = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not done.is_set():
            curve.append((round(time.perf_counter() - started, 3),
                          round((_status_kib("VmRSS") - baseline) / 1024, 1)))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    analysis = analyse_series(_Runner(batcher), model, plan, job_id=1)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = _status_kib("VmHWM")
    batcher.close()
    rows, columns = plan.slices[0].rows, plan.slices[0].columns
    assert analysis.lesions is not None
    return {"slices": len(plan.slices), "rows": rows, "columns": columns,
            "volume_mib": round(len(plan.slices) * rows * columns * 4 / MIB, 1),
            "baseline_mib": round(baseline / 1024, 1), "peak_mib": round(peak / 1024, 1),
            "peak_above_baseline_mib": round((peak - baseline) / 1024, 1),
            "seconds": round(seconds, 1), "lesions_found": analysis.lesions.count,
            "curve": curve[:: max(1, len(curve) // 400)]}


def run_child(folder: Path, bundle: Path) -> dict[str, Any]:
    """:func:`measure_path` in a fresh interpreter (nothing left over from earlier sizes)."""
    out = subprocess.run([sys.executable, "-m", "bench.volume_memory", "--child", str(folder),
                          str(bundle)], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({out.returncode}):\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[300, 600])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_path(*args.child)))
        return

    from lightbox.synthetic_volume import write_large_series

    work = Path(tempfile.mkdtemp(prefix="lightbox-volmem-"))
    runs = []
    try:
        bundle = write_bundle(work / "bundle")
        for slices in args.slices:
            folder = work / f"series-{slices}"
            write_large_series(folder, slices, size=args.size)
            run = run_child(folder, bundle)
            run["extra_over_volume_mib"] = round(run["peak_above_baseline_mib"]
                                                 - run["volume_mib"], 1)
            runs.append(run)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"series": f"SYNTHETIC CT {args.size}², 0.7 × 0.7 × 1.0 mm, uncompressed",
              "model": {"spacing_mm": MODEL_SPACING, "roi": ROI, "overlap": 0.25},
              "goal": f"peak above baseline ≤ volume + {GOAL_EXTRA_MIB} MiB", "runs": runs}

    def plot(figure: Any) -> None:
        left, right = figure.subplots(1, 2)
        for run in runs:
            xs = [t for t, _ in run["curve"]]
            left.plot(xs, [m for _, m in run["curve"]], label=f"{run['slices']} slices")
            left.axhline(run["volume_mib"], linestyle=":", color="grey")
        left.set_xlabel("seconds into the volume path")
        left.set_ylabel("RSS above baseline (MiB)")
        left.set_title("resident memory over the path (dotted: the volume)")
        left.legend()
        labels = [str(r["slices"]) for r in runs]
        right.bar(labels, [r["volume_mib"] for r in runs], label="the float32 volume")
        right.bar(labels, [r["extra_over_volume_mib"] for r in runs],
                  bottom=[r["volume_mib"] for r in runs], label="beyond the volume")
        right.set_xlabel("slices (512 × 512)")
        right.set_ylabel("peak RSS above baseline (MiB)")
        right.set_title(f"peak (goal: volume + {GOAL_EXTRA_MIB} MiB)")
        right.legend()

    summary = "volume memory: " + "; ".join(
        f"{r['slices']} slices: peak +{r['peak_above_baseline_mib']:.0f} MiB for a "
        f"{r['volume_mib']:.0f} MiB volume (+{r['extra_over_volume_mib']:.0f} beyond it)"
        for r in runs) + f" (goal ≤ volume + {GOAL_EXTRA_MIB} MiB)"
    emit("volume_memory", result, summary, args.out, plot)


if __name__ == "__main__":
    main()
