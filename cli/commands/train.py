"""`lightbox train`, `lightbox models ...` and `lightbox compile`: thin shells over trainer/ and
db/model_registry.py. Torch is imported only inside the commands that train or compile."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cli.commands.common import console, db_session, ensure_db
from cli.formatting import to_json
from lightbox.settings import Settings, get_settings

TRAIN_EXTRA = "training needs the 'train' extra (pip install -e '.[train]')"
# Progress, per-epoch lines and notes go to stderr: stdout carries the result only.
err_console = Console(stderr=True)


def _training_logs(settings: Settings) -> None:
    """Per-epoch lines (trainer.loop) on stderr whether or not a terminal is attached; at a
    terminal through rich, so they print above the progress bar."""
    root = logging.getLogger()
    if root.handlers:
        return
    if err_console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err_console, show_path=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for chatty in ("onnx_ir", "onnxscript"):  # the ONNX exporter's pass-by-pass notes
        logging.getLogger(chatty).setLevel(logging.WARNING)


@contextmanager
def _progress(target: Console | None = None) -> Iterator[Any]:
    """A rich progress bar driven by ``report(stage, done, total)`` callbacks; drawn only at a
    terminal (nothing when output is redirected)."""
    from rich.progress import Progress

    target = target or console
    with Progress(console=target, transient=not target.is_terminal,
                  disable=not target.is_terminal) as progress:
        task = progress.add_task("starting", total=None)

        def report(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total)

        yield report


def train_with_progress(settings: Settings, **kwargs: Any) -> Any:
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
@click.option("--promote/--no-promote", default=False, show_default=True,
              help="Make it production at once (default: registered as staging; promote "
                   "with `lightbox models promote`, which compares it with production).")
@click.option("--monitor", type=click.Choice(["val_loss", "auroc", "accuracy"]),
              default="val_loss", show_default=True,
              help="Validation measure early stopping watches and the kept epoch is best by.")
@click.option("--background", "background_class", default=None,
              help="Multiclass: the class that is no finding (e.g. normal).")
@click.option("--confident-accuracy", type=click.FloatRange(0.0, 1.0, min_open=True),
              default=None, help="Multiclass: choose a confident threshold on the top "
              "probability so that decided validation images reach this top-1 accuracy; below "
              "it an image is 'indeterminate'.")
@click.option("--kind", type=click.Choice(["image", "tabular"]), default="image",
              show_default=True, help="tabular: a metadata model (small MLP) on the DICOM "
              "header values named by --features; without --data, SYNTHETIC headers (the "
              "view task: AP / LATERAL / PA).")
@click.option("--features", default=None,
              help="tabular: comma-separated header keywords (default: KVP, ExposureInuAs, "
                   "DistanceSourceToDetector, PatientAge, PatientSex, Manufacturer).")
@click.option("--fuse-with", "fuse_with", default=None, metavar="MODEL",
              help="tabular: a late-fusion head that also takes the production version of "
                   "image model MODEL's scores on the same file (needs --data and "
                   "--labels-csv; the worker runs MODEL, then the head).")
@click.option("--json", "as_json", is_flag=True, help="stdout is one JSON document only.")
@click.option("--volume", type=click.Choice(["segmentation", "classification"]), default=None,
              help="Train a 3-D CT model on SYNTHETIC phantoms instead (trainer/volume_train.py; "
                   "--name defaults to ct-lesion / ct-lesion-present).")
@click.option("--steps", default=40, show_default=True, help="Optimiser steps (--volume).")
def train(name: str, data: Path | None, labels_csv: Path | None, images: int, architecture: str,
          size: int, epochs: int, batch_size: int, lr: float, patience: int, seed: int,
          val_fraction: float, test_fraction: float, threshold_policy: str | None,
          version: str | None, resume: bool, register: bool, promote: bool, monitor: str,
          background_class: str | None, confident_accuracy: float | None, kind: str,
          features: str | None, fuse_with: str | None, as_json: bool,
          volume: str | None = None, steps: int = 40) -> None:
    """Train a model, export a verified ONNX bundle and register it as staging.

    One line per epoch (losses, AUROC, accuracy, seconds) and the early-stopping decision go
    to stderr; the result goes to stdout (with --json: one JSON document only)."""
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
    _training_logs(settings)
    ensure_db(settings)
    config = TrainConfig(
        name=name, architecture=architecture, input_size=size, epochs=epochs,
        batch_size=batch_size, learning_rate=lr, patience=patience, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction,
        threshold_policy=threshold_policy or settings.train_threshold_policy, version=version,
        monitor=monitor, background_class=background_class,
        confident_accuracy=confident_accuracy)
    if kind == "tabular":
        from dataclasses import replace

        config = replace(config, architecture="tabular_mlp", input_size=1)
        if data is not None and labels_csv is None:
            raise click.UsageError("--kind tabular with --data needs --labels-csv")
    fusion_bundle = None
    if fuse_with is not None:
        if kind != "tabular" or data is None:
            raise click.UsageError("--fuse-with needs --kind tabular, --data and --labels-csv")
        fusion_bundle = _production_bundle(fuse_with)
    if data is None:
        what = "header value sets" if kind == "tabular" else "radiographs"
        err_console.print(f"training on {images} SYNTHETIC {what} (not patient data)")
    try:
        with _progress(err_console) as report:
            if kind == "tabular":
                from trainer.tabular import DEFAULT_FEATURES, csv_tabular_set, synthetic_tabular_set

                keywords = [k.strip() for k in features.split(",") if k.strip()] \
                    if features else DEFAULT_FEATURES
                dataset = (synthetic_tabular_set(images, keywords, seed=seed) if data is None
                           else csv_tabular_set(data, labels_csv, keywords))  # type: ignore[arg-type]
                if fusion_bundle is not None:
                    from trainer.tabular import fuse_image_scores

                    report(f"scoring with {fuse_with}", 0, 1)
                    dataset = fuse_image_scores(dataset, fusion_bundle)
            else:
                dataset = load_training_data(settings, config, data=data,
                                             labels_csv=labels_csv, synthetic_images=images,
                                             progress=report)
            result = train_model(settings, dataset, config, register=register,
                                 promote=promote and register, resume=resume, progress=report)
    except (LightboxError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    assert result.manifest is not None
    manifest = result.manifest
    stage = ("production" if promote and register else "staging") if register else \
        "not registered"
    report_doc = {
        "bundle": str(result.bundle_dir), "version": result.version, "stage": stage,
        "task": manifest.task, "monitor": manifest.monitor,
        "fuse_with": manifest.fuse_with.model_dump() if manifest.fuse_with else None,
        "background_class": manifest.background_class,
        "confident_threshold": manifest.confident_threshold, "synthetic": manifest.synthetic,
        "metrics": result.metrics, "thresholds": manifest.thresholds,
        "balance": manifest.training_data.get("balance"),
        "seconds_per_epoch": round(result.seconds_per_epoch, 3),
        "resumed_from_epoch": result.resumed_from_epoch}
    if as_json:
        print(to_json(report_doc))
        return
    metrics = result.metrics
    shown = [k for k in ("test_top1_accuracy", "test_indeterminate_rate", "test_auroc",
                         "test_accuracy", "top1_accuracy", "indeterminate_rate", "auroc",
                         "val_loss", "best_epoch", "epochs_run") if k in metrics]
    console.print(f"{config.name} {result.version} ({manifest.task}, {stage}): "
                  + ", ".join(f"{k} {metrics[k]:.4g}" for k in shown), soft_wrap=True)
    console.print(f"bundle {result.bundle_dir}", soft_wrap=True)
    if register and not promote:
        console.print(f"promote with: lightbox models promote {config.name} {result.version}",
                      soft_wrap=True)


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
def _production_bundle(name: str) -> Path:
    """The bundle of ``name``'s production version (a fusion head is trained on its scores)."""
    from db.model_registry import production_model
    from lightbox.roots import bundle_dir

    with db_session() as session:
        row = production_model(session, name)
        if row is None:
            raise click.ClickException(f"--fuse-with {name}: no production version of {name}")
        return bundle_dir(get_settings(), row.bundle_path)


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
    if "skipped" in int8:
        console.print(f"ONNX Runtime INT8: not built ({int8['skipped']})", soft_wrap=True)
    else:
        console.print(f"ONNX Runtime INT8: {bundle / str(int8['file'])} (validation AUROC "
                      f"{float(int8['auroc_fp32']):.4f} → {float(int8['auroc_int8']):.4f}, "
                      f"accuracy change {float(int8['accuracy_change']):+.4f})", soft_wrap=True)
    for name, engine in result.engines.items():
        console.print(f"TensorRT {engine['precision']}: {bundle / name}", soft_wrap=True)
    if not result.tensorrt_available:
        built = ("nothing else was built" if "skipped" in int8 else
                 "the ONNX Runtime INT8 model was built and added to the manifest")
        console.print(f"[red]TensorRT unavailable[/red]: {result.tensorrt_reason}. No engines "
                      f"were built; {built}.", soft_wrap=True)
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
    from db.model_registry import list_models

    with db_session() as session:
        rows = [{"id": m.id, "name": m.name, "version": m.version, "stage": m.stage.value,
                 "shadow": m.shadow, "task": m.manifest.get("task"),
                 "synthetic": m.manifest.get("training_data", {}).get("kind") == "synthetic",
                 "architecture": m.manifest.get("architecture"),
                 "auroc": round(m.manifest.get("metrics", {}).get("auroc", float("nan")), 4),
                 "bundle": m.bundle_path} for m in list_models(session)]
    if fmt == "json":
        print(to_json(rows))
        return
    columns = ("name", "version", "stage", "shadow", "task", "architecture", "auroc", "bundle")
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
    from db.model_registry import register_bundle

    with db_session() as session:
        model = register_bundle(session, bundle.resolve(), promote=promote)
        console.print(f"registered {model.name} {model.version} ({model.stage.value})")


