"""Rendering rows for people (rich tables) and for scripts (JSON, CSV)."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float):
        return round(value, 6)
    return value


def to_json(data: Any) -> str:
    return json.dumps(data, default=_plain, indent=2)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: to_csv_row_plain(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def _result(row: dict[str, Any]) -> str:
    """POSITIVE / negative; a multiclass row says which class, or that it is undecided."""
    if row.get("indeterminate"):
        return "[yellow]indeterminate[/yellow]"
    if row.get("positive"):
        return "[red]POSITIVE[/red]"
    if row.get("predicted_class"):
        return f"[green]{row['predicted_class']} (no finding)[/green]"
    return "[green]negative[/green]"


def to_csv_row_plain(value: Any) -> Any:
    """CSV cells: nested values (a class distribution) as JSON."""
    return json.dumps(value) if isinstance(value, dict) else _plain(value)


def findings_table(rows: list[dict[str, Any]], title: str = "Findings") -> Table:
    table = Table(title=title)
    for column in ("study", "SOP instance", "model", "label", "score", "threshold", "result",
                   "synthetic"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            "…" + row["study_instance_uid"][-10:],
            "…" + (row["sop_instance_uid"] or "(study)")[-10:],
            f"{row['model']}@{row['model_version'][:15]}",
            row["label"],
            f"{row['score']:.3f}",
            f"{row['threshold']:.3f}",
            _result(row),
            "[yellow]SYNTHETIC[/yellow]" if row.get("synthetic") else "",
        )
    return table


def print_rows(console: Console, rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        print(to_json(rows))
    elif fmt == "csv":
        print(to_csv(rows), end="")
    else:
        console.print(findings_table(rows))


def series_findings_table(rows: list[dict[str, Any]], title: str = "Series findings") -> Table:
    """Series-level findings of volume models: score, and what the mask measures."""
    table = Table(title=title)
    for column in ("study", "series", "model", "label", "score", "result", "lesions", "mL",
                   "largest mm", "centroid (LPS mm)"):
        table.add_column(column, no_wrap=True)

    def number(value: Any, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    for row in rows:
        centroid = ("" if row["centroid_x"] is None else
                    f"{row['centroid_x']:.1f}, {row['centroid_y']:.1f}, {row['centroid_z']:.1f}")
        table.add_row(
            "…" + row["study_instance_uid"][-10:], "…" + row["series_instance_uid"][-10:],
            f"{row['model']}@{row['model_version'][:15]}", row["label"], f"{row['score']:.3f}",
            "[red]POSITIVE[/red]" if row["positive"] else "[green]negative[/green]",
            "" if row["lesion_count"] is None else str(row["lesion_count"]),
            number(row["volume_ml"], 2), number(row["largest_diameter_mm"], 1), centroid)
    return table
