"""Fuzzing header parsing and registration with hypothesis: random bytes, random bytes behind a
valid preamble, and a valid CR mutated (bytes flipped, inserted, deleted, lengths rewritten).
Whatever the input, ``read_header`` either returns a header or raises ``IngestError``, and
``register_file`` returns a result (registered, duplicate or quarantined with a reason): no
crash, no other exception."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.migrate import upgrade
from lightbox.errors import IngestError
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.ingest.header import read_header
from scheduler.ingest.registration import Outcome, register_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _seed_file() -> bytes:
    out = Path(tempfile.mkdtemp(prefix="lightbox-fuzz-"))
    study = write_study(out, np.random.default_rng(0), label=0, images=1, size=8)
    return study.paths[0].read_bytes()


SEED = _seed_file()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "length", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "length" and at + 4 <= len(data):
            data[at:at + 4] = struct.pack("<I", draw(st.sampled_from(
                [0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF, len(data) * 2])))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


inputs = st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=512).map(lambda b: b"\x00" * 128 + b"DICM" + b),
    mutated(),
)


def _write(tmp: Path, data: bytes) -> Path:
    path = Path(tempfile.mkdtemp(dir=tmp)) / "fuzz.dcm"
    path.write_bytes(data)
    return path


@FUZZ
@given(data=inputs)
def test_header_parsing_never_raises_anything_else(tmp_path: Path, data: bytes) -> None:
    try:
        header = read_header(_write(tmp_path, data))
    except IngestError as exc:
        assert str(exc)  # a reason to record
    else:
        assert header.study_instance_uid and header.sop_instance_uid


@pytest.fixture(scope="module")
def fuzz_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings_ = Settings(data_dir=tmp_path_factory.mktemp("fuzz-data"))
    upgrade(settings_.sqlalchemy_url)
    return settings_


@FUZZ
@given(data=inputs)
def test_registration_never_raises(fuzz_settings: Settings, tmp_path: Path, data: bytes) -> None:
    result = register_file(fuzz_settings, _write(tmp_path, data), move=True)
    if result.outcome is Outcome.quarantined:
        assert result.reason
    else:
        assert result.sop_instance_uid and result.study_instance_uid
