"""What every Lightbox result object shares: who made it, and where its series sit."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from lightbox.errors import OutputBuildError

MANUFACTURER = "Lightbox"
# Series numbers far from a modality's own, so results sort after the images in a viewer.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


@dataclass(frozen=True)
class ModelInfo:
    """The model whose output a result object carries (name and version go into every object)."""

    name: str
    version: str
    # Trained on SYNTHETIC data: every object says it is not for clinical use.
    synthetic: bool = False

    @property
    def description(self) -> str:
        return f"{self.name} {self.version}"[:64]


@dataclass(frozen=True)
class FindingItem:
    """One finding row as the writers need it (``sop_instance_uid`` None: study level)."""

    label: str
    score: float
    threshold: float
    positive: bool
    sop_instance_uid: str | None = None
    # Multiclass (softmax) rows: every class's probability, and whether the top probability was
    # below the model's confident threshold. ``positive`` is False for the background class.
    distribution: dict[str, float] | None = None
    indeterminate: bool = False


# Type 2 attributes of the Patient and General Study modules that highdicom copies into every
# result object: real modalities leave some out (no PatientSex, no StudyID), so they are
# written present and empty, as Type 2 allows, rather than failing the export.
TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                     "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                     "AccessionNumber")


def complete_source(source: Dataset) -> Dataset:
    """A copy of ``source``'s top level (elements shared, the source untouched) with every
    Type 2 attribute above present (empty where missing) and single-valued (a multi-valued
    PatientName keeps its first value: the module allows one)."""
    copy = Dataset()
    copy.update(source)
    for attr in ("file_meta", "preamble"):
        value = getattr(source, attr, None)
        if value is not None:
            setattr(copy, attr, value)
    for keyword in TYPE2_FROM_SOURCE:
        value = source.get(keyword)
        if value is None:
            setattr(copy, keyword, "")
        elif isinstance(value, MultiValue):
            setattr(copy, keyword, value[0] if len(value) else "")
    return copy


T = TypeVar("T")


@contextmanager
def naming_the_attribute(what: str) -> Iterator[None]:
    """Turn a failure inside highdicom/pydicom into :class:`OutputBuildError` naming the source
    attribute (from the error), not its value."""
    try:
        yield
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise OutputBuildError(f"cannot build the {what}: {_culprit(exc)}") from exc


def _culprit(exc: Exception) -> str:
    name = getattr(exc, "name", None)
    if isinstance(exc, AttributeError) and name:
        return f"source attribute {name} missing or unusable ({type(exc).__name__})"
    match = re.search(r"""(?:attribute|keyword|element) ['"<]?([A-Z][A-Za-z0-9]+)""", str(exc))
    if match:
        return f"source attribute {match.group(1)} ({type(exc).__name__})"
    return f"{type(exc).__name__} (attribute not named by the library)"  # its text may be PHI


def build_with(what: str, build: Callable[[], T]) -> T:
    with naming_the_attribute(what):
        return build()
