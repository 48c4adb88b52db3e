"""Read and check a DICOM file's header before it is accepted.

A file is accepted only if it parses as DICOM Part 10, carries the UIDs Lightbox keys on, no
element is cut short (pydicom stops quietly at the end of a truncated file), and its pixel data
is complete (an image storage object without pixel data was cut before it). Everything else
raises :class:`IngestError` with a reason that names no patient data, so the caller can
quarantine it.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID

from lightbox.errors import IngestError, NotDicomError
from lightbox.limits import J2K_SYNTAXES, MIB, LimitExceeded, check_deflated, check_j2k_frame
from lightbox.settings import Settings

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_INFLATED_DEFAULT = int(Settings.model_fields["max_inflated_mb"].default * MIB)
# What pydicom raises for malformed or cut-short bytes, on reading or on first access.
PARSE_ERRORS = (EOFError, ValueError, TypeError, KeyError, IndexError, OverflowError,
                AttributeError, NotImplementedError, OSError, BytesLengthException, struct.error)
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Tags copied to the series row for routing. Never PHI.
ROUTING_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "Manufacturer",
    "ImageType",
    "RequestedProcedurePriority",
    "SliceThickness",  # series-level rules (volume models)
    "NumberOfFrames",
)


@dataclass(frozen=True)
class Header:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    rows: int | None
    columns: int | None
    has_pixels: bool
    tags: dict[str, Any] = field(default_factory=dict)


def is_plain_uid(value: str) -> bool:
    """At most 64 characters of dot-separated numbers without leading zeros (PS3.5 9.1)."""
    return len(value) <= 64 and UID_PATTERN.match(value) is not None


def _uid(ds: Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip().rstrip("\x00")
    if not value:
        raise IngestError(f"missing {keyword}")
    if not is_plain_uid(value):
        raise IngestError(f"invalid {keyword} (not a DICOM UID)")
    return value


def _tag_value(value: Any) -> Any:
    if isinstance(value, pydicom.multival.MultiValue):
        return [str(v) for v in value]
    return str(value).strip()


def _check_complete(ds: Dataset) -> None:
    """pydicom ends quietly where a file ends: an element whose value is shorter than its
    declared length means the file was cut. A short read ends the stream, so only the last
    element read, at any depth, can be cut short (a freshly read dataset keeps its elements
    in reading order): checking it costs the same for 10 elements or 10,000."""
    if len(ds) == 0:
        return
    elem = ds.get_item(next(reversed(list(ds.keys()))))
    if isinstance(elem, RawDataElement):
        if (elem.length != UNDEFINED_LENGTH and elem.value is not None
                and len(elem.value) < elem.length):
            raise IngestError(
                f"file truncated: element {elem.tag} has {len(elem.value)} of "
                f"{elem.length} bytes"
            )
    elif elem is not None and elem.VR == "SQ" and elem.value:
        _check_complete(elem.value[-1])


def _needs_pixels(ds: Dataset) -> bool:
    """An image storage object (CT Image Storage, ...) without pixel data was cut short."""
    sop_class = str(ds.get("SOPClassUID", "") or "").strip().rstrip("\x00")
    return bool(sop_class) and "Image Storage" in UID(sop_class).name


def _check_pixels(ds: Dataset) -> None:
    """Refuse truncated pixel data without decoding it (decoding is the worker's job)."""
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        if _needs_pixels(ds):
            raise IngestError("image without pixel data (file truncated?)")
        return
    if "PixelData" not in ds:
        return
    ts = UID(ds.file_meta.TransferSyntaxUID)
    data = ds.PixelData
    if not ts.is_encapsulated:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
        samples = int(ds.SamplesPerPixel)
        if samples == 3 and str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
            samples = 2  # chroma subsampled horizontally: 2 values per pixel on average
        expected = int(ds.Rows) * int(ds.Columns) * samples * frames * bits // 8
        if len(data) < expected:
            raise IngestError(f"pixel data truncated: {len(data)} of {expected} bytes")
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    j2k = ts in J2K_SYNTAXES
    count = 0
    try:
        for frame in generate_frames(data, number_of_frames=frames):
            count += 1
            if j2k:  # what the decoder will allocate for, before anyone decodes it
                check_j2k_frame(frame, int(ds.Rows), int(ds.Columns),
                                int(ds.get("SamplesPerPixel", 1) or 1))
    except LimitExceeded as exc:
        raise IngestError(str(exc)) from exc
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise IngestError(f"encapsulated pixel data unreadable: {type(exc).__name__}") from exc
    if count < frames:
        raise IngestError(f"encapsulated pixel data holds {count} of {frames} frames")


def read_header(source: Path | bytes, *,
                max_inflated_bytes: int = MAX_INFLATED_DEFAULT) -> Header:
    """Parse a file, or a Part 10 byte stream already in memory (network receivers: no read
    back from disk), pixel bytes read but not decoded, and return what registration needs.

    A deflated data set is first inflated in chunks and thrown away, to refuse one that
    inflates past ``max_inflated_bytes`` before pydicom inflates it whole."""
    try:
        check_deflated(source, max_inflated_bytes)
    except LimitExceeded as exc:
        raise IngestError(str(exc)) from exc
    except zlib.error as exc:
        raise IngestError(f"deflated data set unreadable: {exc}") from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except InvalidDicomError as exc:
        raise NotDicomError("not a DICOM Part 10 file (no 'DICM' prefix or file meta)") from exc
    except (*PARSE_ERRORS, MemoryError) as exc:
        raise IngestError(f"unreadable DICOM: {type(exc).__name__}") from exc
    try:
        ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
        if not ts:
            raise IngestError("file meta has no TransferSyntaxUID")
        _check_complete(ds)
        _check_pixels(ds)
        tags = {kw: _tag_value(value) for kw in ROUTING_TAGS
                if (value := ds.get(kw)) not in (None, "")}
        return Header(
            study_instance_uid=_uid(ds, "StudyInstanceUID"),
            series_instance_uid=_uid(ds, "SeriesInstanceUID"),
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            sop_class_uid=_uid(ds, "SOPClassUID"),
            transfer_syntax_uid=ts,
            rows=int(ds.Rows) if "Rows" in ds else None,
            columns=int(ds.Columns) if "Columns" in ds else None,
            has_pixels="PixelData" in ds,
            tags=tags,
        )
    except IngestError:
        raise
    except PARSE_ERRORS as exc:
        # Deferred parsing errors surface when elements are first accessed.
        raise IngestError(f"malformed DICOM element: {type(exc).__name__}") from exc
