"""Engine selection: ``rudp.engine`` picks the compiled engine, or the reference."""

from __future__ import annotations

import importlib

import pytest
from conftest import load_engine

import rudp.arq
import rudp.engine


@pytest.fixture
def reload_engine(monkeypatch):
    """Re-import rudp.engine under a given RUDP_ENGINE, restoring it afterwards."""

    def reload(value: str | None):
        if value is None:
            monkeypatch.delenv("RUDP_ENGINE", raising=False)
        else:
            monkeypatch.setenv("RUDP_ENGINE", value)
        return importlib.reload(rudp.engine)

    yield reload
    monkeypatch.delenv("RUDP_ENGINE", raising=False)
    importlib.reload(rudp.engine)


def test_default_is_the_compiled_engine_when_built(reload_engine):
    cy = load_engine("cython")
    engine = reload_engine(None)
    assert engine.ENGINE == "cython" and engine.Arq is cy


def test_environment_forces_the_reference(reload_engine):
    engine = reload_engine("python")
    assert engine.ENGINE == "python" and engine.Arq is rudp.arq.Arq


def test_engine_class_names_the_choices():
    assert rudp.engine.engine_class("python") is rudp.arq.Arq
    with pytest.raises(ValueError, match="'cython', 'python'"):
        rudp.engine.engine_class("rust")


def test_an_unknown_forced_engine_is_an_error(reload_engine):
    with pytest.raises(ValueError, match="engine must be one of"):
        reload_engine("fast")
