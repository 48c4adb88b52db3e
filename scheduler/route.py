"""Routing: rules on DICOM tags choose the models for a study.

Rules come from a YAML file (``LIGHTBOX_RULES_FILE``; the packaged default routes chest CR/DX
to the ``chest`` model).

A rule with ``priority: stat`` and no ``models`` is a STAT rule: it routes nothing itself but
makes every route of a study it matches STAT. STAT can be decided by the sender (the pseudo-tag
``CallingAETitle``, from ``Instance.source = "scp:<AE>"``), by any routing tag, or by the
requested priority (``RequestedProcedurePriority``: STAT, HIGH).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from db.models import Priority
from lightbox.errors import ConfigurationError

DEFAULT_RULES = Path(__file__).with_name("rules_default.yaml")


@dataclass(frozen=True)
class Rule:
    name: str
    match: dict[str, tuple[str, ...]]
    models: tuple[str, ...]
    priority: Priority = Priority.routine
    # Export destinations (names) for results of studies this rule routes; None: all (PACS).
    export: tuple[str, ...] | None = None

    def matches(self, tags: dict[str, Any]) -> bool:
        for keyword, patterns in self.match.items():
            value = tags.get(keyword)
            values = [str(v) for v in value] if isinstance(value, list) else [str(value or "")]
            if not any(
                fnmatch.fnmatchcase(v.strip().upper(), p.upper()) for v in values for p in patterns
            ):
                return False
        return True


@dataclass(frozen=True)
class Route:
    model: str
    priority: Priority
    rule: str


def load_rules(path: Path | None = None) -> list[Rule]:
    path = path or DEFAULT_RULES
    try:
        doc = yaml.safe_load(path.read_text()) or {}
        rules = []
        for raw in doc.get("rules", []):
            match = {
                str(k): tuple(str(v) for v in (vals if isinstance(vals, list) else [vals]))
                for k, vals in (raw.get("match") or {}).items()
            }
            priority = Priority(raw.get("priority", "routine"))
            models = tuple(str(m) for m in (raw["models"] if priority != Priority.stat
                                            else raw.get("models") or []))
            rules.append(Rule(name=str(raw["name"]), match=match, models=models,
                              priority=priority,
                              export=None if raw.get("export") is None
                              else tuple(str(d) for d in raw["export"])))
        return rules
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"invalid routing rules {path}: {exc}") from exc


def route_study(rules: list[Rule], series_tags: list[dict[str, Any]]) -> list[Route]:
    """Models for a study whose series carry ``series_tags``; STAT wins if two rules agree."""
    chosen: dict[str, Route] = {}
    escalate = [rule.name for rule in rules if not rule.models and rule.priority == Priority.stat
                and any(rule.matches(tags) for tags in series_tags)]
    for rule in rules:
        if any(rule.matches(tags) for tags in series_tags):
            for model in rule.models:
                previous = chosen.get(model)
                if previous is None or (rule.priority == Priority.stat
                                        and previous.priority != Priority.stat):
                    chosen[model] = Route(model, rule.priority, rule.name)
    if escalate:
        chosen = {m: Route(m, Priority.stat, f"{r.rule}+{escalate[0]}") if r.priority != Priority.stat
                  else r for m, r in chosen.items()}
    return list(chosen.values())
