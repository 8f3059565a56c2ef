"""A full send buffer (EAGAIN) on real sockets, for both implementations.

Loopback never fills a UDP send buffer (it hands each packet over at once), so
the test runs in a private network namespace whose loopback has a 20 Mbit/s
token-bucket qdisc: packets wait there, charged to the sender's small buffer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import BUILD_HINT, missing_extension

from rudp import udp

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("tc")),
        reason="needs root, unshare and tc (iproute2)",
    ),
]

SCRIPT = r"""
import json, select, socket, subprocess, sys, time
from rudp import udp

native, gso = sys.argv[1] == "native", sys.argv[2] == "gso"
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "20mbit",
                "burst", "16k", "limit", "4m"], check=True)
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.bind(("127.0.0.1", 0))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.configure(r, native=native)
udp.configure(s, native=native, gso=gso, buffer_size=1024)
data = [i.to_bytes(4, "big") * 250 for i in range(400)]
sent = first = udp.send_batch(s, data, r.getsockname())
deadline = time.monotonic() + 30
while sent < len(data) and time.monotonic() < deadline:
    select.select([], [s], [], 1)
    sent += udp.send_batch(s, data[sent:], r.getsockname())
got = []
while len(got) < sent and time.monotonic() < deadline:
    if select.select([r], [], [], 1)[0]:
        got += [d for d, _ in udp.recv_batch(r)]
print(json.dumps({"first": first, "sent": sent, "in_order": got == data}))
"""


@pytest.mark.parametrize("gso", ["gso", "plain"])
@pytest.mark.parametrize("impl", ["native", "python"])
def test_full_send_buffer_sends_a_prefix_and_resumes(impl, gso):
    if impl == "native" and not udp.native_available():
        missing_extension(f"rudp._udp (batched socket I/O) is not importable; {BUILD_HINT}")
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", SCRIPT, impl, gso],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        pytest.skip("cannot create a network namespace here")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert 0 < result["first"] < 400  # the buffer filled: a prefix went, no exception
    assert result["sent"] == 400  # resumed after the socket became writable
    assert result["in_order"]  # every datagram once, in order
