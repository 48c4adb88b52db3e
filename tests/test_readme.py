"""The README is the operator's reference: every setting is documented there, and the two
set-up commands stay at the top."""

from __future__ import annotations

import re
from pathlib import Path

from lightbox.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_in_the_configuration_table() -> None:
    text = README.read_text()
    documented = set(re.findall(r"^\| `(LIGHTBOX_[A-Z0-9_]+)` \|", text, flags=re.M))
    expected = {f"LIGHTBOX_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from README's configuration table"
    assert documented - expected == set(), "README documents settings that do not exist"


def test_two_setup_commands_at_the_top() -> None:
    head = README.read_text().split("\n## ", 1)[0]
    commands = re.findall(r"^python3 -m venv \.venv .*$", head, flags=re.M)
    assert len(commands) == 2
    assert commands[0].endswith("lightbox demo")
    assert commands[1].endswith('python -m pytest -m "not slow"')
