"""The private parts of pynetdicom and Pillow that Lightbox relies on, checked by name, so an
upgrade that changes them fails here with a message saying what moved, instead of the SCP
replying slower (templates bypassed) or JPEG 2000 decoding in full without a word.

`scheduler/ingest/scp_replies.py` (pynetdicom 3, tested) and `lightbox/j2k_reduced.py` (Pillow 13, tested) use
them; `pyproject.toml` bounds both packages to the major versions tested here."""

from __future__ import annotations

import inspect
import io
import re
from importlib.metadata import version
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _major(name: str) -> int:
    return int(version(name).split(".")[0])


@pytest.mark.parametrize(("package", "pin"), [("pynetdicom", "pynetdicom>=2.1,<4"),
                                              ("pillow", "pillow>=10,<14")])
def test_packages_are_pinned_below_the_next_untested_major(package: str, pin: str) -> None:
    assert f'"{pin}"' in PYPROJECT.read_text(), f"{package} must be pinned as {pin}"
    upper = int(re.search(r"<(\d+)", pin).group(1))  # type: ignore[union-attr]
    assert _major(package) < upper, f"{package} {version(package)} is beyond the tested majors"


def test_pynetdicom_internals_used_by_scp_replies() -> None:
    from pynetdicom import _config
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    assert hasattr(_config, "LOG_HANDLER_LEVEL"), "pynetdicom._config.LOG_HANDLER_LEVEL is gone"
    assert list(inspect.signature(C_STORE_RSP.encode_msg).parameters)[1:3] == [
        "context_id", "max_pdu_length"], "DIMSEMessage.encode_msg(context_id, max_pdu_length) changed"
    assert callable(C_STORE_RSP().primitive_to_message), "primitive_to_message is gone"
    assert list(inspect.signature(DIMSEServiceProvider.send_msg).parameters)[1:3] == [
        "primitive", "context_id"], "DIMSEServiceProvider.send_msg(primitive, context_id) changed"
    for name in ("maximum_pdu_size", "dul"):
        assert hasattr(DIMSEServiceProvider, name), f"DIMSEServiceProvider.{name} is gone"
    assert isinstance(P_DATA().presentation_data_value_list, list)
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    assert rsp.MessageIDBeingRespondedTo == 1


def test_pillow_internals_used_by_j2k_reduced() -> None:
    import numpy as np
    from PIL import Image, ImageFile

    assert hasattr(ImageFile, "_Tile"), "PIL.ImageFile._Tile is gone"
    assert ImageFile._Tile._fields[:4] == ("codec_name", "extents", "offset", "args"), \
        "PIL.ImageFile._Tile's fields changed"
    codestream = _small_codestream(np)
    image = Image.open(io.BytesIO(codestream))
    assert hasattr(image, "_size"), "PIL Image._size is gone"
    assert image.format == "JPEG2000" and image.mode == "I;16"
    assert hasattr(image, "layers"), "Jpeg2KImageFile.layers is gone"
    (tile,) = image.tile
    assert len(tile[3]) == 5, "the jpeg2k decoder's args are no longer (mode, reduce, layers, " \
        "fd, length)"
    assert tile[3][1] == 0 and tile[3][2] == image.layers

    from lightbox.j2k_reduced import decode_reduced, read_header

    header = read_header(codestream)
    assert header is not None
    reduced = decode_reduced(codestream, header, 1)
    assert reduced is not None, "decode_reduced fell back: Pillow's internals changed"
    assert reduced.shape == (32, 48)


def _small_codestream(np) -> bytes:  # type: ignore[no-untyped-def]
    """A 64 × 96 12-bit grayscale J2K codestream (Pillow's own encoder)."""
    from PIL import Image

    values = (np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 7) % 4096
    out = io.BytesIO()
    Image.fromarray(values << 4).save(out, format="JPEG2000", no_jp2=True,
                                                    irreversible=False)
    return out.getvalue()
