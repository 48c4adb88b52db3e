"""Loaded models, one per model row, kept for the life of the worker process. A bundle is
verified against its manifest's sha256 list once, when it is first loaded.

``loader`` is the extension point for the runtime (tests wrap the real one to record the
batches it is called with; nothing is monkeypatched)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lightbox.manifest import Manifest, load_manifest
from lightbox.roots import bundle_dir
from lightbox.settings import Settings
from worker.runtime import ModelRuntime, load_runtime

RuntimeLoader = Callable[[str, Path, Settings], ModelRuntime]


@dataclass(frozen=True)
class LoadedModel:
    model_id: int
    manifest: Manifest
    runtime: ModelRuntime


class ModelCache:
    def __init__(self, settings: Settings, runtime_kind: str,
                 loader: RuntimeLoader = load_runtime) -> None:
        self.settings, self.runtime_kind = settings, runtime_kind
        self._loader = loader
        self._models: dict[int, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, model_id: int, bundle_path: str) -> LoadedModel:
        with self._lock:
            loaded = self._models.get(model_id)
            if loaded is None:
                bundle = bundle_dir(self.settings, bundle_path)
                manifest = load_manifest(bundle, verify=True)
                runtime = self._loader(self.runtime_kind, bundle, self.settings)
                loaded = self._models[model_id] = LoadedModel(model_id, manifest, runtime)
            return loaded

    def runtime_report(self) -> str:
        """The runtime this process serves models on, for its ``workers`` row (``lightbox
        status``): the chosen one, plus any other a model ended up on, e.g.
        ``tensorrt+onnxruntime`` when one model's TensorRT engine could not be built here."""
        # Not under self._lock: a TensorRT build holds it for minutes and the worker row would
        # look stale meanwhile. dict.copy() is atomic under the GIL.
        used = {model.runtime.name for model in self._models.copy().values()}
        return "+".join([self.runtime_kind, *sorted(used - {self.runtime_kind})])