@models.command("show")
@click.argument("name")
@click.argument("version")
def models_show(name: str, version: str) -> None:
    """Print a registered version's manifest."""
    from db.model_registry import get_model

    with db_session() as session:
        model = get_model(session, name, version)
        print(to_json({"id": model.id, "name": model.name, "version": model.version,
                       "stage": model.stage.value, "bundle": model.bundle_path,
                       "manifest": model.manifest}))


def _actor() -> str:
    """Who acts, for the audit log: the OS user (the API passes its token's name instead)."""
    import getpass

    try:
        return f"os:{getpass.getuser()}"
    except (KeyError, OSError):
        return "os:unknown"


@models.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Compare on this labelled folder instead of the candidate's held-out set.")
@click.option("--labels-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Labels for --eval-data (as for `lightbox train`).")
@click.option("--force", is_flag=True, help="Promote even if it scores worse (needs --reason).")
@click.option("--reason", default=None, help="Why: stored in the audit event.")
def models_promote(name: str, version: str, eval_data: Path | None, labels_csv: Path | None,
                   force: bool, reason: str | None) -> None:
    """Make VERSION the production version of NAME (running workers need no restart).

    The candidate and the current production version are first scored on the same images (the
    candidate's held-out set, or --eval-data); a candidate that scores worse is refused unless
    --force --reason. The promotion is an audit event (who, when, why, the metrics)."""
    from db.model_registry import get_model, production_model, promote
    from lightbox.errors import LightboxError
    from lightbox.roots import bundle_dir

    settings = get_settings()
    with db_session() as session:
        candidate = get_model(session, name, version)
        current = production_model(session, name)
        paths = (candidate.bundle_path, current.bundle_path if current else None)
        same = current is not None and current.id == candidate.id
    comparison = None
    if paths[1] is not None and not same:
        try:
            from trainer.evaluate import compare
        except ImportError as exc:
            raise click.ClickException(f"{TRAIN_EXTRA} (to compare with production): "
                                       f"{exc}") from exc
        try:
            comparison = compare(settings, bundle_dir(settings, paths[0]),
                                 bundle_dir(settings, paths[1]), data=eval_data,
                                 labels_csv=labels_csv)
        except (LightboxError, ValueError, OSError) as exc:
            if not force:
                raise click.ClickException(f"cannot compare with production ({exc}); use "
                                           "--eval-data, or --force --reason") from exc
            comparison = {"comparable": False, "evaluation": f"failed: {exc}"}
        if comparison.get("comparable"):
            err_console.print(
                f"{comparison['metric']} on {comparison['evaluation']}: candidate "
                f"{comparison['candidate']:.4f}, production {comparison['production_version']} "
                f"{comparison['production']:.4f}", soft_wrap=True)
    with db_session() as session:
        promote(session, name, version, comparison=comparison, force=force, reason=reason,
                actor=_actor())
    console.print(f"{name} {version} is now production")


