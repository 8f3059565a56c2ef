"""Which ARQ engine rudp runs: the compiled one when it was built, else the reference.

``from rudp.engine import Arq, ENGINE`` gives ``rudp._arq.Arq`` (``ENGINE ==
"cython"``) or, when the extension is missing, the pure-Python
``rudp.arq.Arq`` (``"python"``). Both implement the same contract byte for
byte. Set ``RUDP_ENGINE=python`` (or ``cython``) to force one; forcing
``cython`` without the extension raises ``ImportError`` instead of silently
running the slow engine.
"""

from __future__ import annotations

import os

__all__ = ["ENGINE", "ENGINES", "Arq", "engine_class"]

ENGINES = ("cython", "python")


def engine_class(name: str) -> type:
    """The ``Arq`` class of engine ``name`` (``"cython"`` or ``"python"``)."""
    if name == "python":
        from rudp.arq import Arq as cls
    elif name == "cython":
        from rudp._arq import Arq as cls
    else:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {name!r}")
    return cls


def _select() -> tuple[str, type]:
    forced = os.environ.get("RUDP_ENGINE", "").strip().lower()
    if forced:
        return forced, engine_class(forced)
    try:
        return "cython", engine_class("cython")
    except ImportError:
        return "python", engine_class("python")


ENGINE, Arq = _select()
