"""`lightbox train`, `lightbox models ...` and `lightbox compile`: thin shells over trainer/ and
db/registry.py. Torch is imported only inside the commands that train or compile."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lightbox.commands.common import console, db_session, ensure_db
from lightbox.output import to_json
from lightbox.settings import Settings, get_settings

TRAIN_EXTRA = "training needs the 'train' extra (pip install -e '.[train]')"


@contextmanager
def _progress() -> Iterator[Any]:
    """A rich progress bar driven by ``report(stage, done, total)`` callbacks."""
    from rich.progress import Progress

    with Progress(console=console, transient=not sys.stdout.isatty()) as progress:
        task = progress.add_task("starting", total=None)

        def report(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total)

        yield report


def train_with_progress(settings: Settings, **kwargs: object):  # type: ignore[no-untyped-def]
    """Train the seed CNN on SYNTHETIC images with a progress bar (used by `lightbox demo`)."""
    try:
        from trainer.train import train_seed_cnn
    except ImportError as exc:
        raise click.ClickException(f"{TRAIN_EXTRA}: {exc}") from exc
    options = {k: v for k, v in kwargs.items() if v is not None}
    with _progress() as report:
        return train_seed_cnn(settings, progress=report, **options)


@click.command()
@click.option("--name", default="chest", show_default=True, help="Model name (routing rules).")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="DICOM folder: RSNA layout (stage_2_train_labels.csv), class folders, or "
                   "files named in --labels-csv. Without it: SYNTHETIC radiographs.")
@click.option("--labels-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with file[,patient] and a label column or 0/1 columns per label.")
@click.option("--images", default=600, show_default=True, help="SYNTHETIC images (no --data).")
@click.option("--architecture", type=click.Choice(["seed_cnn", "densenet121", "resnet18"]),
              default="seed_cnn", show_default=True)
@click.option("--size", default=64, show_default=True, help="Input height and width.")
@click.option("--epochs", default=4, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--patience", default=3, show_default=True, help="Early stopping; 0 = off.")
@click.option("--seed", default=0, show_default=True)
@click.option("--val-fraction", default=0.2, show_default=True)
@click.option("--test-fraction", default=0.0, show_default=True)
@click.option("--threshold", "threshold_policy", default=None,
              help='"youden" or "sensitivity:0.90" (default LIGHTBOX_TRAIN_THRESHOLD_POLICY).')
@click.option("--version", default=None, help="Bundle version (default: UTC timestamp).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same config.")
@click.option("--register/--no-register", default=True, show_default=True)
@click.option("--promote/--no-promote", default=True, show_default=True)
@click.option("--volume", type=click.Choice(["segmentation", "classification"]), default=None,
              help="Train a 3-D CT model on SYNTHETIC phantoms instead (trainer/volume_train.py; "
                   "--name defaults to ct-lesion / ct-lesion-present).")
@click.option("--steps", default=40, show_default=True, help="Optimiser steps (--volume).")
def train(name: str, data: Path | None, labels_csv: Path | None, images: int, architecture: str,
          size: int, epochs: int, batch_size: int, lr: float, patience: int, seed: int,
          val_fraction: float, test_fraction: float, threshold_policy: str | None,
          version: str | None, resume: bool, register: bool, promote: bool,
          volume: str | None = None, steps: int = 40) -> None:
    """Train a model, export a verified ONNX bundle, register (and promote) it."""
    if volume is not None:
        _train_volume(volume, None if name == "chest" else name, steps, seed, version, register,
                      promote)
        return
    try:
        from trainer.train import TrainConfig, load_training_data, train_model
    except ImportError as exc:
        raise click.ClickException(f"{TRAIN_EXTRA}: {exc}") from exc
    from lightbox.errors import LightboxError

    settings = get_settings()
    ensure_db(settings)
    config = TrainConfig(
        name=name, architecture=architecture, input_size=size, epochs=epochs,
        batch_size=batch_size, learning_rate=lr, patience=patience, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction,
        threshold_policy=threshold_policy or settings.train_threshold_policy, version=version)
    if data is None:
        console.print(f"training on {images} SYNTHETIC radiographs (not patient data)")
    try:
        with _progress() as report:
            dataset = load_training_data(settings, config, data=data, labels_csv=labels_csv,
                                         synthetic_images=images, progress=report)
            result = train_model(settings, dataset, config, register=register,
                                 promote=promote and register, resume=resume, progress=report)
    except (LightboxError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    assert result.manifest is not None
    print(to_json({
        "bundle": str(result.bundle_dir), "version": result.version,
        "metrics": result.metrics, "thresholds": result.manifest.thresholds,
        "balance": result.manifest.training_data.get("balance"),
        "seconds_per_epoch": round(result.seconds_per_epoch, 3),
        "resumed_from_epoch": result.resumed_from_epoch}))


def _train_volume(kind: str, name: str | None, steps: int, seed: int, version: str | None,
                  register: bool, promote: bool) -> None:
    try:
        from trainer.volume_train import train_volume_model
    except ImportError as exc:
        raise click.ClickException(f"{TRAIN_EXTRA}: {exc}") from exc
    from lightbox.errors import LightboxError

    settings = get_settings()
    ensure_db(settings)
    console.print(f"training a 3-D {kind} model on SYNTHETIC CT phantoms (not patient data)")
    try:
        with _progress() as report:
            result = train_volume_model(settings, kind, name=name, steps=steps,  # type: ignore[arg-type]
                                        seed=seed, version=version, register=register,
                                        promote=promote and register, progress=report)
    except (LightboxError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    print(to_json({"bundle": str(result.bundle_dir), "version": result.manifest.version,
                   "metrics": result.manifest.metrics, "thresholds": result.manifest.thresholds,
                   "seconds": round(result.seconds, 1)}))


@click.command("compile")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--max-batch", default=16, show_default=True, help="TensorRT profile: 1…N.")
@click.option("--calibration-images", default=64, show_default=True)
def compile_command(bundle: Path, max_batch: int, calibration_images: int) -> None:
    """Build the ONNX Runtime INT8 model and TensorRT FP16/INT8 engines for BUNDLE.

    Exits non-zero (status 3) when TensorRT is unavailable, after building the INT8 model."""
    try:
        from trainer.compiler import compile_bundle
    except ImportError as exc:
        raise click.ClickException(f"{TRAIN_EXTRA}: {exc}") from exc
    from lightbox.errors import LightboxError

    settings = get_settings()
    ensure_db(settings)
    try:
        with _progress() as report:
            result = compile_bundle(settings, bundle, max_batch=max_batch,
                                    calibration_images=calibration_images, progress=report)
    except LightboxError as exc:
        raise click.ClickException(str(exc)) from exc
    int8 = result.int8
    console.print(f"ONNX Runtime INT8: {bundle / str(int8['file'])} (validation AUROC "
                  f"{float(int8['auroc_fp32']):.4f} → {float(int8['auroc_int8']):.4f}, "
                  f"accuracy change {float(int8['accuracy_change']):+.4f})", soft_wrap=True)
    for name, engine in result.engines.items():
        console.print(f"TensorRT {engine['precision']}: {bundle / name}", soft_wrap=True)
    if not result.tensorrt_available:
        console.print(f"[red]TensorRT unavailable[/red]: {result.tensorrt_reason}. No engines "
                      "were built; the ONNX Runtime INT8 model was built and added to the "
                      "manifest.", soft_wrap=True)
        sys.exit(3)


@click.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """Registered model bundles (list by default)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(models_list)


