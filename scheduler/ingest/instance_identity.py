"""When two files are the same instance: the same data set, whatever the file meta or the
encoding.

The same SOP Instance UID arrives again through another channel (the SCP writes its own file
meta), or re-encoded by the sender (dcmtk's ``storescu -xv`` sends Explicit VR as Implicit VR,
a PACS may compress): other bytes, same instance. Only a real change of the data set — an
attribute value, or decoded pixel values — makes a corrected instance that reopens its study.
Comparing costs a parse of both headers (and a pixel decode only when the two transfer
syntaxes store pixels differently), and runs only when a known UID arrives with new bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

log = logging.getLogger(__name__)
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, Float-, DoubleFloatPixelData
TRAILING_PADDING = 0xFFFCFFFC


def same_instance(first: Path, second: Path) -> bool:
    """True when both files hold the same data set (see module docstring). Anything that
    cannot be read or compared counts as different: the caller then keeps the old behaviour
    (a corrected instance), never loses one."""
    try:
        a, b = pydicom.dcmread(first), pydicom.dcmread(second)
        return _same_dataset(a, b) and _same_pixels(a, b)
    except Exception:  # noqa: BLE001 - unreadable or undecodable: not provably the same
        log.debug("instances not comparable", exc_info=True)
        return False


def _compared(ds: Dataset, top: bool) -> set[BaseTag]:
    return {tag for tag in ds.keys()
            if tag.element != 0 and tag != TRAILING_PADDING and not (top and tag in PIXEL_TAGS)}


def _same_dataset(a: Dataset, b: Dataset, top: bool = True) -> bool:
    tags = _compared(a, top)
    if tags != _compared(b, top):
        return False
    return all(_same_element(a[tag], b[tag]) for tag in tags)


def _same_element(a: DataElement, b: DataElement) -> bool:
    if a.VR == "SQ" or b.VR == "SQ":
        if a.VR != b.VR or len(a.value) != len(b.value):
            return False
        return all(_same_dataset(x, y, top=False) for x, y in zip(a.value, b.value, strict=True))
    if (a.VR == "UN") != (b.VR == "UN"):  # a private tag read without its VR (Implicit VR)
        text, other = (a, b) if a.VR == "UN" else (b, a)
        return _text(text.value) == _text(other.value)
    return _normal(a.value) == _normal(b.value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00 ")
    return str(_normal(value)).strip()


def _normal(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return tuple(_normal(v) for v in value)
    return str(value) if value is not None else ""


def _same_pixels(a: Dataset, b: Dataset) -> bool:
    tags_a, tags_b = PIXEL_TAGS & set(a.keys()), PIXEL_TAGS & set(b.keys())
    if tags_a != tags_b:
        return False
    if not tags_a:
        return True
    syntax_a, syntax_b = a.file_meta.TransferSyntaxUID, b.file_meta.TransferSyntaxUID
    same_storage = syntax_a == syntax_b or (
        not syntax_a.is_compressed and not syntax_b.is_compressed
        and syntax_a.is_little_endian and syntax_b.is_little_endian)
    raw_equal = all(bytes(a[t].value) == bytes(b[t].value) for t in tags_a)
    if same_storage:
        return raw_equal
    return bool(np.array_equal(a.pixel_array, b.pixel_array))
