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
from lightbox.errors import ManifestError, ModelNotFoundError
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


def promote(session: Session, name: str, version: str) -> Model:
    """Make ``version`` the production model of ``name``; the previous production one retires."""
    row = _get(session, name, version)
    if row is None:
        raise ModelNotFoundError(f"no registered model {name} {version}")
    _make_production(session, row)
    return row


def retire(session: Session, name: str, version: str) -> Model:
    """Take a version out of service. Retiring the production version leaves the name with no
    production model: new studies for it are recorded as unrouted until another is promoted;
    jobs already dispatched to it still run (the bundle stays on disk)."""
    row = _get(session, name, version)
    if row is None:
        raise ModelNotFoundError(f"no registered model {name} {version}")
    if row.stage != ModelStage.retired:
        previous = row.stage.value
        row.stage = ModelStage.retired
        _event(session, "model_retired", row, previous_stage=previous)
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


def _make_production(session: Session, row: Model) -> None:
    """Row-lock the current production version(s) (PostgreSQL) so that two concurrent
    promotions cannot both leave a production row behind."""
    current = session.scalars(
        select(Model)
        .where(Model.name == row.name, Model.stage == ModelStage.production, Model.id != row.id)
        .with_for_update()
    ).all()
    for old in current:
        old.stage = ModelStage.retired
    if row.stage != ModelStage.production or current:
        row.stage = ModelStage.production
        _event(session, "model_promoted", row, retired=[old.version for old in current])
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
