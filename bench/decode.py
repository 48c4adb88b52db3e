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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved; best is kept")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lightbox-decode-"))
    try:
        files = make_files(work)
        results = {}
        with Progress() as progress:
            task = progress.add_task("decoding", total=len(files))
            for name, path in files.items():
                progress.update(task, description=name)
                results[name] = measure(path, args.seconds, args.workers, args.rounds)
                progress.advance(task)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
    emit("decode", {"workers": args.workers, "results": results}, summary, args.out, plot)


if __name__ == "__main__":
    main()
