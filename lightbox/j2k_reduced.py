"""Reduced-resolution JPEG 2000 decoding: wavelet resolution levels instead of full pixels.

Why: the model input (64–512 px) is tiny next to a 1955×1841 chest CR, and a JPEG 2000
codestream stores a wavelet pyramid: decoding only down to resolution level ``r`` gives an
image ``ceil(size / 2**r)`` on each side (the low-pass band, an anti-aliased downscale) at a
fraction of the cost (the real CR: ~1 s in full, ~0.01 s at r = 3). pylibjpeg-openjpeg has no
``reduce`` argument; Pillow's wheel bundles the same openjpeg library and passes ``reduce`` to
it, so Pillow does the decoding here. Everything that can go wrong returns ``None`` and the
caller decodes in full: this is only ever a shortcut, never a different answer to "can this
file be read".
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

JPEG2000_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})


@dataclass(frozen=True)
class CodestreamHeader:
    """What the main header of a JPEG 2000 codestream says (ISO 15444-1 A.5.1, A.6.1)."""

    width: int
    height: int
    x_offset: int
    y_offset: int
    components: int
    precision: int  # bits of the first component
    signed: bool
    levels: int  # decomposition levels of the default coding style (COD)
    # The COD's wavelet (SPcod transformation: 1 = reversible 5/3, 0 = irreversible 9/7) and
    # whether one tile covers the image; read for the GPU path (lightbox.prepare_plan), which
    # computes the low-pass band from a full decode.
    reversible: bool = True
    single_tile: bool = True


def read_header(codestream: bytes) -> CodestreamHeader | None:
    """Parse SIZ and COD from the main header; ``None`` when the stream is not one we know."""
    if codestream[:4] != b"\xff\x4f\xff\x51":  # SOC then SIZ, as the standard requires
        return None
    try:
        (xsiz, ysiz, xosiz, yosiz) = struct.unpack(">4I", codestream[8:24])
        (xtsiz, ytsiz, xtosiz, ytosiz) = struct.unpack(">4I", codestream[24:40])
        components = struct.unpack(">H", codestream[40:42])[0]
        ssiz = codestream[42]
        position = 4 + struct.unpack(">H", codestream[4:6])[0]  # SOC, SIZ marker, Lsiz
        levels = None
        reversible = True
        while position + 4 <= len(codestream):
            marker, length = struct.unpack(">HH", codestream[position : position + 4])
            if marker == 0xFF52:  # COD: Scod, SGcod (4 bytes), then SPcod[0] = levels
                levels = codestream[position + 9]
                reversible = codestream[position + 13] == 1
                break
            if marker == 0xFF90 or marker >> 8 != 0xFF:  # SOT: the main header has ended
                break
            position += 2 + length
    except (struct.error, IndexError):
        return None
    if levels is None or components < 1:
        return None
    return CodestreamHeader(width=xsiz - xosiz, height=ysiz - yosiz, x_offset=xosiz,
                            y_offset=yosiz, components=components,
                            precision=(ssiz & 0x7F) + 1, signed=bool(ssiz & 0x80),
                            levels=levels, reversible=reversible,
                            single_tile=xtosiz + xtsiz >= xsiz and ytosiz + ytsiz >= ysiz)


def reduction_for(header: CodestreamHeader, min_height: int, min_width: int) -> int:
    """The largest ``r`` whose reduced image is still at least ``min_height × min_width``,
    capped by the codestream's decomposition levels (0: decode in full)."""
    r = 0
    while r < header.levels:
        p = 1 << (r + 1)
        if _reduced(header.height, header.y_offset, p) < min_height or \
                _reduced(header.width, header.x_offset, p) < min_width:
            break
        r += 1
    return r


def _reduced(size: int, offset: int, power: int) -> int:
    """openjpeg's size of a reduced image: ceil((offset + size) / p) - ceil(offset / p)."""
    return -(-(offset + size) // power) - -(-offset // power)


def decode_reduced(codestream: bytes, header: CodestreamHeader, reduce: int) -> np.ndarray | None:
    """The codestream decoded at resolution ``reduce`` as stored values (uint16), or ``None``.

    Why Pillow's private attributes: Pillow's public ``reduce`` setter rounds the reduced size
    (``int((w + 2**(r-1)) / 2**r)``) where openjpeg takes the ceiling, so for odd sizes (the real
    CR: 1841 / 8 = 230.1 → Pillow 230, openjpeg 231) the decoder reports "broken data stream".
    Setting the size and the tile arguments ourselves (what Pillow's own ``load`` does, with
    openjpeg's rounding) avoids that. Pillow returns 16-bit samples scaled up to the full 16
    bits; they are shifted back down by the codestream's precision (SIZ) so the values equal the
    stored values, exactly like a full decode (tested against pylibjpeg-openjpeg at reduce 0).
    Only unsigned single-component streams of 9–16 bits take this path.
    """
    if header.components != 1 or header.signed or not 8 < header.precision <= 16:
        return None
    try:
        from PIL import Image, ImageFile

        image = Image.open(io.BytesIO(codestream))
        if image.mode != "I;16" or image.format != "JPEG2000" or len(image.tile) != 1:
            return None
        power = 1 << reduce
        size = (_reduced(header.width, header.x_offset, power),
                _reduced(header.height, header.y_offset, power))
        tile = image.tile[0]
        args = tile[3]
        image._size = size
        image.tile = [ImageFile._Tile(tile[0], (0, 0, *size), tile[2],
                                      (args[0], reduce, image.layers, args[3], args[4]))]  # type: ignore[attr-defined,index]
        image.load()
        array = np.asarray(image)
    except Exception:  # noqa: BLE001 - any failure means "decode in full instead"
        return None
    if array.shape != (size[1], size[0]) or array.dtype != np.uint16:
        return None
    shift = 16 - header.precision
    return (array >> shift) if shift else array
