"""Routing rules (scheduler.scheduling.route): the packaged default and custom YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Priority, Series, Study
from db.session import session_scope
from lightbox.errors import ConfigurationError
from lightbox.settings import Settings
from lightbox.synthetic import real_chest_crs, write_ct_study
from scheduler.ingest.folder import ingest_paths
from scheduler.scheduling.route import DEFAULT_RULES, Route, Rule, load_rules, route_study


@pytest.fixture(scope="module")
def default_rules() -> list[Rule]:
    return load_rules()


def rules_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "tags",
    [
        {"Modality": "CR", "BodyPartExamined": "CHEST"},
        {"Modality": "DX", "BodyPartExamined": "CHEST"},
        {"Modality": "dx", "BodyPartExamined": "chest"},  # case-insensitive
        {"Modality": "CR", "BodyPartExamined": " Thorax "},  # padded value
        {"Modality": "DX", "BodyPartExamined": "LUNG"},  # wildcard LUNG*
        {"Modality": "CR", "BodyPartExamined": "lungs"},
        {"Modality": "CR", "BodyPartExamined": "LUNG LEFT", "ViewPosition": "PA"},
    ],
)
def test_default_rules_route_chest_radiographs(default_rules: list[Rule],
                                               tags: dict[str, str]) -> None:
    assert route_study(default_rules, [tags]) == [
        Route("chest", Priority.routine, "chest-radiograph")]


@pytest.mark.parametrize(
    "tags",
    [
        {"Modality": "CT", "BodyPartExamined": "CHEST"},  # CT is not a radiograph
        {"Modality": "MR", "BodyPartExamined": "LUNG"},
        {"Modality": "CR", "BodyPartExamined": "HAND"},
        {"Modality": "CR", "BodyPartExamined": "XLUNG"},  # wildcard only at the end
        {"Modality": "CR"},  # no body part: not known to be a chest
        {"BodyPartExamined": "CHEST"},
        {},
    ],
)
def test_default_rules_do_not_route_other_studies(default_rules: list[Rule],
                                                  tags: dict[str, str]) -> None:
    assert route_study(default_rules, [tags]) == []


def test_one_matching_series_routes_the_study(default_rules: list[Rule]) -> None:
    series = [{"Modality": "CT", "BodyPartExamined": "CHEST"},
              {"Modality": "DX", "BodyPartExamined": "CHEST"}]
    assert [r.model for r in route_study(default_rules, series)] == ["chest"]
    assert route_study(default_rules, []) == []


def test_packaged_default_file_is_used_without_a_path() -> None:
    assert DEFAULT_RULES.is_file()
    assert load_rules() == load_rules(DEFAULT_RULES)
    assert [(r.name, r.models, r.priority.value) for r in load_rules()] == [
        ("chest-radiograph", ("chest",), "routine"),
        ("ct-volume", ("ct-lesion", "ct-lesion-present"), "routine"),
        ("requested-stat", (), "stat")]


PRIORITY_RULES = """
rules:
  - {name: chest, match: {Modality: [CR, DX]}, models: [chest]}
  - {name: emergency-ae, match: {CallingAETitle: ["ED_*"]}, priority: stat}
  - {name: stat-description, match: {StudyDescription: "*STAT*"}, priority: stat}
  - {name: requested, match: {RequestedProcedurePriority: [STAT, HIGH]}, priority: stat}