@models.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def models_list(fmt: str) -> None:
    """Every registered version with its stage and validation AUROC."""
    from db.registry import list_models

    with db_session() as session:
        rows = [{"id": m.id, "name": m.name, "version": m.version, "stage": m.stage.value,
                 "architecture": m.manifest.get("architecture"),
                 "auroc": round(m.manifest.get("metrics", {}).get("auroc", float("nan")), 4),
                 "bundle": m.bundle_path} for m in list_models(session)]
    if fmt == "json":
        print(to_json(rows))
        return
    columns = ("name", "version", "stage", "architecture", "auroc", "bundle")
    table = Table(title="Models")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    console.print(table)


@models.command("register")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--promote", is_flag=True, help="Make it the production version at once.")
def models_register(bundle: Path, promote: bool) -> None:
    """Register a bundle directory (its files are checked against the manifest's sha256)."""
    from db.registry import register_bundle

    with db_session() as session:
        model = register_bundle(session, bundle.resolve(), promote=promote)
        console.print(f"registered {model.name} {model.version} ({model.stage.value})")


@models.command("show")
@click.argument("name")
@click.argument("version")
def models_show(name: str, version: str) -> None:
    """Print a registered version's manifest."""
    from db.registry import get_model

    with db_session() as session:
        model = get_model(session, name, version)
        print(to_json({"id": model.id, "name": model.name, "version": model.version,
                       "stage": model.stage.value, "bundle": model.bundle_path,
                       "manifest": model.manifest}))


@models.command("promote")
@click.argument("name")
@click.argument("version")
def models_promote(name: str, version: str) -> None:
    """Make VERSION the production version of NAME (running workers need no restart)."""
    from db.registry import promote

    with db_session() as session:
        promote(session, name, version)
    console.print(f"{name} {version} is now production")


@models.command("retire")
@click.argument("name")
@click.argument("version")
def models_retire(name: str, version: str) -> None:
    """Take VERSION of NAME out of service."""
    from db.registry import retire

    with db_session() as session:
        retire(session, name, version)
    console.print(f"{name} {version} is retired")
