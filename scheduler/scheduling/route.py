"""Routing: rules on DICOM tags choose the models for a study.

Rules come from a YAML file (``LIGHTBOX_RULES_FILE``; the packaged default routes chest CR/DX
to the ``chest`` model).

A rule with ``priority: stat`` and no ``models`` is a STAT rule: it routes nothing itself but
makes every route of a study it matches STAT. STAT can be decided by the sender (the pseudo-tag
``CallingAETitle``, from ``Instance.source = "scp:<AE>"``), by any routing tag, or by the
requested priority (``RequestedProcedurePriority``: STAT, HIGH).

Series-level rules (``select: series``) route a study to a *volume* model through one chosen
series: besides ``match`` they may require numeric ranges (``range: {SliceThickness: [0.5, 5],
Slices: [16, null]}``, bounds inclusive, null open) and values that must all be present in a
multi-valued tag (``contains: {ImageType: [ORIGINAL, AXIAL]}``). Of the series that match, the
one with the most slices is chosen (thinner SliceThickness breaks a tie); the job records it.
Pseudo-tags filled by dispatch: ``Instances`` (instances in the series), ``Slices`` (instances ×
NumberOfFrames: an Enhanced CT/MR counts its frames), ``SeriesInstanceUID``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
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
    # Series-level rules: the job runs on one chosen series (volume models).
    select_series: bool = False
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    contains: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def matches(self, tags: dict[str, Any]) -> bool:
        return self.mismatch(tags) is None

    def mismatch(self, tags: dict[str, Any]) -> str | None:
        """Why ``tags`` do not match (the first condition that fails), or None when they do."""
        for keyword, (low, high) in self.ranges.items():
            number = _number(tags.get(keyword))
            if number is None:
                return f"no numeric {keyword}"
            if (low is not None and number < low) or (high is not None and number > high):
                return f"{keyword} {number:g} outside {_bound(low)}..{_bound(high)}"
        for keyword, required in self.contains.items():
            value = tags.get(keyword)
            have = {str(v).strip().upper() for v in (value if isinstance(value, list)
                                                     else str(value or "").split("\\"))}
            missing = [r for r in required if r.upper() not in have]
            if missing:
                return f"{keyword} lacks {', '.join(missing)}"
        for keyword, patterns in self.match.items():
            value = tags.get(keyword)
            values = [str(v) for v in value] if isinstance(value, list) else [str(value or "")]
            if not any(
                fnmatch.fnmatchcase(v.strip().upper(), p.upper()) for v in values for p in patterns
            ):
                return f"{keyword} does not match"
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _bound(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


@dataclass(frozen=True)
class Route:
    model: str
    priority: Priority
    rule: str
    # Series-level rules: the series the volume model runs on.
    series_instance_uid: str | None = None


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
            select = str(raw.get("select", "study"))
            if select not in ("study", "series"):
                raise ValueError(f"rule {raw['name']}: select must be study or series")
            ranges = {}
            for keyword, bounds in (raw.get("range") or {}).items():
                low, high = bounds
                ranges[str(keyword)] = (None if low is None else float(low),
                                        None if high is None else float(high))
            contains = {str(k): tuple(str(v) for v in (vals if isinstance(vals, list)
                                                       else [vals]))
                        for k, vals in (raw.get("contains") or {}).items()}
            rules.append(Rule(name=str(raw["name"]), match=match, models=models,
                              priority=priority,
                              export=None if raw.get("export") is None
                              else tuple(str(d) for d in raw["export"]),
                              select_series=select == "series", ranges=ranges,
                              contains=contains))
        return rules
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"invalid routing rules {path}: {exc}") from exc


def route_study(rules: list[Rule], series_tags: list[dict[str, Any]]) -> list[Route]:
    """Models for a study whose series carry ``series_tags``; STAT wins if two rules agree."""
    chosen: dict[str, Route] = {}
    escalate = [rule.name for rule in rules if not rule.models and rule.priority == Priority.stat
                and any(rule.matches(tags) for tags in series_tags)]
    for rule in rules:
        matching = [tags for tags in series_tags if rule.matches(tags)]
        if matching:
            series = _choose_series(matching) if rule.select_series else None
            for model in rule.models:
                previous = chosen.get(model)
                if previous is None or (rule.priority == Priority.stat
                                        and previous.priority != Priority.stat):
                    chosen[model] = Route(model, rule.priority, rule.name, series)
    if escalate:
        chosen = {m: Route(m, Priority.stat, f"{r.rule}+{escalate[0]}", r.series_instance_uid)
                  if r.priority != Priority.stat else r for m, r in chosen.items()}
    return list(chosen.values())


def _choose_series(matching: list[dict[str, Any]]) -> str | None:
    """The series a volume model runs on: most slices, then thinnest slices, then UID."""
    best = max(matching, key=lambda t: (_number(t.get("Slices")) or 0.0,
                                        -(_number(t.get("SliceThickness")) or 0.0),
                                        str(t.get("SeriesInstanceUID", ""))))
    uid = best.get("SeriesInstanceUID")
    return str(uid) if uid else None


def unmatched_reason(rules: list[Rule], series_tags: list[dict[str, Any]]) -> str:
    """The unrouted reason: as before, plus why each series-level rule whose plain ``match``
    held still did not take a series (so "CT with 10 mm slices" is visible, not guessed)."""
    details = []
    for rule in rules:
        if not rule.select_series:
            continue
        plain = Rule(name=rule.name, match=rule.match, models=rule.models)
        for tags in series_tags:
            if plain.matches(tags):
                why = rule.mismatch(tags)
                if why:
                    details.append(f"{rule.name}: series {tags.get('SeriesInstanceUID', '?')} "
                                   f"{why}")
    return "no routing rule matched" + (f" ({'; '.join(details[:5])})" if details else "")
