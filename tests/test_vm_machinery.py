"""The netem VM's host-side machinery, without booting anything.

The initramfs writer, module ordering, the agent protocol and its time limits
are checked here against stand-ins (busybox's own cpio, a fake modules.dep, a
fake qemu speaking the agent protocol), so a regression shows up even on a
machine where the kernel-netem tier (tests/test_vm.py) skips.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import netem.vm as vmmod
from netem.vm import VM, KernelAssets, VMError, VMTimeout, VMUnavailable
from netem.vm_probe import probe_stats

# --- initramfs pieces ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox to read the archive")
def test_cpio_archive_is_read_back_by_busybox(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5 + b"odd"  # a length that needs padding
    archive = b"".join(
        [
            vmmod._cpio_entry("dir", stat.S_IFDIR | 0o755),
            vmmod._cpio_entry("dir/file.bin", stat.S_IFREG | 0o640, payload),
            vmmod._cpio_entry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
            vmmod._cpio_entry("TRAILER!!!", 0),
        ]
    )
    (tmp_path / "a.cpio").write_bytes(archive)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["busybox", "cpio", "-i", "-d", "-F", str(tmp_path / "a.cpio")], cwd=out, check=True
    )
    assert (out / "dir" / "file.bin").read_bytes() == payload
    assert stat.S_IMODE((out / "dir" / "file.bin").stat().st_mode) == 0o640
    assert (out / "init").read_bytes() == b"#!/bin/sh\n"


def test_boot_modules_are_ordered_dependencies_first(tmp_path: Path) -> None:
    release = "9.9.9-test"
    (tmp_path / release).mkdir()
    (tmp_path / release / "modules.dep").write_text(
        textwrap.dedent(
            """\
            kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
            kernel/net/9p/9pnet.ko:
            kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
            kernel/fs/netfs/netfs.ko:
            kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio.ko kernel/net/9p/9pnet.ko
            kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
            kernel/drivers/virtio/virtio_ring.ko:
            """
        )
    )
    order = [p.name for p in vmmod._module_order(tmp_path, release, ["9pnet_virtio", "9p"])]
    assert sorted(order) == sorted(set(order))  # each module once
    for before, after in [
        ("virtio_ring.ko", "virtio.ko"),
        ("virtio.ko", "9pnet_virtio.ko"),
        ("9pnet.ko", "9pnet_virtio.ko"),
        ("netfs.ko", "fscache.ko"),
        ("fscache.ko", "9p.ko"),
    ]:
        assert order.index(before) < order.index(after)
    with pytest.raises(VMUnavailable, match="no module sch_nope"):
        vmmod._module_order(tmp_path, release, ["sch_nope"])


def test_static_elf_detection() -> None:
    assert not vmmod._is_static_elf(sys.executable)  # pyenv/Debian python is dynamic
    assert not vmmod._is_static_elf(__file__)  # not ELF at all
    busybox = vmmod._static_busybox()
    if busybox is not None:
        assert vmmod._is_static_elf(busybox)


def test_vm_available_always_gives_a_reason() -> None:
    ok, reason = vmmod.vm_available()
    assert isinstance(ok, bool) and reason


def test_bad_vm_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="memory_mb"):
        VM(memory_mb=64)
    with pytest.raises(ValueError, match="boot_timeout"):
        VM(boot_timeout=0)


# --- the host side of the agent protocol, against a fake qemu -----------------------------------


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a stand-in for qemu: a Python script whose stdio is the control port."""

    def install(body: str) -> None:
        script = tmp_path / "fake-qemu"
        script.write_text(f"#!{sys.executable}\nimport json, sys, time\n" + textwrap.dedent(body))
        script.chmod(0o755)
        monkeypatch.setattr(vmmod, "QEMU", str(script))
        assets = KernelAssets("pkg", "0-test", tmp_path, tmp_path, tmp_path)
        monkeypatch.setattr(vmmod, "prepare", lambda install=True: assets)

    return install


GREET = 'print(json.dumps({"ready": True, "kernel": "0-test"}), flush=True)\n'


def test_vm_that_dies_during_boot_reports_qemu_stderr(fake_qemu) -> None:
    fake_qemu('sys.stderr.write("qemu: could not load kernel\\n"); sys.exit(1)\n')
    with pytest.raises(VMError, match="could not load kernel"):
        VM(boot_timeout=30, pause_idle=False).start()


