"""Bounds on what a small input may declare: inflated size, JPEG 2000 image size.

Why: a 1 MB file in Deflated Explicit VR Little Endian can inflate to gigabytes (pydicom
inflates all of it in one ``zlib.decompress``), and a 7 KB JPEG 2000 frame whose SIZ marker
declares 60000 × 60000 makes the decoder allocate for that, whatever Rows/Columns say. Both are
checked before pydicom or a decoder sees the bytes: by every ingest channel at header-check time
(the file is refused, 0xC210, and quarantined) and again by the worker before it decodes.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.filereader import _read_file_meta_info, read_preamble

DEFLATED = "1.2.840.10008.1.2.1.99"
# JPEG 2000 (lossless, lossy) and High-Throughput JPEG 2000 (lossless, RPCL, lossy).
J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                          "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                          "1.2.840.10008.1.2.4.203"})
CHUNK = 1 << 20
META_SCAN = 64 * 1024
MIB = 1 << 20
SOC_SIZ = b"\xff\x4f\xff\x51"  # start of codestream, then the SIZ marker
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class LimitExceeded(ValueError):
    """An input declares more than a limit allows (the message names the limit)."""


def inflated_size_within(compressed: BinaryIO, limit: int) -> int:
    """Inflate a raw deflate stream in chunks, keeping none of it; the inflated size, or
    :class:`LimitExceeded` as soon as it passes ``limit`` bytes (memory: one chunk)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while True:
        data = compressed.read(CHUNK)
        if not data:
            break
        while data:
            total += len(inflater.decompress(data, CHUNK))
            if total > limit:
                raise LimitExceeded(f"deflated data set inflates past {limit // MIB} MiB "
                                    "(LIGHTBOX_MAX_INFLATED_MB)")
            data = inflater.unconsumed_tail
        if inflater.eof:
            break
    return total + len(inflater.flush())


def check_deflated(source: Path | str | bytes, limit: int) -> None:
    """Raise :class:`LimitExceeded` when ``source`` (a Part 10 file or byte stream) is in the
    Deflated transfer syntax and its data set inflates past ``limit`` bytes. Anything that is
    not a readable Part 10 file passes: the caller's parser reports it."""
    with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as fp:
        # The transfer syntax is near the start of the file meta; without that UID there the
        # file cannot be deflated, and the meta need not be parsed (the SCP's hot path).
        if DEFLATED.encode() not in fp.read(META_SCAN):
            return
        fp.seek(0)
        try:
            read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
            syntax = str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
        except Exception:  # noqa: BLE001 - not ours to judge: pydicom says why later
            return
        if syntax != DEFLATED:
            return
        inflated_size_within(fp, limit)


@dataclass(frozen=True)
class Siz:
    """The image size a JPEG 2000 codestream's SIZ marker declares."""

    width: int
    height: int
    components: int


def read_siz(frame: bytes) -> Siz | None:
    """The SIZ of a JPEG 2000 codestream (bare, or inside a JP2 file); ``None`` when there is
    no SIZ to read (not JPEG 2000: the decoder reports it)."""
    start = 0 if frame[:4] == SOC_SIZ else (
        frame.find(SOC_SIZ, 0, 4096) if frame.startswith(JP2_SIGNATURE) else -1)
    if start < 0:
        return None
    try:
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", frame[start + 8:start + 24])
        components = struct.unpack(">H", frame[start + 40:start + 42])[0]
    except struct.error:
        return None
    return Siz(width=xsiz - xosiz, height=ysiz - yosiz, components=components)


def check_j2k_frame(frame: bytes, rows: int, columns: int, samples: int) -> None:
    """Raise :class:`LimitExceeded` when the codestream declares another image size (or more
    components) than the data set's Rows, Columns and Samples per Pixel: the decoder would
    allocate for what the codestream says. (Tiles are clipped to the image by the decoder.)"""
    siz = read_siz(frame)
    if siz is None:
        return
    if (siz.height, siz.width) != (rows, columns) or siz.components > max(samples, 1):
        raise LimitExceeded(
            f"JPEG 2000 codestream declares {siz.width} x {siz.height} x {siz.components}, "
            f"the data set {columns} x {rows} x {samples} (Columns, Rows, Samples per Pixel)")
