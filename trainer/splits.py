"""Patient-level, stratified, seeded splits and the class-balance report.

A patient's images all go to one split, otherwise validation scores an image whose twin the
model trained on and the metrics lie. Patients are stratified by their label pattern (the
maximum target over their images), so each split keeps the class balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    """Image indices per split (sorted)."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def items(self) -> list[tuple[str, np.ndarray]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


def patient_split(
    patients: np.ndarray, y: np.ndarray, *, val_fraction: float, test_fraction: float = 0.0,
    seed: int = 0,
) -> Split:
    """Assign whole patients to train/validation/test, stratified by label pattern."""
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 - val_fraction:
        raise ValueError(f"bad split fractions: validation {val_fraction}, test {test_fraction}")
    patients = np.asarray(patients)
    y = np.asarray(y).reshape(len(patients), -1)
    unique, inverse = np.unique(patients, return_inverse=True)
    pattern = np.zeros((len(unique), y.shape[1]), np.float32)
    np.maximum.at(pattern, inverse, y)
    strata = ["".join("1" if v > 0.5 else "0" for v in row) for row in pattern]
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(unique), np.int8)  # 0 train, 1 validation, 2 test
    for stratum in sorted(set(strata)):
        members = rng.permutation(np.flatnonzero(np.asarray(strata) == stratum))
        n_val = int(round(len(members) * val_fraction))
        n_test = int(round(len(members) * test_fraction))
        if len(members) >= 2 and n_val == 0:
            n_val = 1  # every class is represented in validation when it can be
        assignment[members[:n_val]] = 1
        assignment[members[n_val : n_val + n_test]] = 2
    per_image = assignment[inverse]
    return Split(*(np.flatnonzero(per_image == k) for k in range(3)))


def balance_report(
    y: np.ndarray, patients: np.ndarray, labels: list[str], split: Split
) -> dict[str, dict[str, int]]:
    """Images, patients and positives per label for each split (no identifiers)."""
    report: dict[str, dict[str, int]] = {}
    for name, index in split.items():
        entry = {"images": int(len(index)), "patients": int(len(np.unique(patients[index])))}
        for column, label in enumerate(labels):
            entry[label] = int((y[index, column] > 0.5).sum())
        report[name] = entry
    return report
