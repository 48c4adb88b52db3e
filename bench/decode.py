"""Decode throughput per transfer syntax, against reading the same files' bytes.

    .venv/bin/python -m bench.decode [--seconds 2]

The real 1955×1841 chest CR (pydicom-data ``RG1_UNCR.dcm``, 15-bit MONOCHROME1) in four
transfer syntaxes: explicit VR little endian (as shipped), JPEG 2000 lossless (pydicom-data's
``RG1_J2KR.dcm``, the same image), JPEG lossless SV1 (encoded here with dcmtk's ``dcmcjpeg``)
and RLE lossless (encoded here with pydicom + pylibjpeg-rle). For each, in images/s and MB/s
(of file bytes): reading the bytes (the baseline), decoding the pixels in full (``dcmread`` +
``pixel_array``), decoding only what a 224×224 model input needs (``decode_frame(ds, (224,
224))``: JPEG 2000 resolution levels, block means of the full decode for other syntaxes), the
worker's preparation (decode, modality/VOI, resize to the model input) in one process, the same
at full size (no reduction: window and resize over every pixel, the baseline for what the
reductions save), and the worker's preparation through its decode pool (one spawned process
per core) and through a thread pool of the same size (why the worker uses processes).

``pool_cost``: what each image costs the worker process that feeds the decode pool (its CPU
seconds per image, all its threads: submitting, the executor's queue threads, unpickling
results) and the pool's images/s, with the manifest pickled on every submit and the tensor
pickled back (``before``, the old path) and with the spec pickled once and cached in each
child, the tensor through shared memory (``after``), interleaved.
``--pool-only`` measures just that (uncompressed and JPEG 2000), in well under a minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless
from rich.progress import Progress

from bench._common import DEFAULT_OUT, emit
from bench.full_size import prepare_full_size
from lightbox.manifest import Manifest
from lightbox.pixels import decode_frame
from lightbox.preprocess import prepare_file
from worker.decode_pool import DecodePool

MANIFEST = Manifest(name="bench", version="1", architecture="none",
                    input={"height": 224, "width": 224}, preprocessing={}, labels=["x"],
                    thresholds={})
SHAPE = (MANIFEST.input.height, MANIFEST.input.width)


def make_files(out: Path) -> dict[str, Path]:
    source = Path(get_testdata_file("RG1_UNCR.dcm"))
    files = {"explicit little endian": out / "explicit.dcm",
             "JPEG 2000 lossless": out / "j2k.dcm",
             "JPEG lossless SV1": out / "jpegls_sv1.dcm", "RLE lossless": out / "rle.dcm"}
    shutil.copyfile(source, files["explicit little endian"])
    shutil.copyfile(get_testdata_file("RG1_J2KR.dcm"), files["JPEG 2000 lossless"])
    if shutil.which("dcmcjpeg"):
        subprocess.run(["dcmcjpeg", "+e1", str(source), str(files["JPEG lossless SV1"])],
                       check=True, capture_output=True)
    else:
        del files["JPEG lossless SV1"]  # no JPEG lossless encoder here
    ds = pydicom.dcmread(source)
    ds.compress(RLELossless)
    ds.save_as(files["RLE lossless"], enforce_file_format=True)
    return files


def _rate(work: Callable[[], Any], seconds: float, per_call: int = 1) -> float:
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 1:
        work()
        calls += 1
    return calls * per_call / elapsed


def measure(path: Path, seconds: float, workers: int, rounds: int) -> dict[str, Any]:
    """Every mode measured ``rounds`` times, interleaved, best kept: the CPU is shared, and
    interleaving keeps a burst of someone else's load from landing on one mode only."""
    size_mb = path.stat().st_size / 1e6
    ds = pydicom.dcmread(path)
    decoded_mb = ds.pixel_array.nbytes / 1e6
    reference = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")).pixel_array
    lossless = bool(np.array_equal(ds.pixel_array, reference))
    batch = workers * 4
    pool = DecodePool(workers)
    threads = ThreadPoolExecutor(workers)
    modes: dict[str, tuple[Callable[[], Any], int]] = {
        "read_bytes": (path.read_bytes, 1),
        "decode": (lambda: pydicom.dcmread(path).pixel_array, 1),
        "decode_reduced": (lambda: decode_frame(pydicom.dcmread(path), SHAPE), 1),
        "prepare_1_process": (lambda: prepare_file(path, MANIFEST), 1),
        "prepare_full_size_1_process": (lambda: prepare_full_size(path, MANIFEST), 1),
        f"prepare_pool_{workers}_processes": (
            lambda: [f.result() for f in [pool.submit(path, MANIFEST) for _ in range(batch)]],
            batch),
        f"prepare_{workers}_threads": (
            lambda: list(threads.map(lambda _: prepare_file(path, MANIFEST), range(batch))),
            batch),
    }
    best = dict.fromkeys(modes, 0.0)
    try:
        pool.warm_up()
        for _ in range(rounds):
            for key, (work, per_call) in modes.items():
                best[key] = max(best[key], _rate(work, seconds / rounds, per_call))
    finally:
        pool.close()
        threads.shutdown()
    result: dict[str, Any] = {
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID), "file_mb": round(size_mb, 2),
        "decoded_mb": round(decoded_mb, 2), "pixels_identical_to_uncompressed": lossless}
    for key, rate in best.items():
        result[key] = {"images_per_s": round(rate, 2), "mb_per_s": round(rate * size_mb, 1)}
    result["decode"]["decoded_mb_per_s"] = round(best["decode"] * decoded_mb, 1)
    result["decode_reduced"]["shape"] = list(decode_frame(pydicom.dcmread(path), SHAPE).shape)
    return result