"""


@pytest.mark.parametrize(("tags", "priority"), [
    ({"Modality": "CR"}, Priority.routine),
    ({"Modality": "CR", "CallingAETitle": ["ED_CR1"]}, Priority.stat),
    ({"Modality": "CR", "CallingAETitle": ["RAD_CR1"]}, Priority.routine),
    ({"Modality": "CR", "StudyDescription": "XR CHEST STAT"}, Priority.stat),
    ({"Modality": "CR", "RequestedProcedurePriority": "HIGH"}, Priority.stat),
    ({"Modality": "CR", "RequestedProcedurePriority": "ROUTINE"}, Priority.routine),
])
def test_stat_rules_escalate_by_ae_title_tag_or_requested_priority(
        tmp_path: Path, tags: dict[str, object], priority: Priority) -> None:
    rules = load_rules(rules_file(tmp_path, PRIORITY_RULES))
    [route] = route_study(rules, [tags])
    assert (route.model, route.priority) == ("chest", priority)


def test_stat_rule_alone_routes_nothing(tmp_path: Path) -> None:
    rules = load_rules(rules_file(tmp_path, PRIORITY_RULES))
    assert route_study(rules, [{"Modality": "CT", "CallingAETitle": ["ED_CT"]}]) == []


def test_routine_rule_without_models_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        load_rules(rules_file(tmp_path, "rules:\n  - {name: x, match: {Modality: CR}}\n"))


STAT_RULES = """
rules:
  - name: {first}
    match: {{Modality: [CR, DX]}}
    models: [chest, {first_extra}]
    priority: {first_priority}
  - name: {second}
    match: {{Modality: DX, ImageType: "DERIVED"}}
    models: [chest]
    priority: {second_priority}
"""


@pytest.mark.parametrize("stat_first", [False, True])
def test_stat_wins_when_two_rules_name_the_same_model(tmp_path: Path, stat_first: bool) -> None:
    names = ("urgent", "ordinary") if stat_first else ("ordinary", "urgent")
    priorities = ("stat", "routine") if stat_first else ("routine", "stat")
    rules = load_rules(rules_file(tmp_path, STAT_RULES.format(
        first=names[0], second=names[1], first_extra="triage",
        first_priority=priorities[0], second_priority=priorities[1])))
    # Multi-valued tags (ImageType) match when any value matches.
    tags = {"Modality": "DX", "ImageType": ["DERIVED", "PRIMARY"]}

    routes = {r.model: r for r in route_study(rules, [tags])}

    assert routes["chest"] == Route("chest", Priority.stat, "urgent")
    assert routes["triage"].priority is Priority(priorities[0])
    assert len(routes) == 2
    # Only the first rule matches an ORIGINAL image: its own priority applies.
    only_first = {r.model: r for r in route_study(
        rules, [{"Modality": "DX", "ImageType": ["ORIGINAL", "PRIMARY"]}])}
    assert only_first["chest"].priority is Priority(priorities[0])


@pytest.mark.parametrize(
    "text",
    [
        "rules:\n  - name: broken\n    match: {Modality: [CR\n",  # YAML syntax error
        "rules:\n\t- name: tab\n",  # tabs are not YAML indentation
        "rules:\n  - match: {Modality: CR}\n    models: [chest]\n",  # no name
        "rules:\n  - name: x\n    match: {Modality: CR}\n",  # no models
        "rules:\n  - name: x\n    models: [chest]\n    priority: urgent\n",  # no such priority
    ],
)
def test_invalid_rules_file_raises_configuration_error(tmp_path: Path, text: str) -> None:
    path = rules_file(tmp_path, text)
    with pytest.raises(ConfigurationError, match="invalid routing rules"):
        load_rules(path)


def test_missing_rules_file_raises_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        load_rules(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["rules:\n  - just-a-string\n", "- a list at the top\n"])
def test_rules_that_are_not_mappings_raise_configuration_error(tmp_path: Path,
                                                               text: str) -> None:
    with pytest.raises(ConfigurationError):
        load_rules(rules_file(tmp_path, text))


def test_registered_studies_route_by_their_stored_tags(tmp_path: Path,
                                                       default_rules: list[Rule]) -> None:
    """Tags go from real files through registration into Series.tags and route from there."""
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings.sqlalchemy_url)
    chest_uid, _ = real_chest_crs(tmp_path / "in" / "chest")
    ct_uid = write_ct_study(tmp_path / "in" / "ct")
    assert ingest_paths(settings, [tmp_path / "in"]) == {"registered": 3}

    with session_scope(settings.sqlalchemy_url) as session:
        tags_by_study: dict[str, list[dict[str, object]]] = {}
        for study_uid, tags in session.execute(
                select(Study.study_instance_uid, Series.tags).join(Series)):
            tags_by_study.setdefault(study_uid, []).append(tags)

    assert [r.model for r in route_study(default_rules, tags_by_study[chest_uid])] == ["chest"]
    assert route_study(default_rules, tags_by_study[ct_uid]) == []
