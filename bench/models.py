"""The model a benchmark serves: a realistic chest-radiograph network by default.

Why not the seed CNN: at 64×64 it runs ~5,000 images/s on two cores, a toy no hospital model
resembles, so every pipeline looks slow next to it. Chest-radiograph classifiers are
DenseNet121/ResNet at 224–512 px (CheXNet: DenseNet121 at 224), so the default is the trainer's
MONAI DenseNet121 at 224×224 with RANDOM weights (Kaiming init, seed 0): throughput does not
depend on what the weights learned. It is exported with the trainer's own exporter
(:func:`trainer.export.write_bundle`, which also checks ONNX Runtime against torch), and the same
torch module is pickled for the naive peer, so both serve the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS = ("densenet121", "seed-cnn")


@dataclass(frozen=True)
class BenchModel:
    bundle: Path
    peer_model: Path  # the same weights as a pickled torch module, for bench/peer.py
    description: str


def build(kind: str, work: Path, size: int | None = None) -> BenchModel:
    """Write the ONNX bundle and the peer's torch module for ``kind`` under ``work``."""
    import torch

    if kind == "seed-cnn":
        from db.migrate import upgrade
        from lightbox.settings import Settings
        from trainer.train import train_seed_cnn

        settings = Settings(data_dir=work / "model")
        upgrade(settings.sqlalchemy_url)
        trained = train_seed_cnn(settings, name="chest", images=240, epochs=2, seed=0,
                                 register=False)
        peer = work / "peer_model.pt"
        torch.save(trained.model, peer)
        return BenchModel(Path(trained.bundle_dir), peer,
                          "seed CNN 64×64, trained 2 epochs on 240 synthetic radiographs")
    if kind != "densenet121":
        raise ValueError(f"unknown bench model {kind!r}; choose from {MODELS}")
    from lightbox.manifest import InputSpec, Manifest, PreprocessSpec
    from trainer.architectures import Scorer, build_network
    from trainer.export import write_bundle

    size = size or 224
    torch.manual_seed(0)
    model = Scorer(build_network("densenet121", outputs=1, size=size), "binary",
                   with_cam=False).eval()
    manifest = Manifest(name="chest", version="bench", architecture="densenet121",
                        input=InputSpec(height=size, width=size),
                        preprocessing=PreprocessSpec(), labels=["finding"],
                        thresholds={"finding": 0.5})
    bundle = work / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).normal(size=(4, 1, size, size)).astype(np.float32)
    write_bundle(model, manifest, bundle, images)
    peer = work / "peer_model.pt"
    torch.save(model, peer)
    return BenchModel(bundle, peer, f"MONAI DenseNet121 {size}×{size}, random weights (seed 0)")
