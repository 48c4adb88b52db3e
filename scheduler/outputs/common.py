"""What every Lightbox result object shares: who made it, and where its series sit."""

from __future__ import annotations

from dataclasses import dataclass

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
