"""The C-level entry points of ``rudp/_arq.pxd`` work from another Cython module.

Compiles a small probe that ``cimport``s the engine, as the batched-I/O layer
does, and moves data through ``send_raw``/``flush_c``/``out_datagram``/
``input_raw``/``recv_into``/``check_c`` without a Python object per packet.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import load_engine

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
# cython: language_level=3
from libc.stdint cimport uint32_t
from rudp._arq cimport Arq

def roundtrip(Arq a, Arq b, bytes data, uint32_t now):
    cdef Py_ssize_t i, n, length
    cdef const unsigned char *p
    cdef unsigned char buf[65536]
    a.send_raw(<const unsigned char *>data, len(data))
    a.flush_c(now)
    accepted = []
    for i in range(a.out_count()):
        p = a.out_datagram(i, &length)
        accepted.append(b.input_raw(p, length, now, True))
    a.out_clear()
    b.flush_c(now)
    for i in range(b.out_count()):
        p = b.out_datagram(i, &length)
        a.input_raw(p, length, now, True)
    b.out_clear()
    n = b.recv_into(buf, sizeof(buf))
    return accepted, bytes(buf[:n]), a.check_c(now), b.check_c(now)
"""

BUILD = f"""
from Cython.Build import cythonize
from setuptools import Extension, setup
setup(
    ext_modules=cythonize([Extension("arq_probe", ["arq_probe.pyx"])],
                          include_path=[{str(ROOT)!r}], quiet=True),
    script_args=["build_ext", "--inplace", "-q"],
)
"""


def test_cimport_entry_points(tmp_path):
    cls = load_engine("cython")
    (tmp_path / "arq_probe.pyx").write_text(textwrap.dedent(PROBE))
    (tmp_path / "build.py").write_text(BUILD)
    subprocess.run([sys.executable, "build.py"], cwd=tmp_path, check=True, capture_output=True)
    (so,) = tmp_path.glob("arq_probe*.so")
    spec = importlib.util.spec_from_file_location("arq_probe", so)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)

    a = cls(7, stream=True, congestion="none")
    b = cls(7, stream=True)
    data = bytes(range(256)) * 20
    accepted, got, a_due, b_due = probe.roundtrip(a, b, data, 5)
    assert accepted == [1, 1, 1, 1]  # four full segments, one per datagram
    assert got == data
    assert (a_due, b_due) == (-1, -1), "everything acknowledged: both idle"
    assert a.stats()["out_pkts"] == 4 and b.stats()["ack_segs_out"] == 4
