"""Series-level routing (scheduler/scheduling/route.py ``select: series``): ranges, contains, the chosen
series recorded on the job (db.volume_tables.JobSeries), the unrouted reason that says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Event, Job, Model, ModelStage, Priority, Study, StudyStatus
from db.session import session_scope
from db.volume_tables import JobSeries
from lightbox.settings import Settings
from lightbox.synthetic import write_ct_study
from lightbox.synthetic_volume import make_phantom, write_series
from scheduler.ingest.folder import ingest_paths
from scheduler.scheduling.dispatch import PassReport, dispatch_ready
from scheduler.scheduling.route import Route, load_rules, route_study, unmatched_reason

RULES = """
rules:
  - name: ct-volume
    select: series
    match: {Modality: [CT]}
    contains: {ImageType: [ORIGINAL, AXIAL]}
    range: {SliceThickness: [0.5, 5.0], Slices: [16, null]}
    models: [ct-lesion]
"""


def _tags(uid: str, slices: int, thickness: str = "2.5",
          image_type: list[str] | None = None, modality: str = "CT") -> dict[str, object]:
    return {"Modality": modality, "SliceThickness": thickness, "SeriesInstanceUID": uid,
            "Slices": slices, "Instances": slices,
            "ImageType": image_type or ["ORIGINAL", "PRIMARY", "AXIAL"]}


@pytest.fixture
def rules(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return load_rules(path)


def test_series_rule_chooses_the_largest_matching_series(rules) -> None:  # type: ignore[no-untyped-def]
    series = [_tags("1.1", 40), _tags("1.2", 120), _tags("1.3", 300, thickness="10"),
              _tags("1.4", 500, image_type=["DERIVED", "SECONDARY", "AXIAL"]),
              _tags("1.5", 900, modality="MR")]
    assert route_study(rules, series) == [Route("ct-lesion", Priority.routine, "ct-volume", "1.2")]
    # A tie on slices goes to the thinner series.
    assert route_study(rules, [_tags("2.1", 40, "3"), _tags("2.2", 40, "1")])[0] \
        .series_instance_uid == "2.2"


@pytest.mark.parametrize("tags, why", [
    (_tags("3.1", 10), "Slices 10 outside 16.."),
    (_tags("3.2", 40, thickness="7.5"), "SliceThickness 7.5 outside 0.5..5"),
    (_tags("3.3", 40, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"]), "ImageType lacks AXIAL"),
    ({**_tags("3.4", 40), "SliceThickness": ""}, "no numeric SliceThickness"),
])
def test_unmatched_series_say_why(rules, tags, why) -> None:  # type: ignore[no-untyped-def]
    assert route_study(rules, [tags]) == []
    reason = unmatched_reason(rules, [tags])
    assert reason.startswith("no routing rule matched") and why in reason
    assert tags["SeriesInstanceUID"] in reason


def test_default_rules_route_thin_axial_ct_series_only() -> None:
    rules = load_rules()
    assert [r.model for r in route_study(rules, [_tags("4.1", 64)])] == [
        "ct-lesion", "ct-lesion-present"]
    assert route_study(rules, [_tags("4.2", 1)]) == []  # the demo's one-slice CT


@pytest.mark.parametrize("bad", ["range: {Slices: 5}", "select: instance"])
def test_invalid_series_rule_is_a_configuration_error(tmp_path: Path, bad: str) -> None:
    from lightbox.errors import ConfigurationError
    path = tmp_path / "rules.yaml"
    path.write_text(f"rules:\n  - name: x\n    models: [m]\n    {bad}\n")
    with pytest.raises(ConfigurationError):
        load_rules(path)


def test_dispatch_records_the_chosen_series_on_the_job(tmp_path: Path, rules) -> None:  # type: ignore[no-untyped-def]
    """Real files: a 20-slice CT series (shuffled), a 4-slice CT series of the same study and a
    one-slice CT study; registered, routed by their stored tags, the job keeps its series."""
    settings = Settings(data_dir=tmp_path / "data", quiet_seconds=0)
    upgrade(settings.sqlalchemy_url)
    hu = make_phantom((20, 16, 16), lesions=0).hu
    paths = write_series(hu, tmp_path / "in" / "big", shuffle_seed=3)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    big_series = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    write_series(hu[:4], tmp_path / "in" / "small", study_uid=study_uid)
    one_slice = write_ct_study(tmp_path / "in" / "one")
    thick = write_series(np.zeros((20, 8, 8), np.float32), tmp_path / "in" / "thick",
                         spacing=(1, 1, 10))
    thick_study = str(pydicom.dcmread(thick[0], stop_before_pixels=True).StudyInstanceUID)
    for path in thick:
        ds = pydicom.dcmread(path)
        ds.SliceThickness = "10"
        ds.save_as(path)
    assert ingest_paths(settings, [tmp_path / "in"]) == {"registered": 45}
    with session_scope(settings.sqlalchemy_url) as session:
        session.add(Model(name="ct-lesion", version="1", stage=ModelStage.production,
                          bundle_path=str(tmp_path), manifest={}))
    report = PassReport()
    dispatch_ready(settings, rules, report)
    assert report.studies_dispatched == 1 and report.studies_unrouted == 2
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.scalars(select(Job).join(Study)
                              .where(Study.study_instance_uid == study_uid)).one()
        chosen = session.get(JobSeries, job.id)
        assert chosen is not None and chosen.series_instance_uid == big_series
        assert chosen.rule == "ct-volume"
        reasons = {e.study_instance_uid: e.detail["reason"] for e in session.scalars(
            select(Event).where(Event.kind == "study_unrouted"))}
        assert reasons[one_slice].startswith("no routing rule matched")
        assert "Slices 1 outside 16.." in reasons[one_slice]
        assert "SliceThickness 10 outside 0.5..5" in reasons[thick_study]
        statuses = set(session.scalars(select(Study.status)))
        assert statuses == {StudyStatus.dispatched, StudyStatus.unrouted}
