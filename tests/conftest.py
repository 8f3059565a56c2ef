"""Shared fixtures.

``arq_cls`` runs a test once per ARQ engine (pure-Python reference and Cython).
When the extension cannot be imported the Cython runs are skipped, unless
``RUDP_REQUIRE_EXTENSION=1`` (CI sets it), which makes them fail: CI must never
pass having tested only the Python engine.
"""

from __future__ import annotations

import os

import pytest

from rudp.engine import ENGINES, engine_class


def load_engine(name: str) -> type:
    """The engine's class, or skip/fail (per ``RUDP_REQUIRE_EXTENSION``) when it is missing."""
    try:
        return engine_class(name)
    except ImportError as exc:
        message = (
            f"the {name} ARQ engine is not importable ({exc}); build it with "
            "`python setup.py build_ext --inplace` or `pip install -e .`"
        )
        if os.environ.get("RUDP_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"RUDP_REQUIRE_EXTENSION=1 but {message}", pytrace=False)
        pytest.skip(message)


@pytest.fixture(params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    """Each ARQ engine's name, with the engine checked to be importable."""
    load_engine(request.param)
    return request.param


@pytest.fixture
def arq_cls(engine_name: str) -> type:
    """Each ARQ engine's ``Arq`` class in turn."""
    return engine_class(engine_name)
