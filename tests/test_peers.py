"""The CI rule on missing peers (tests/peers.py): skip on a developer machine, fail under
``CI=true``, so a CI that lost a peer cannot hide the feature it guards behind a skip."""

from __future__ import annotations

import pytest

from tests import peers


@pytest.mark.parametrize("ci", ["", "false", "0"])
def test_missing_peer_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="needs no-such-peer-tool"):
        peers.require("no-such-peer-tool", "test")
    with pytest.raises(pytest.skip.Exception, match="needs a tmpfs mount: denied"):
        peers.require_that(False, "a tmpfs mount", "denied")


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_missing_peer_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI must provide it.*no-such-peer-tool"):
        peers.require("no-such-peer-tool", "test")
    with pytest.raises(pytest.fail.Exception, match="a tmpfs mount: denied"):
        peers.require_that(False, "a tmpfs mount", "denied")


def test_present_peer_passes_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    for ci in ("true", ""):
        monkeypatch.setenv("CI", ci)
        assert peers.require("sh").endswith("/sh")
        peers.require_that(True, "anything", "unused")
