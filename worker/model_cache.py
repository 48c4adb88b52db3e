"""Loaded models, one per model row, kept for the life of the worker process. A bundle is
verified against its manifest's sha256 list once, when it is first loaded."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from lightbox.manifest import Manifest, load_manifest
from lightbox.settings import Settings
from worker.runtime import ModelRuntime, load_runtime


@dataclass(frozen=True)
class LoadedModel:
    model_id: int
    manifest: Manifest
    runtime: ModelRuntime


class ModelCache:
    def __init__(self, settings: Settings, runtime_kind: str) -> None:
        self.settings, self.runtime_kind = settings, runtime_kind
        self._models: dict[int, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, model_id: int, bundle_path: str) -> LoadedModel:
        with self._lock:
            loaded = self._models.get(model_id)
            if loaded is None:
                bundle = Path(bundle_path)
                manifest = load_manifest(bundle, verify=True)
                runtime = load_runtime(self.runtime_kind, bundle, self.settings)
                loaded = self._models[model_id] = LoadedModel(model_id, manifest, runtime)
            return loaded
