"""Build the Cython extensions: every ``rudp/_*.pyx`` becomes one module.

The extensions are marked optional so that ``pip install .`` still works on a
machine without a C compiler (rudp then runs its pure-Python reference
engines, and ``rudp.engine.ENGINE`` says so). With ``RUDP_REQUIRE_EXTENSION=1``
(CI sets it) the test suite fails when a compiled engine is missing, so CI
cannot silently test only the Python version.
"""

import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        str(pyx.with_suffix("")).replace("/", "."),
        [str(pyx)],
        extra_compile_args=["-O3"],
    )
    for pyx in sorted(Path("rudp").glob("**/_*.pyx"))
]

modules = []
for extension in extensions:
    # One cythonize() per module: a Cython error in one must not keep the others from
    # building (the failed one is simply missing, which the test suite reports).
    try:
        modules += cythonize(
            [extension],
            language_level=3,
            compiler_directives={
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
                "initializedcheck": False,
            },
        )
    except Exception as exc:  # Cython.Compiler.Errors.CompileError and friends
        print(f"warning: {extension.name} not built: {exc}", file=sys.stderr)
for module in modules:  # cythonize() drops Extension(optional=...)
    module.optional = True

setup(ext_modules=modules)
