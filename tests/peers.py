"""The one rule for tests that need a peer (a binary, a server, a capability) that may be missing.

On a developer's machine a missing peer skips the test with the reason. Under ``CI=true`` it
FAILS the test instead: CI (``.ci/run``) provides every peer the suite needs — PostgreSQL server
binaries for the fault suite, dcmtk, Orthanc with its DICOMweb plugin, dciodvfy, openssl, a
tmpfs it may mount (it runs as root) — so a missing one there is a broken CI, not a reason to
stop guarding the feature. One ``-ra`` line saying "skipped" is too easy to miss. Only the GPU
and TensorRT tests may skip in CI (they use ``pytest.mark.skipif`` on their own import check).
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

INSTALL_HINT = ".ci/run installs it"


def in_ci() -> bool:
    """CI systems set ``CI=true`` (GitHub Actions, GitLab CI); ``.ci/run`` sets it too."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing(what: str, reason: str) -> NoReturn:
    """``what`` is not available: skip the test here, fail it in CI."""
    message = f"needs {what}: {reason}"
    if in_ci():
        pytest.fail(f"CI=true and this peer is missing (CI must provide it): {message}",
                    pytrace=False)
    pytest.skip(message)


def require(tool: str, reason: str = INSTALL_HINT) -> str:
    """The path of the executable ``tool``; missing: skip, or fail under ``CI=true``."""
    path = shutil.which(tool)
    if path is None:
        missing(tool, reason)
    return path


def require_that(available: bool, what: str, reason: str) -> None:
    """A peer that is not a binary on PATH (a plugin file, a mount, server binaries)."""
    if not available:
        missing(what, reason)
