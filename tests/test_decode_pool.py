"""The decode pool's per-image shortcuts (spec cached in the child, tensors back through
shared memory) give exactly what ``prepare_file`` gives, also past the slots in flight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

from lightbox.manifest import load_manifest
from lightbox.preprocess import prepare_file
from worker.decode_pool import DecodePool


def test_shared_memory_results_equal_prepare_file(model_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(model_bundle)
    bigger = manifest.model_copy(update={"input": manifest.input.model_copy(
        update={"height": 320, "width": 320})})  # 400 KiB: larger than a slot, pickled back
    paths = [get_testdata_file("RG1_UNCR.dcm"), get_testdata_file("CT_small.dcm")]
    expected = {(p, m.input.height): prepare_file(p, m) for p in paths for m in (manifest, bigger)}
    pool = DecodePool(2)
    try:
        # 3 × 2 × 2 = 12 images in flight, more than the 8 slots: some come back pickled.
        futures = [((p, m.input.height), pool.submit(p, m))
                   for _ in range(3) for p in paths for m in (manifest, bigger)]
        for key, future in futures:
            np.testing.assert_array_equal(future.result(timeout=300), expected[key])
        # Every slot was given back: a second wave uses them again.
        again = [pool.submit(paths[0], manifest) for _ in range(8)]
        for future in again:
            np.testing.assert_array_equal(future.result(timeout=300),
                                          expected[(paths[0], manifest.input.height)])
        assert pool._slots is not None and len(pool._slots._free) == 8
    finally:
        pool.close()


def test_failures_and_old_path(model_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(model_bundle)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    for fast in (True, False):
        pool = DecodePool(1, fast=fast)
        try:
            failed = pool.submit(bad, manifest)
            assert failed.exception(timeout=300) is not None
            good = pool.submit(get_testdata_file("RG1_UNCR.dcm"), manifest)
            np.testing.assert_array_equal(
                good.result(timeout=300), prepare_file(get_testdata_file("RG1_UNCR.dcm"),
                                                       manifest))
        finally:
            pool.close()