def pool_cost(path: Path, seconds: float, workers: int, rounds: int) -> dict[str, Any]:
    """Parent CPU per image and images/s through the pool, old path vs spec cache."""
    batch = workers * 8
    pools = {"before": DecodePool(workers, fast=False), "after": DecodePool(workers)}
    best: dict[str, dict[str, float]] = {}
    try:
        for pool in pools.values():
            pool.warm_up()
        for _ in range(rounds):
            for name, pool in pools.items():
                images, cpu_started, started = 0, time.process_time(), time.perf_counter()
                while time.perf_counter() - started < seconds / rounds or images == 0:
                    for future in [pool.submit(path, MANIFEST) for _ in range(batch)]:
                        future.result()
                    images += batch
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                rate, per_image_us = images / wall, cpu / images * 1e6
                old = best.get(name)
                best[name] = {
                    "images_per_s": round(max(rate, old["images_per_s"] if old else 0.0), 2),
                    "parent_cpu_us_per_image": round(min(
                        per_image_us, old["parent_cpu_us_per_image"] if old else 1e12), 1)}
    finally:
        for pool in pools.values():
            pool.close()
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved; best is kept")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--pool-only", action="store_true",
                        help="only the pool's per-image cost, before vs after (pool_cost)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lightbox-decode-"))
    try:
        files = make_files(work)
        if args.pool_only:
            files = {k: v for k, v in files.items()
                     if k in ("explicit little endian", "JPEG 2000 lossless")}
        results: dict[str, Any] = {}
        with Progress() as progress:
            task = progress.add_task("decoding", total=len(files))
            for name, path in files.items():
                progress.update(task, description=name)
                results[name] = ({} if args.pool_only else
                                 measure(path, args.seconds, args.workers, args.rounds))
                results[name]["pool_cost"] = pool_cost(path, args.seconds, args.workers,
                                                       args.rounds)
                progress.advance(task)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    cost = "; ".join(
        f"{name}: pool {r['pool_cost']['before']['images_per_s']:.1f} -> "
        f"{r['pool_cost']['after']['images_per_s']:.1f} img/s, worker CPU "
        f"{r['pool_cost']['before']['parent_cpu_us_per_image']:.0f} -> "
        f"{r['pool_cost']['after']['parent_cpu_us_per_image']:.0f} µs/image"
        for name, r in results.items())
    if args.pool_only:
        def plot_cost(figure: Any) -> None:
            axes = figure.subplots(1, 2)
            names = list(results)
            for axis, key, label in ((axes[0], "parent_cpu_us_per_image",
                                      "worker process CPU µs per image"),
                                     (axes[1], "images_per_s", "decode pool images/s")):
                for i, when in enumerate(("before", "after")):
                    axis.bar(np.arange(len(names)) + i * 0.4,
                             [results[n]["pool_cost"][when][key] for n in names], 0.4,
                             label=when)
                axis.set_xticks(np.arange(len(names)) + 0.2, names, fontsize=8)
                axis.set_title(label)
                axis.legend()

        emit("decode_pool_cost", {"workers": args.workers, "load_average_1m": load,
                                  "results": results}, f"{cost} (load {load:.1f})", args.out,
             plot_cost)
        return
    pool_key = f"prepare_pool_{args.workers}_processes"
    thread_key = f"prepare_{args.workers}_threads"

    def plot(figure: Any) -> None:
        axis = figure.subplots()
        names = list(results)
        columns = [("read_bytes", "read bytes (baseline)"), ("decode", "decode pixels (full)"),
                   ("decode_reduced", "decode reduced for a 224² input"),
                   ("prepare_full_size_1_process", "decode+prepare at full size, 1 process"),
                   ("prepare_1_process", "decode+prepare, 1 process"),
                   (pool_key, f"decode+prepare, pool of {args.workers} processes"),
                   (thread_key, f"decode+prepare, {args.workers} threads")]
        width = 0.8 / len(columns)
        for i, (key, label) in enumerate(columns):
            values = [results[n][key]["images_per_s"] for n in names]
            axis.bar(np.arange(len(names)) + i * width, values, width, label=label)
        axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        axis.set_yscale("log")
        axis.set_ylabel("images/s (log)")
        axis.set_title("1955×1841 chest CR, per transfer syntax")
        axis.legend(fontsize=8)

    summary = "decode: " + "; ".join(
        f"{name} {r['decode']['images_per_s']:.1f} img/s ({r['decode']['mb_per_s']:.0f} MB/s) "
        f"reduced {r['decode_reduced']['images_per_s']:.0f} img/s, prepare "
        f"{r['prepare_1_process']['images_per_s']:.0f} vs full-size "
        f"{r['prepare_full_size_1_process']['images_per_s']:.0f} img/s "
        f"vs read {r['read_bytes']['mb_per_s']:.0f} MB/s, pool {r[pool_key]['images_per_s']:.1f}"
        for name, r in results.items())
    emit("decode", {"workers": args.workers, "load_average_1m": load, "results": results},
         f"{summary}; {cost} (load {load:.1f})", args.out, plot)


if __name__ == "__main__":
    main()
