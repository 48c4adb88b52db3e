"""GPU decoding against the decode processes, JPEG 2000 chest CRs to a 224² model input.

    python3 -m bench.gpu_decode [--seconds 6] [--workers N]   (on a GPU node: bench/README.md)

The real 1955×1841 chest CR as JPEG 2000 lossless (pydicom-data ``RG1_J2KR.dcm``) and lossy
(``RG1_J2KI.dcm``), each prepared for a 1×224×224 model input, in images/s, the modes
interleaved over ``--rounds`` and the best kept:

- ``cpu_pool``: the decode processes (``--workers``, default one per core), the CPU path
  (reduced-resolution JPEG 2000 decode): the baseline;
- ``gpu``: :class:`worker.gpu_decode.GpuDecoder` with overflow off (every image on the GPU:
  read on the host, nvImageCodec full decode in batches, the wavelet's low band, window,
  resize and normalisation in CuPy);
- ``gpu_and_cpu``: the worker's setting (overflow past ``GPU_QUEUE`` waiting images to the
  same decode processes): what a GPU node's worker gets;
- ``nvimgcodec_only``: nvImageCodec's batch decode of in-memory codestreams (no file reading,
  no preparation): the decoder's own ceiling.

The first three keep ``--inflight`` images submitted, a new one as each finishes, as a worker
does (no barrier between batches, which would idle the GPU or the processes at each one).

Reported: each mode's images/s, ``gpu ÷ cpu_pool`` and ``gpu_and_cpu ÷ cpu_pool`` against
issue 18's goal (≥ 3 for JPEG 2000), the largest difference between a GPU and a CPU tensor,
and the load average. Without a usable GPU only ``cpu_pool`` is measured and the JSON says why.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame

from bench._common import DEFAULT_OUT, emit
from lightbox.manifest import Manifest
from lightbox.pixels import read_dataset
from lightbox.preprocess import prepare_file
from lightbox.settings import Settings
from worker.decode_pool import DecodePool
from worker.gpu_decode import GPU_BATCH, GpuDecoder, NvImageCodecBackend, probe

MANIFEST = Manifest(name="bench", version="1", architecture="none",
                    input={"height": 224, "width": 224}, preprocessing={}, labels=["x"],
                    thresholds={})
FILES = {"JPEG 2000 lossless": "RG1_J2KR.dcm", "JPEG 2000 lossy": "RG1_J2KI.dcm"}
GOAL = 3.0


class _Kept:
    """The shared decode pool, not closed by a GpuDecoder's close."""

    def __init__(self, pool: DecodePool) -> None:
        self.pool, self.workers = pool, pool.workers

    def submit(self, path: str | Path, manifest: Manifest) -> Future[np.ndarray]:
        return self.pool.submit(path, manifest)

    def submit_call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self.pool.submit_call(fn, *args)

    def warm_up(self) -> None:
        return None

    def close(self) -> None:
        return None


def _rate(work: Callable[[], int], seconds: float) -> float:
    images, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or images == 0:
        images += work()
    return images / elapsed


def _stream(decoder: DecodePool | GpuDecoder, path: str, seconds: float,
            inflight: int) -> float:
    """Images/s with ``inflight`` images always submitted (a new one as each finishes), as a
    worker keeps its jobs' images in flight; no barrier between batches."""
    slots, errors = threading.Semaphore(inflight), []

    def finished(future: Future[np.ndarray]) -> None:
        if future.exception() is not None:
            errors.append(future.exception())
        slots.release()

    submitted, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or submitted == 0:
        slots.acquire()
        decoder.submit(path, MANIFEST).add_done_callback(finished)
        submitted += 1
    for _ in range(inflight):
        slots.acquire()
    if errors:
        raise RuntimeError(f"{len(errors)} image(s) failed: {errors[0]!r}")
    return submitted / (time.perf_counter() - started)


