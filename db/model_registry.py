"""The model registry: which bundle versions exist and which one serves each model name.

Imported by workers, so no torch here. A version enters as ``staging`` after its bundle verifies;
promoting it makes it ``production`` and retires the version it replaces, in one transaction, so
a name never has two production versions. Running workers need no restart: the scheduler binds
each new job to the production row at dispatch, and workers load whichever row a job names.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Event, Model, ModelStage
from lightbox.errors import ManifestError, ModelNotFoundError, PromotionRefused
from lightbox.manifest import load_manifest
from lightbox.roots import to_models
from lightbox.settings import get_settings


def register_bundle(session: Session, bundle_dir: Path, promote: bool = False) -> Model:
    """Verify the bundle (every file against its sha256) and record it as a staging version.

    Registering the same bundle again is a no-op (returns the existing row); registering it
    after files were added to it (``lightbox compile``) updates the stored manifest; a bundle
    whose already registered files changed is refused.
    """
    bundle_dir = Path(bundle_dir).resolve()
    manifest = load_manifest(bundle_dir, verify=True)
    data = manifest.model_dump(mode="json")
    row = _get(session, manifest.name, manifest.version)
    if row is not None and row.manifest != data:
        old_files: dict[str, str] = row.manifest.get("files", {})
        derived = _derived_files(row.manifest) | _derived_files(data)
        if any(data["files"].get(name) != digest for name, digest in old_files.items()
               if name not in derived):
            raise ManifestError(
                f"{manifest.name} {manifest.version} is already registered with different files"
            )
        # Files were only added, or compiled forms rebuilt (`lightbox compile`).
        row.manifest = data
        _event(session, "model_updated", row,
               added=sorted(set(data["files"]) - set(old_files)))
    if row is None:
        row = Model(name=manifest.name, version=manifest.version, stage=ModelStage.staging,
                    bundle_path=to_models(get_settings(), bundle_dir), manifest=data)
        session.add(row)
        session.flush()
        _event(session, "model_registered", row, bundle_path=row.bundle_path)
    if promote:
        _make_production(session, row)
    return row


def promote(session: Session, name: str, version: str, *,
            comparison: dict[str, object] | None = None, force: bool = False,
            reason: str | None = None, actor: str | None = None) -> Model:
    """Make ``version`` the production model of ``name``; the previous production one retires.

    ``comparison`` (from ``trainer.evaluate.compare``: ``metric``, ``candidate``,
    ``production``, ``evaluation``) decides: a candidate that scores lower than production is
    refused (:class:`PromotionRefused`) unless ``force`` with a ``reason``. Every promotion is
    an audit event naming who (``actor``: the API token's name or the OS user), why, and the
    metrics compared."""
    row = _get(session, name, version)
    if row is None:
        raise ModelNotFoundError(f"no registered model {name} {version}")
    if force and not (reason or "").strip():
        raise PromotionRefused("--force needs a --reason (it goes into the audit log)")
    worse = comparison is not None and _worse(comparison)
    if worse and not force:
        assert comparison is not None
        if comparison.get("comparable") is False:
            why = f"cannot be compared with production: {comparison.get('evaluation')}"
        else:
            why = (f"scores {comparison['metric']} {comparison['candidate']:.4f} on "
                   f"{comparison.get('evaluation', 'the held-out set')}, production "
                   f"{comparison.get('production_version')} scores "
                   f"{comparison['production']:.4f}")
        raise PromotionRefused(f"{name} {version} {why}: refused (use --force --reason to "
                               "promote anyway)", comparison)
    _make_production(session, row, audit={
        "actor": actor or "unknown", "reason": reason, "forced": bool(force and worse),
        "comparison": comparison})
    return row


def _worse(comparison: dict[str, object]) -> bool:
    """Lower on the metric, or not comparable at all (different tasks or labels)."""
    if comparison.get("comparable") is False:
        return True
    candidate, production = comparison.get("candidate"), comparison.get("production")
    if not isinstance(candidate, int | float) or not isinstance(production, int | float):
        return False
    return float(candidate) < float(production)


def set_shadow(session: Session, name: str, version: str, *, actor: str | None = None,
               reason: str | None = None, on: bool = True) -> Model:
    """Run a staging ``version`` beside production on every job of ``name`` (its findings are
    flagged shadow and never exported); one shadow version per name, so a new one replaces the
    previous. ``on=False`` stops it."""
    row = _get(session, name, version)
    if row is None:
        raise ModelNotFoundError(f"no registered model {name} {version}")
    if on and row.stage != ModelStage.staging:
        raise ManifestError(f"{name} {version} is {row.stage.value}: only a staging version can "
                            "run in shadow mode")
    if on:
        for other in session.scalars(select(Model).where(
                Model.name == name, Model.shadow.is_(True), Model.id != row.id)):
            other.shadow = False
            _event(session, "model_shadow_stopped", other, actor=actor or "unknown",
                   reason=f"replaced by {version}")
    if row.shadow != on:
        row.shadow = on
        _event(session, "model_shadow_started" if on else "model_shadow_stopped", row,
               actor=actor or "unknown", reason=reason)
    session.flush()
    return row


def shadow_model(session: Session, name: str) -> Model | None:
    """The staging version of ``name`` running in shadow mode, if any."""
    return session.scalars(select(Model).where(
        Model.name == name, Model.shadow.is_(True), Model.stage == ModelStage.staging)).first()


def retire(session: Session, name: str, version: str, *, actor: str | None = None,
           reason: str | None = None) -> Model:
    """Take a version out of service. Retiring the production version leaves the name with no
    production model: new studies for it are recorded as unrouted until another is promoted;
    jobs already dispatched to it still run (the bundle stays on disk)."""
    row = _get(session, name, version)
    if row is None:
        raise ModelNotFoundError(f"no registered model {name} {version}")
    if row.stage != ModelStage.retired:
        previous = row.stage.value
        row.stage = ModelStage.retired
        row.shadow = False
        _event(session, "model_retired", row, previous_stage=previous, actor=actor or "unknown",
               reason=reason)
        session.flush()
    return row


def get_model(session: Session, name: str, version: str) -> Model:
    row = _get(session, name, version)
    if row is None:
        raise ModelNotFoundError(f"no registered model {name} {version}")
    return row


def find_by_bundle(session: Session, bundle_dir: Path) -> Model | None:
    """The registered version whose bundle is ``bundle_dir``, if any."""
    return session.scalars(
        select(Model).where(Model.bundle_path.in_(
            {to_models(get_settings(), bundle_dir), str(Path(bundle_dir).resolve())}))
    ).first()


def production_model(session: Session, name: str) -> Model | None:
    """The version of ``name`` that new jobs should use, if any."""
    return session.scalars(
        select(Model).where(Model.name == name, Model.stage == ModelStage.production)
        .order_by(Model.id.desc()).limit(1)
    ).first()


def list_models(session: Session) -> list[Model]:
    """Every registered version, by name, oldest first."""
    return list(session.scalars(select(Model).order_by(Model.name, Model.id)))


def _make_production(session: Session, row: Model,
                     audit: dict[str, object] | None = None) -> None:
    """Row-lock the current production version(s) (PostgreSQL) so that two concurrent
    promotions cannot both leave a production row behind."""
    audit = audit or {}
    current = session.scalars(
        select(Model)
        .where(Model.name == row.name, Model.stage == ModelStage.production, Model.id != row.id)
        .with_for_update()
    ).all()
    for old in current:
        old.stage = ModelStage.retired
        old.shadow = False
        _event(session, "model_retired", old, previous_stage="production",
               actor=audit.get("actor", "unknown"), reason=f"replaced by {row.version}")
    if row.stage != ModelStage.production or current:
        row.stage = ModelStage.production
        row.shadow = False
        _event(session, "model_promoted", row, retired=[old.version for old in current],
               **audit)
    session.flush()


def _derived_files(manifest: dict) -> set[str]:  # type: ignore[type-arg]
    """Files `lightbox compile` may rebuild: the INT8 model, engines, calibration cache. The
    trained model and everything else must never change under a registered version."""
    variants = manifest.get("variants") or {}
    files = {str(v.get("file")) for v in variants.values() if isinstance(v, dict)}
    engines = manifest.get("engines") or {}
    return files | set(engines) | {str(e.get("calibration_cache")) for e in engines.values()
                                   if isinstance(e, dict) and e.get("calibration_cache")}


def _get(session: Session, name: str, version: str) -> Model | None:
    return session.scalars(
        select(Model).where(Model.name == name, Model.version == version)
    ).first()


def _event(session: Session, kind: str, row: Model, **detail: object) -> None:
    session.add(Event(kind=kind, detail={"name": row.name, "version": row.version, **detail}))
