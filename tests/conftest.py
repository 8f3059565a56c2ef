"""Shared fixtures.

``arq_cls`` runs a test once per ARQ engine (pure-Python reference and Cython).
When the extension cannot be imported the Cython runs are skipped, unless
``RUDP_REQUIRE_EXTENSION=1`` (CI sets it), which makes them fail: CI must never
pass having tested only the Python engine.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any, NoReturn

import pytest

from rudp.engine import ENGINES, engine_class

BUILD_HINT = "build it with `python setup.py build_ext --inplace` or `pip install -e .`"


def missing_extension(message: str) -> NoReturn:
    """Skip, or fail under ``RUDP_REQUIRE_EXTENSION=1``: compiled code is missing."""
    if os.environ.get("RUDP_REQUIRE_EXTENSION") == "1":
        pytest.fail(f"RUDP_REQUIRE_EXTENSION=1 but {message}", pytrace=False)
    pytest.skip(message)


def compiled(module: str, name: str) -> Any:
    """``name`` from the compiled ``module``, or :func:`missing_extension`."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        missing_extension(f"{module} is not importable ({exc}); {BUILD_HINT}")


def load_engine(name: str) -> type:
    """The engine's class, or :func:`missing_extension` when it is missing."""
    try:
        return engine_class(name)
    except ImportError as exc:
        missing_extension(f"the {name} ARQ engine is not importable ({exc}); {BUILD_HINT}")


@pytest.fixture(params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    """Each ARQ engine's name, with the engine checked to be importable."""
    load_engine(request.param)
    return request.param


@pytest.fixture
def arq_cls(engine_name: str) -> type:
    """Each ARQ engine's ``Arq`` class in turn."""
    return engine_class(engine_name)


# ---------------------------------------------------------------------- virtual-time link


def transfer(
    a,
    b,
    link,
    a_to_b: list[bytes],
    b_to_a: list[bytes],
    *,
    message: bool,
    start: int = 0,
    send_buffer: int = 64 * 1024,
    limit_ms: int = 600_000,
    require_idle: bool = True,
) -> tuple[list[bytes], list[bytes], int]:
    """Move ``a_to_b`` and ``b_to_a`` (chunks or messages) between two ARQ endpoints
    joined by a ``netem.VirtualLink`` (``a`` sends forward), in virtual milliseconds.

    The loop wakes only at the endpoints' ``check()`` deadlines and the link's
    deliveries, flushing right after input and after writes, as the I/O layer
    does; a ``check()`` that forgets something due stalls the transfer, one that
    keeps reporting work that ``flush`` does not do fails at once. Writers keep at
    most ``send_buffer`` bytes pending. Returns what ``b`` and ``a`` received and
    the time the last byte arrived; with ``require_idle`` it also runs on until
    both endpoints arm no timer and the link is empty.
    """
    ends = (a, b)
    outbox = (list(a_to_b), list(b_to_a))
    want = (sum(map(len, b_to_a)), sum(map(len, a_to_b)))  # bytes each end must receive
    got: tuple[list[bytes], list[bytes]] = ([], [])  # received by a, by b
    have = [0, 0]
    now = start
    done_at = None
    touched = [True, True]
    spins = 0
    while True:
        for direction, datagram in link.receive(now / 1000):
            dst = 1 - direction  # forward (0) arrives at b (1)
            ends[dst].input(datagram, now)
            touched[dst] = True
        for i, end in enumerate(ends):
            while True:
                chunk = end.recv_message() if message else end.recv()
                if chunk is None or (not message and not chunk):
                    break
                got[i].append(chunk)
                have[i] += len(chunk)
            while outbox[i] and end.pending_bytes < send_buffer:
                end.send(outbox[i].pop(0))
                touched[i] = True
        for i, end in enumerate(ends):
            due = end.check(now)
            if touched[i] or (due is not None and due <= now):
                end.flush(now)
                for datagram in end.datagrams():
                    link.send(i, datagram, now / 1000)
                due = end.check(now)
                assert due is None or due > now, f"check() says due right after flush at {now}"
            touched[i] = False
        complete = have[0] >= want[0] and have[1] >= want[1] and not outbox[0] and not outbox[1]
        if complete and done_at is None:
            done_at = now
            if not require_idle:
                break
        deadlines = [d for d in (a.check(now), b.check(now)) if d is not None]
        arrival = link.next_delivery()
        if arrival is not None:
            deadlines.append(max(now, math.ceil(arrival * 1000 - 1e-6)))
        if not deadlines:
            assert complete, f"stalled at {now} ms: no timer armed, {have} of {want} bytes in"
            break
        nxt = max(now, min(deadlines))
        spins = spins + 1 if nxt == now else 0
        assert spins < 1000, f"no progress at {now} ms"
        now = nxt
        assert now - start <= limit_ms, f"not done after {limit_ms} ms: {have} of {want} bytes in"
    return got[1], got[0], done_at