def measure(path: str, seconds: float, workers: int, rounds: int, inflight: int,
            gpu: bool) -> dict[str, Any]:
    pool = DecodePool(workers)
    modes: dict[str, Callable[[float], float]] = {
        "cpu_pool": lambda s: _stream(pool, path, s, inflight)}
    decoders: list[GpuDecoder] = []
    result: dict[str, Any] = {}
    if gpu:
        backend = NvImageCodecBackend(0)
        only = GpuDecoder(_Kept(pool), backend, max_queue=1 << 30)
        both = GpuDecoder(_Kept(pool), backend)
        decoders += [only, both]
        ds = read_dataset(path)
        codestream = bytes(get_frame(ds.PixelData, 0, number_of_frames=1))
        batch = [codestream] * (2 * GPU_BATCH)
        modes["gpu"] = lambda s: _stream(only, path, s, inflight)
        modes["gpu_and_cpu"] = lambda s: _stream(both, path, s, inflight)
        modes["nvimgcodec_only"] = lambda s: _rate(lambda: len(backend.decode(batch)), s)
        expected = prepare_file(path, MANIFEST)
        tensor = only.submit(path, MANIFEST).result()
        result["max_abs_diff_gpu_vs_cpu_tensor"] = float(np.abs(tensor - expected).max())
    best = dict.fromkeys(modes, 0.0)
    try:
        pool.warm_up()
        for decoder in decoders:
            decoder.backend.warm_up()
        for _ in range(rounds):
            for name, work in modes.items():
                best[name] = max(best[name], work(seconds / rounds / len(modes)))
    finally:
        for decoder in decoders:
            result.setdefault("gpu_counts", []).append(
                {"gpu": decoder.gpu, "overflow": decoder.overflow,
                 "fallbacks": decoder.fallbacks, "routed": decoder.routed})
            decoder.close()
        pool.close()
    result.update({name: round(rate, 1) for name, rate in best.items()})
    if gpu:
        result["gpu_over_cpu_pool"] = round(best["gpu"] / best["cpu_pool"], 2)
        result["gpu_and_cpu_over_cpu_pool"] = round(best["gpu_and_cpu"] / best["cpu_pool"], 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per file, all modes")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved; best is kept")
    parser.add_argument("--inflight", type=int, default=128,
                        help="images kept in flight (a 16-core GPU node's worker: ~120)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    gpu, why = probe(Settings(data_dir=Path("lightbox-data")))
    results = {name: measure(get_testdata_file(file), args.seconds, args.workers, args.rounds,
                             args.inflight, gpu)
               for name, file in FILES.items()}
    load = os.getloadavg()[0]

    def plot(figure: Any) -> None:
        axes = figure.add_subplot(1, 1, 1)
        modes = [m for m in ("cpu_pool", "gpu", "gpu_and_cpu", "nvimgcodec_only")
                 if m in next(iter(results.values()))]
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            axes.bar([x + i * width for x in range(len(results))],
                     [r[mode] for r in results.values()], width, label=mode)
        for x, r in enumerate(results.values()):
            axes.hlines(GOAL * r["cpu_pool"], x - width / 2, x + 0.8 - width / 2,
                        colors="black", linestyles="dashed")
        axes.set_xticks([x + 0.4 - width / 2 for x in range(len(results))], list(results))
        axes.set_ylabel("images/s (224² input)")
        axes.set_title(f"GPU vs {args.workers} decode processes (dashed: {GOAL:g}× goal); "
                       f"load {load:.2f}")
        axes.legend()

    lossless = results["JPEG 2000 lossless"]
    if gpu:
        summary = (f"JPEG 2000 lossless: gpu {lossless['gpu']:.0f} img/s, gpu+cpu "
                   f"{lossless['gpu_and_cpu']:.0f}, {args.workers} processes "
                   f"{lossless['cpu_pool']:.0f}: {lossless['gpu_and_cpu_over_cpu_pool']:.2f}× "
                   f"(goal {GOAL:g}×); load {load:.2f}")
    else:
        summary = (f"no GPU decoding here ({why}); {args.workers} processes "
                   f"{lossless['cpu_pool']:.0f} img/s; load {load:.2f}")
    emit("gpu_decode", {"workers": args.workers, "gpu": gpu, "decode_path": why,
                        "load_average_1m": load, "goal_ratio": GOAL, "results": results},
         summary, args.out, plot)


if __name__ == "__main__":
    main()
