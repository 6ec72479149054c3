"""A missing real component skips its tests on a developer's machine but fails them in CI."""

from __future__ import annotations

import pytest

from tests.conftest import require_component


def test_a_missing_component_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Chromium is not installed.*CI=true"):
        require_component(False, "Chromium is not installed")
    require_component(True, "Chromium is not installed")  # present: nothing happens


def test_a_missing_component_skips_elsewhere(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL"):
        require_component(False, "PostgreSQL is not installed")
