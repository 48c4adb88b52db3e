"""TensorRT engine cache: choose, reuse or rebuild the engine for this GPU and TensorRT.

A serialized engine runs only on the GPU model and TensorRT version that built it. Engines
are therefore kept under ``<engine cache>/<model name>/<version>-<onnx sha>/`` with the name
:func:`lightbox.trt_engine.engine_filename` gives (precision + GPU + compute capability +
TensorRT version) and a sidecar ``.json`` with what it was built for. For a model the cache:

1. reuses the cached engine when its sidecar matches (identity, ONNX hash, max batch);
2. else copies in an engine the bundle ships for exactly this identity (``lightbox compile``);
3. else builds one from the bundle's verified ``model.onnx`` — never writing into the bundle,
   whose files are hashed in its manifest.

So a node whose GPU or TensorRT was upgraded rebuilds once instead of failing jobs. Builds
take an exclusive file lock, so two workers on one node build an engine once. The GPU identity
and the builder are injected, which is how the choice logic is tested without a GPU.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightbox.manifest import Manifest
from lightbox.trt_engine import (
    GpuIdentity,
    build_engine,
    current_identity,
    engine_filename,
    profile_shapes,
)

log = logging.getLogger(__name__)

Builder = Callable[..., Path]


class EngineCache:
    def __init__(self, root: Path, *, identity: Callable[[], GpuIdentity] = current_identity,
                 builder: Builder = build_engine) -> None:
        self.root = Path(root)
        self._identity = identity
        self._builder = builder
        self.last_action: str | None = None  # "reused" | "copied" | "built" (for logs, tests)

    def directory(self, manifest: Manifest) -> Path:
        onnx_sha = manifest.files.get("model.onnx", "unhashed")[:16]
        return self.root / manifest.name / f"{manifest.version}-{onnx_sha}"

    @staticmethod
    def _meta(identity: GpuIdentity, manifest: Manifest, precision: str,
              max_batch: int) -> dict[str, Any]:
        # The profile is part of what an engine is: one built for other shapes is rebuilt.
        return {**asdict(identity), "precision": precision, "max_batch": max_batch,
                "profile": profile_shapes(manifest, max_batch).as_dict(),
                "onnx_sha256": manifest.files.get("model.onnx"), "model": manifest.name,
                "version": manifest.version}

    def _valid(self, engine: Path, meta: dict[str, Any]) -> bool:
        sidecar = engine.with_suffix(".json")
        if not (engine.is_file() and engine.stat().st_size > 0 and sidecar.is_file()):
            return False
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return False
        return bool(recorded == meta)

    def engine_for(self, bundle_dir: Path, manifest: Manifest, *, precision: str,
                   max_batch: int, rebuild: bool = False) -> Path:
        """The engine to deserialize for this node; built or copied when needed.

        ``rebuild`` forces a fresh build (the runtime asks for it when a cached engine fails
        to deserialize, e.g. a file truncated by a full disk)."""
        identity = self._identity()
        directory = self.directory(manifest)
        engine = directory / engine_filename(precision, identity)
        meta = self._meta(identity, manifest, precision, max_batch)
        if not rebuild and self._valid(engine, meta):
            self.last_action = "reused"
            return engine
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building the same engine
            if not rebuild and self._valid(engine, meta):
                self.last_action = "reused"
                return engine
            shipped = Path(bundle_dir) / engine.name
            if not rebuild and shipped.is_file() and shipped.name in manifest.files:
                tmp = engine.with_name(f".{engine.name}.tmp")
                shutil.copyfile(shipped, tmp)
                tmp.replace(engine)
                self.last_action = "copied"
            else:
                others = sorted(p.name for p in directory.glob(f"engine_{precision}_*.plan")
                                if p != engine)
                log.info("building TensorRT engine %s for %s %s (cached for other GPUs or "
                         "versions: %s)", engine.name, manifest.name, manifest.version,
                         others or "none")
                self._builder(Path(bundle_dir) / "model.onnx", engine, precision=precision,
                              profile=profile_shapes(manifest, max_batch))
                self.last_action = "built"
            sidecar_tmp = engine.with_name(f".{engine.stem}.json.tmp")
            sidecar_tmp.write_text(json.dumps(meta, indent=2))
            sidecar_tmp.replace(engine.with_suffix(".json"))
        return engine