def test_vm_that_never_boots_times_out_and_is_killed(fake_qemu) -> None:
    fake_qemu("time.sleep(60)\n")
    vm = VM(boot_timeout=1, pause_idle=False)
    with pytest.raises(VMTimeout, match="boot"):
        vm.start()
    assert not vm.alive and vm._proc is not None and vm._proc.poll() is not None
    vm.close()


def test_commands_round_trip_and_a_hung_command_kills_the_vm(fake_qemu) -> None:
    fake_qemu(
        GREET
        + textwrap.dedent(
            """\
        for line in sys.stdin:
            req = json.loads(line)
            if req.get("exit"):
                break
            if req["argv"][-1] == "hang":
                time.sleep(60)
            out = {"id": req["id"], "rc": 0, "stdout": " ".join(req["argv"]),
                   "stderr": req["input"] or "", "guest_seconds": 0.5}
            print("noise that is not JSON", flush=True)
            print(json.dumps(out), flush=True)
        """
        )
    )
    vm = VM(boot_timeout=30, pause_idle=False).start()
    assert vm.kernel_release == "0-test"
    result = vm.run(["echo", "hi"], input="in")
    assert (result.returncode, result.stdout, result.stderr) == (0, "echo hi", "in")
    assert vm.run("true").argv == ("/bin/sh", "-c", "true")
    with pytest.raises(VMTimeout):
        vm.run(["hang"], timeout=1)
    assert not vm.alive
    with pytest.raises(VMError, match="not running"):
        vm.run("true")
    vm.close()


def test_guest_is_paused_between_commands(fake_qemu, tmp_path: Path) -> None:
    """The fake serves qemu's monitor (QMP) and logs each command against the agent's traffic."""
    log = tmp_path / "events"
    fake_qemu(
        textwrap.dedent(
            f"""\
        import socket, threading
        events = open({str(log)!r}, "a", buffering=1)
        path = [a for a in sys.argv if a.startswith("unix:")][0][5:].split(",")[0]
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)

        def monitor():
            conn, _ = server.accept()
            f = conn.makefile("rwb", buffering=0)
            f.write(b'{{"QMP": {{}}}}\\n')
            for line in f:
                events.write(json.loads(line)["execute"] + "\\n")
                f.write(b'{{"event": "NOISE"}}\\n{{"return": {{}}}}\\n')

        threading.Thread(target=monitor, daemon=True).start()
        time.sleep(0.2)
        """
        )
        + GREET
        + textwrap.dedent(
            """\
        for line in sys.stdin:
            req = json.loads(line)
            events.write("exit\\n" if req.get("exit") else "run\\n")
            if req.get("exit"):
                print(json.dumps({"id": req["id"], "bye": True}), flush=True)
                break
            print(json.dumps({"id": req["id"], "rc": 0, "stdout": "", "stderr": "",
                              "guest_seconds": 0}), flush=True)
        """
        )
    )
    vm = VM(boot_timeout=30).start()
    vm.run("true")
    vm.run("true")
    vm.close()
    assert log.read_text().split() == [
        "qmp_capabilities",
        "stop",  # booted: paused until there is work
        "cont",
        "run",
        "stop",
        "cont",
        "run",
        "stop",
        "cont",  # woken to power off
        "exit",
    ]


# --- probe statistics ---------------------------------------------------------------------------


def test_probe_stats_counts_loss_duplicates_reordering_and_delay() -> None:
    sent = [0.0, 1.0, 2.0, 3.0, 4.0]
    # probe 2 lost; probe 1 duplicated; probe 4 overtakes probe 3.
    arrivals = [(0, 0.1), (1, 1.1), (1, 1.15), (3, 4.3), (4, 4.2)]
    stats = probe_stats(sent, arrivals)
    assert (stats.sent, stats.received, stats.duplicates, stats.reordered) == (5, 4, 1, 1)
    assert stats.loss == pytest.approx(0.2)
    assert stats.duplicate_rate == pytest.approx(0.2)
    assert stats.reorder_rate == pytest.approx(0.25)
    assert stats.delay_min == pytest.approx(0.1)
    assert stats.delay_max == pytest.approx(1.3)
    assert stats.delay_mean == pytest.approx((0.1 + 0.1 + 1.3 + 0.2) / 4)
    assert stats.delay_p50 == pytest.approx(0.15)


def test_probe_stats_one_early_packet_is_one_reordering() -> None:
    # netem's gap reordering: packet 5 skips the queue and overtakes 4 delayed packets.
    sent = [float(i) for i in range(10)]
    arrivals = [(i, i + 10.0) for i in range(10) if i != 5] + [(5, 5.0)]
    assert probe_stats(sent, arrivals).reordered == 1
