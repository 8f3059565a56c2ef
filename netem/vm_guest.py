"""The agent that runs inside the netem VM (see :mod:`netem.vm`).

It runs under the host's own python3 (the guest's root is the host's ``/``
read-only with a tmpfs overlay), so it uses the standard library only and
never imports the project: a broken tree must still boot and report.

Protocol: one JSON object per line over the virtio-serial port named
``rudp.ctl``. The agent announces itself with ``{"ready": ...}``; each request
``{"id", "argv", "env", "cwd", "input"}`` is answered with
``{"id", "rc", "stdout", "stderr", "guest_seconds"}``; time limits are the host's;
``{"exit": true}`` ends the agent and the VM powers off.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PORT_NAME = "rudp.ctl"


def find_port() -> str:
    """The /dev node of the control port (no udev here, so look it up in sysfs)."""
    for entry in Path("/sys/class/virtio-ports").glob("*"):
        try:
            if (entry / "name").read_text().strip() == PORT_NAME:
                return f"/dev/{entry.name}"
        except OSError:
            continue
    raise SystemExit(f"vm_guest: no virtio-serial port named {PORT_NAME!r}")


def run(request: dict) -> dict:
    env = dict(os.environ)
    env.update(request.get("env") or {})
    start = time.monotonic()
    try:
        proc = subprocess.run(
            request["argv"],
            input=(request.get("input") or "").encode(),
            capture_output=True,
            cwd=request.get("cwd") or None,
            env=env,
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except OSError as exc:
        rc, out, err = 127, b"", f"vm_guest: cannot run {request['argv'][0]!r}: {exc}\n".encode()
    return {
        "id": request.get("id"),
        "rc": rc,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
        "guest_seconds": time.monotonic() - start,
    }


def main() -> int:
    port = find_port()
    with open(port, "r+b", buffering=0) as chan:  # a port can be opened only once

        def send(obj: dict) -> None:
            chan.write(json.dumps(obj).encode() + b"\n")

        send({"ready": True, "kernel": platform.release(), "python": sys.version.split()[0]})
        buffer = b""
        while True:
            chunk = chan.read(65536)
            if not chunk:  # host closed the port: nothing more will come
                return 0
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except ValueError as exc:
                    send({"error": f"bad request: {exc}"})
                    continue
                if request.get("exit"):
                    send({"id": request.get("id"), "bye": True})
                    return 0
                send(run(request))


if __name__ == "__main__":
    sys.exit(main())
