"""Benchmark: the seed CNN (baseline) against a MONAI network on SYNTHETIC radiographs.

Both train on the same seeded synthetic set (not patient data) with the same split, and are
scored on validation and on a fresh held-out synthetic set through their exported ONNX
models. Prints JSON and a one-line summary, writes a PNG (AUROC and seconds per epoch, and
learning curves). Run: ``.venv/bin/python bench/train.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from lightbox.settings import Settings  # noqa: E402
from trainer.export import onnx_scores  # noqa: E402
from trainer.metrics import auroc  # noqa: E402
from trainer.synthetic_dataset import synthetic_set  # noqa: E402
from trainer.train import TrainConfig, TrainResult, draft_manifest, train_model  # noqa: E402


def run(arch: str, epochs: int, args: argparse.Namespace, settings: Settings,
        progress: Progress) -> tuple[TrainResult, float]:
    config = TrainConfig(name=f"bench-{arch}", architecture=arch, input_size=args.size,
                         epochs=epochs, batch_size=args.batch_size, patience=0, seed=args.seed)
    data = synthetic_set(args.images, draft_manifest(config), seed=args.seed,
                         opacity_scale=args.opacity_scale)
    held_out = synthetic_set(args.held_out, draft_manifest(config), seed=args.seed + 1000,
                             opacity_scale=args.opacity_scale)
    task = progress.add_task(arch, total=None)

    def report(stage: str, done: int, total: int) -> None:
        progress.update(task, description=f"{arch}: {stage}", completed=done, total=total)

    result = train_model(settings, data, config, register=False, progress=report)
    scores = onnx_scores(result.bundle_dir / "model.onnx", held_out.x)
    return result, auroc(scores[:, 0], held_out.y[:, 0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="SYNTHETIC training images")
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed-epochs", type=int, default=6)
    parser.add_argument("--monai", choices=["densenet121", "resnet18"], default="resnet18")
    parser.add_argument("--monai-epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opacity-scale", type=float, default=0.3,
                        help="fainter synthetic opacities (1.0 = demo data, too easy to compare)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    results: dict[str, dict[str, object]] = {}
    histories = {}
    with tempfile.TemporaryDirectory(prefix="lightbox-bench-") as tmp, \
            Progress(console=console) as progress:
        settings = Settings(data_dir=Path(tmp))
        for arch, epochs in (("seed_cnn", args.seed_epochs), (args.monai, args.monai_epochs)):
            started = time.perf_counter()
            result, held_out_auroc = run(arch, epochs, args, settings, progress)
            histories[arch] = result.history
            results[arch] = {
                "validation_auroc": round(result.metrics["auroc"], 4),
                "held_out_auroc": round(held_out_auroc, 4),
                "seconds_per_epoch": round(result.seconds_per_epoch, 2),
                "epochs": epochs, "best_epoch": int(result.metrics["best_epoch"]),
                "parity_max_abs_diff": result.metrics["parity_max_abs_diff"],
                "cam_output": result.manifest.cam_output if result.manifest else None,
                "total_seconds": round(time.perf_counter() - started, 1),
            }
    baseline, monai = results["seed_cnn"], results[args.monai]
    report = {
        "benchmark": "train", "data": "SYNTHETIC chest radiographs (not patient data)",
        "images": args.images, "held_out_images": args.held_out, "input": args.size,
        "opacity_scale": args.opacity_scale,
        "torch_threads": 2, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "baseline": "seed_cnn", "results": results,
        "monai_vs_baseline": {
            "held_out_auroc_change": round(float(monai["held_out_auroc"])
                                           - float(baseline["held_out_auroc"]), 4),
            "seconds_per_epoch_ratio": round(float(monai["seconds_per_epoch"])
                                             / max(1e-9, float(baseline["seconds_per_epoch"])), 2),
        },
    }
    (args.out / "train.json").write_text(json.dumps(report, indent=2))
    _plot(args.out / "train.png", results, histories)
    print(json.dumps(report, indent=2))
    print(f"train bench (synthetic, {args.images} images, {args.size}px, opacity x"
          f"{args.opacity_scale}): seed_cnn held-out AUROC "
          f"{baseline['held_out_auroc']} at {baseline['seconds_per_epoch']} s/epoch; "
          f"{args.monai} AUROC {monai['held_out_auroc']} at {monai['seconds_per_epoch']} "
          f"s/epoch ({report['monai_vs_baseline']['seconds_per_epoch_ratio']}x slower)")
    return 0


def _plot(path: Path, results: dict[str, dict[str, object]],
          histories: dict[str, list[dict[str, float]]]) -> None:
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=100)
    axes[0].bar(names, [float(results[n]["held_out_auroc"]) for n in names], color=["C0", "C1"])
    axes[0].set(ylabel="held-out AUROC", ylim=(0, 1.05), title="AUROC (synthetic)")
    axes[1].bar(names, [float(results[n]["seconds_per_epoch"]) for n in names],
                color=["C0", "C1"])
    axes[1].set(ylabel="seconds per epoch", title="training speed (2 CPU threads)")
    for name in names:
        axes[2].plot([h["epoch"] for h in histories[name]],
                     [h["auroc"] for h in histories[name]], "o-", label=name)
    axes[2].set(xlabel="epoch", ylabel="validation AUROC", ylim=(0, 1.05),
                title="learning curves")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