@models.command("retire")
@click.argument("name")
@click.argument("version")
@click.option("--reason", default=None, help="Why: stored in the audit event.")
def models_retire(name: str, version: str, reason: str | None) -> None:
    """Take VERSION of NAME out of service."""
    from db.model_registry import retire

    with db_session() as session:
        retire(session, name, version, actor=_actor(), reason=reason)
    console.print(f"{name} {version} is retired")


@models.command("shadow")
@click.argument("name")
@click.argument("version")
@click.option("--stop", is_flag=True, help="Stop running VERSION in shadow mode.")
@click.option("--reason", default=None, help="Why: stored in the audit event.")
def models_shadow(name: str, version: str, stop: bool, reason: str | None) -> None:
    """Run staging VERSION beside production on every new job of NAME (same decoded images;
    its findings are flagged shadow, never exported); compare with `lightbox models compare`."""
    from db.model_registry import set_shadow

    with db_session() as session:
        set_shadow(session, name, version, actor=_actor(), reason=reason, on=not stop)
    console.print(f"{name} {version} {'no longer runs' if stop else 'runs'} in shadow mode")


@models.command("compare")
@click.argument("name")
@click.option("--version", "shadow_version", default=None,
              help="The shadow version (default: every shadow finding of NAME).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="PNG path (default: <data dir>/reports/compare-NAME.png).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def models_compare(name: str, shadow_version: str | None, plot_path: Path | None,
                   fmt: str) -> None:
    """A shadow version against production on real traffic: agreement, score correlation,
    disagreements (UIDs only), and a scatter plot."""
    from cli.commands.compare import plot, summarise
    from db.queries import shadow_pairs

    settings = get_settings()
    with db_session() as session:
        pairs = shadow_pairs(session, name, shadow_version)
    summary = summarise(pairs)
    if pairs:
        path = plot_path or settings.data_path / "reports" / f"compare-{name}.png"
        summary["plot"] = str(plot(pairs, summary, path, name))
    if fmt == "json":
        print(to_json(summary))
        return
    if not pairs:
        console.print(f"no shadow findings for {name} yet (`lightbox models shadow {name} "
                      "VERSION`, then let jobs run)")
        return
    console.print(f"{name}: production {summary['production_version']} vs shadow "
                  f"{summary['shadow_version']} on {summary['pairs']} finding pair(s) in "
                  f"{summary['jobs']} job(s): agreement {summary['agreement']:.3f}, score "
                  f"correlation {summary['score_correlation']}", soft_wrap=True)
    for d in summary["disagreements"]:
        console.print(f"  study …{d['study_instance_uid'][-16:]} image "
                      f"…{(d['sop_instance_uid'] or '')[-16:]} {d['label']}: production "
                      f"{d['production']} ({d['production_score']:.3f}), shadow {d['shadow']} "
                      f"({d['shadow_score']:.3f})", soft_wrap=True)
    console.print(f"plot: {summary['plot']}", soft_wrap=True)
