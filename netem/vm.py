"""Real Linux ``tc netem`` inside a qemu VM, for machines whose kernel lacks ``sch_netem``.

Why: the userspace emulator needs a reference, and this project's machines (and
CI) cannot load ``sch_netem``. A stock Debian kernel under qemu can, so the VM
gives an exact, real netem anywhere qemu runs.

How (nothing is installed into the host, and no root filesystem is built):

* Debian's ``linux-image-*-amd64`` package is fetched with ``apt-get download``
  and unpacked with ``dpkg-deb -x`` (+ ``depmod``) into a cache
  (``$RUDP_VM_CACHE``, else ``$XDG_CACHE_HOME/rudp/vm``, else ``~/.cache/rudp/vm``).
* A tiny initramfs (static busybox + the virtio/9p/overlay modules) mounts the
  host's ``/`` read-only over virtio-9p under a tmpfs overlay, so the guest runs
  the host's python3, iproute2 and this project's code and never writes to the
  host. The unpacked modules are mounted on ``/lib/modules``; a work folder is
  shared read-write *at the same path* as on the host, so paths need no
  translation; ``sch_netem`` and ``veth`` are loaded before anything runs.
* qemu runs under TCG (``-accel tcg``: KVM here hangs stock kernels). In
  exact-timing mode (the default) it adds ``-smp 1 -icount shift=auto,sleep=off``:
  the guest clock is virtual, so delays measured inside are exact even on a
  loaded host. Guest time is *not* host time (it jumps while waiting on file
  I/O, and skips idle time): measure inside the guest, warm up before timing,
  and never compare the two clocks.
* An agent (:mod:`netem.vm_guest`) takes commands over a virtio-serial port, so
  one boot serves many commands: :class:`VM` is the handle. Between commands
  the guest is paused through qemu's monitor, so an idle VM costs no CPU.

Typical use::

    with VM() as vm:
        result = vm.run(["tc", "qdisc", "show"]).check()

Built on it: ``pytest -m kernel_netem`` (tests/test_vm.py), the emulator's
fidelity table (``python -m netem.vm_fidelity``) and ``rudp sim --backend vm``
(:mod:`netem.vm_backend`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import logging
import os
import platform
import queue
import shlex
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "VM",
    "GuestResult",
    "KernelAssets",
    "VMCommandError",
    "VMError",
    "VMTimeout",
    "VMUnavailable",
    "cache_dir",
    "prepare",
    "run_in_vm",
    "vm_available",
]

log = logging.getLogger("netem.vm")

QEMU = "qemu-system-x86_64"
KERNEL_META_PACKAGE = "linux-image-amd64"
#: Modules the initramfs loads to reach the host's root (dependencies are added from modules.dep).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_console")
#: Modules loaded before any command runs, unless the caller asks otherwise.
DEFAULT_MODULES = ("sch_netem", "veth")
_GUEST_AGENT = Path(__file__).with_name("vm_guest.py")
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


class VMError(RuntimeError):
    """The VM could not boot, died, or broke the protocol."""


class VMUnavailable(VMError):
    """qemu, busybox-static or the kernel cannot be had on this machine (the reason says why)."""


class VMTimeout(VMError):
    """The VM did not answer within the host-side time limit (it has been killed)."""


class VMCommandError(VMError):
    """A command run in the guest exited non-zero (raised by :meth:`GuestResult.check`)."""


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What one command run in the guest returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    guest_seconds: float
    host_seconds: float

    def check(self) -> GuestResult:
        """Return self, or raise :class:`VMCommandError` with the command's stderr."""
        if self.returncode != 0:
            tail = (self.stderr or self.stdout)[-4000:]
            raise VMCommandError(
                f"guest command {shlex.join(self.argv)!r} exited {self.returncode}:\n{tail}"
            )
        return self


@dataclasses.dataclass(frozen=True)
class KernelAssets:
    """A cached, ready-to-boot kernel: image, unpacked modules and initramfs."""

    package: str  # e.g. linux-image-6.1.0-56-amd64=6.1.192-2
    release: str  # uname -r of the guest, e.g. 6.1.0-56-amd64
    kernel: Path
    modules: Path  # the folder that holds <release>/ (mounted on /lib/modules)
    initramfs: Path


# ----------------------------------------------------------------------------------------------
# Detection and set-up


def cache_dir() -> Path:
    """Where kernels and initramfs images are kept between runs."""
    if env := os.environ.get("RUDP_VM_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rudp" / "vm"


def _is_root() -> bool:
    return os.geteuid() == 0


def _can_apt() -> bool:
    return _is_root() and shutil.which("apt-get") is not None


def _is_static_elf(path: str) -> bool:
    """True when the ELF file has no program interpreter (it runs without a libc on disk)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # ELF64 only
                return False
            phoff, phentsize, phnum = (
                struct.unpack_from("<Q", head, 32)[0],
                *struct.unpack_from("<HH", head, 54),
            )
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _static_busybox() -> str | None:
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and _is_static_elf(candidate):
            return candidate
    return None


def _cached_kernel() -> KernelAssets | None:
    """The newest fully unpacked kernel in the cache (initramfs not checked)."""
    best = None
    for stamp in sorted(cache_dir().glob("kernel-*/complete.json")):
        try:
            info = json.loads(stamp.read_text())
        except (OSError, ValueError):
            continue
        d = stamp.parent
        best = KernelAssets(
            info["package"], info["release"], d / "vmlinuz", d / "modules", d / "initramfs"
        )
    return best


def vm_available() -> tuple[bool, str]:
    """Can a netem VM run here? Cheap: checks tools and cache, downloads nothing.

    True also when something is missing but can be installed (root + apt-get):
    :func:`prepare` then installs it.
    """
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"the netem VM needs an x86-64 Linux host, this is {platform.platform()}"
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (Debian package qemu-system-x86)")
    if _static_busybox() is None:
        missing.append("a static busybox (Debian package busybox-static)")
    if _cached_kernel() is None and shutil.which("apt-get") is None:
        missing.append(f"a cached kernel, and apt-get to fetch {KERNEL_META_PACKAGE}")
    if missing and not _can_apt():
        return False, "missing " + ", ".join(missing) + " (and cannot install: need root + apt-get)"
    if missing:
        return True, "will install " + ", ".join(missing)
    return True, "qemu, busybox-static and apt-get present"


def _run(cmd: Sequence[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise VMUnavailable(
            f"{what} failed: `{shlex.join(cmd)}` exited {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()[-1500:]}"
        )
    return proc


def _apt_install(packages: Sequence[str]) -> None:
    if not _can_apt():
        raise VMUnavailable(
            f"need {', '.join(packages)}: install them (apt-get install {' '.join(packages)}); "
            "rudp can do it itself only as root with apt-get"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    log.warning("netem.vm: installing %s with apt-get", " ".join(packages))
    if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:
        _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
        _run(cmd, f"installing {' '.join(packages)}", env=env)


def _resolve_kernel_package() -> tuple[str, str]:
    """(package, version) that linux-image-amd64 points at, e.g. (linux-image-6.1.0-56-amd64, 6.1.192-2)."""
    for attempt in range(2):
        proc = subprocess.run(
            ["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True
        )
        names = [
            line.split(":", 1)[1].strip()
            for line in proc.stdout.splitlines()
            if line.strip().startswith("Depends:") and "linux-image-" in line
        ]
        if names:
            name = names[0]
            policy = _run(["apt-cache", "policy", name], "apt-cache policy").stdout
            version = next(
                (ln.split(":", 1)[1].strip() for ln in policy.splitlines() if "Candidate:" in ln),
                "",
            )
            return name, version
        if attempt == 0 and _is_root():
            _run(["apt-get", "update", "-qq"], "apt-get update")
    raise VMUnavailable(
        f"apt does not know {KERNEL_META_PACKAGE} (not a Debian-family host, or no package lists)"
    )


def _depmod(base: Path, release: str) -> None:
    if shutil.which("depmod"):
        _run(["depmod", "-b", str(base), release], "depmod")
    else:
        busybox = _static_busybox() or shutil.which("busybox")
        if not busybox:
            raise VMUnavailable("need depmod (kmod) or busybox to index the kernel modules")
        _run([busybox, "depmod", "-b", str(base), release], "busybox depmod")


def _fetch_kernel() -> KernelAssets:
    name, version = _resolve_kernel_package()
    if shutil.which("dpkg-deb") is None:
        raise VMUnavailable("need dpkg-deb to unpack the kernel package")
    root = cache_dir()
    final = root / f"kernel-{name}-{version}"
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        log.warning("netem.vm: fetching %s=%s from the Debian archive", name, version)
        _run(["apt-get", "download", f"{name}={version}"], f"apt-get download {name}", cwd=tmp)
        deb = next(tmp.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], "dpkg-deb -x")
        kernels = sorted((tmp / "x" / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise VMUnavailable(f"{deb.name} holds no boot/vmlinuz-*")
        release = kernels[0].name.removeprefix("vmlinuz-")
        out = tmp / "out"
        (out / "modules").mkdir(parents=True)
        shutil.move(str(kernels[0]), out / "vmlinuz")
        shutil.move(str(tmp / "x" / "lib" / "modules" / release), out / "modules" / release)
        # depmod -b wants BASE/lib/modules/RELEASE
        (out / "lib").mkdir()
        (out / "lib" / "modules").symlink_to("../modules")
        _depmod(out, release)
        (out / "lib" / "modules").unlink()
        (out / "lib").rmdir()
        info = {"package": f"{name}={version}", "release": release}
        (out / "complete.json").write_text(json.dumps(info))
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assets = _cached_kernel()
    assert assets is not None
    return assets


# --- initramfs ---------------------------------------------------------------------------------

# PID 1 of the guest. It reaches the host's root and hands over to boot.sh (written per VM by
# the host into the shared work folder); any failure is printed on the console and powers off.
_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "rudp-vm: $*" >&2; sync; poweroff -f; }
for m in $(cat /mods/order); do insmod /mods/$m || fail "cannot load boot module $m"; done
P9=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $P9,ro,cache=loose hostroot /lower || fail "cannot mount the host's / over 9p"
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || fail "cannot mount the overlay root"
mount -t 9p -o $P9,ro modules /lib/modules || fail "cannot mount the kernel modules"
mount -t 9p -o $P9 share /share || fail "cannot mount the work folder"
. /share/.rudp-vm/boot.conf
for m in $RUDP_VM_MODULES; do modprobe $m || fail "modprobe $m failed"; done
R=/newroot
mkdir -p $R/lib/modules && mount -o bind /lib/modules $R/lib/modules
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/shm $R/dev/pts && mount -t tmpfs tmpfs $R/dev/shm
mkdir -p $R/run && mount -t tmpfs -o mode=0755 tmpfs $R/run
mkdir -p $R/run/rudp-vm/bin && cp /bin/busybox $R/run/rudp-vm/bin/
for a in modprobe insmod rmmod lsmod; do ln -s busybox $R/run/rudp-vm/bin/$a; done
mkdir -p "$R$RUDP_VM_WORKDIR" && mount -o bind /share "$R$RUDP_VM_WORKDIR" \
  || fail "cannot mount the work folder at $RUDP_VM_WORKDIR"
chroot $R /bin/sh "$RUDP_VM_WORKDIR/.rudp-vm/boot.sh"
echo "rudp-vm: guest agent exited with status $?"
sync
poweroff -f
"""


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One record of a 'newc' cpio archive (the format the kernel unpacks as initramfs)."""
    encoded = name.encode() + b"\0"
    fields = (0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


def _module_order(modules_dir: Path, release: str, wanted: Sequence[str]) -> list[Path]:
    """Relative paths of ``wanted`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / release / "modules.dep").read_text().splitlines():
        if ":" in line:
            mod, rest = line.split(":", 1)
            deps[mod] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps[path]:
            visit(dep)
        order.append(path)

    for name in wanted:
        if name.replace("-", "_") not in by_name:
            raise VMUnavailable(f"kernel {release} has no module {name}")
        visit(by_name[name.replace("-", "_")])
    return [Path(p) for p in order]


def _build_initramfs(assets: KernelAssets, busybox: str) -> Path:
    """Build (once per content) the gzipped initramfs; returns its cached path."""
    mods = _module_order(assets.modules, assets.release, BOOT_MODULES)
    blobs = [(f"mods/{p.name}", (assets.modules / assets.release / p).read_bytes()) for p in mods]
    order = "\n".join(p.name for p in mods).encode() + b"\n"
    bb = Path(busybox).read_bytes()
    digest = hashlib.sha256(_INIT.encode() + bb + order).hexdigest()[:16]
    target = assets.kernel.parent / f"initramfs-{digest}.cpio.gz"
    if target.exists():
        return target
    parts = [
        _cpio_entry(d, stat.S_IFDIR | 0o755)
        for d in ("bin", "dev", "proc", "sys", "mods", "lower", "rw", "newroot", "share", "lib")
    ]
    parts += [
        _cpio_entry("lib/modules", stat.S_IFDIR | 0o755),
        _cpio_entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _cpio_entry("init", stat.S_IFREG | 0o755, _INIT.encode()),
        _cpio_entry("bin/busybox", stat.S_IFREG | 0o755, bb),
        _cpio_entry("mods/order", stat.S_IFREG | 0o644, order),
    ]
    parts += [_cpio_entry(name, stat.S_IFREG | 0o644, blob) for name, blob in blobs]
    parts.append(_cpio_entry("TRAILER!!!", 0))
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(b"".join(parts), compresslevel=6))
    tmp.rename(target)
    for old in target.parent.glob("initramfs-*.cpio.gz"):  # earlier versions of this code
        if old != target:
            old.unlink(missing_ok=True)
    return target


def prepare(*, install: bool = True) -> KernelAssets:
    """Make everything ready to boot: qemu, busybox-static, kernel, initramfs (cached).

    Installs missing Debian packages when ``install`` is true and we are root;
    raises :class:`VMUnavailable` with the reason otherwise. Safe to call from
    several processes at once (a lock file serialises the set-up).
    """
    ok, reason = vm_available()
    if not ok:
        raise VMUnavailable(reason)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        need = []
        if shutil.which(QEMU) is None:
            need.append("qemu-system-x86")
        if _static_busybox() is None:
            need.append("busybox-static")
        if need:
            if not install:
                raise VMUnavailable(f"missing Debian packages: {' '.join(need)}")
            _apt_install(need)
        busybox = _static_busybox()
        if shutil.which(QEMU) is None or busybox is None:
            raise VMUnavailable(f"{QEMU} or a static busybox is still missing after apt-get")
        assets = _cached_kernel()
        if assets is None:
            if not install:
                raise VMUnavailable(f"no kernel cached in {root}")
            assets = _fetch_kernel()
        initramfs = _build_initramfs(assets, busybox)
        return dataclasses.replace(assets, initramfs=initramfs)


# ----------------------------------------------------------------------------------------------
# The VM


class _Monitor:
    """A minimal QMP client: enough to pause and resume the guest."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], deadline: float) -> None:
        while True:  # qemu creates the socket early in its start-up
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise VMError("qemu's monitor socket never appeared") from None
                time.sleep(0.05)
        self._sock.settimeout(max(1.0, deadline - time.monotonic()))
        self._file = self._sock.makefile("rb")
        self._file.readline()  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str) -> None:
        self._sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:  # skip asynchronous events
            line = self._file.readline()
            if not line:
                raise VMError(f"qemu's monitor closed during {command}")
            reply = json.loads(line)
            if "error" in reply:
                raise VMError(f"qemu's monitor refused {command}: {reply['error']}")
            if "return" in reply:
                return

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class VM:
    """One booted guest running real netem; commands go in, results come back.

    Use as a context manager (or call :meth:`start` and :meth:`close`). The
    ``workdir`` is shared read-write with the guest at the same path. All
    timeouts are host wall-clock seconds; a timeout kills the VM.

    ``exact_timing`` (default) runs one virtual CPU with a virtual clock
    (``-icount``): slower, but delays measured inside are exact whatever the
    host load. Without it the guest uses two vCPUs and the host's clock.

    Between commands the guest is paused (``pause_idle``): an idle guest with
    a virtual clock would otherwise spin a host CPU racing through its timers.
    So nothing runs in the guest between two :meth:`run` calls, and its clock
    stands still.
    """

    def __init__(
        self,
        *,
        exact_timing: bool = True,
        memory_mb: int = 1024,
        modules: Sequence[str] = DEFAULT_MODULES,
        boot_timeout: float = 240.0,
        workdir: str | os.PathLike[str] | None = None,
        install: bool = True,
        pause_idle: bool = True,
    ) -> None:
        if not 256 <= memory_mb <= 16384:
            raise ValueError(f"memory_mb must be in [256, 16384], got {memory_mb!r}")
        if boot_timeout <= 0:
            raise ValueError(f"boot_timeout must be > 0, got {boot_timeout!r}")
        self.exact_timing = exact_timing
        self.memory_mb = memory_mb
        self.modules = tuple(modules)
        self.boot_timeout = boot_timeout
        self.install = install
        self.pause_idle = pause_idle
        self._own_workdir = workdir is None
        self.workdir = Path(
            tempfile.mkdtemp(prefix="rudp-vm-") if workdir is None else workdir
        ).resolve()
        self.python = sys.executable  # not resolved: a venv is known by the path it runs from
        self.kernel_release = ""
        self.boot_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._lock = threading.Lock()
        self._next_id = 0
        self._dead: str | None = None
        self._private: Path | None = None  # qemu's monitor socket (a short path: AF_UNIX)
        self._monitor: _Monitor | None = None

    # -- lifecycle --

    @property
    def console_path(self) -> Path:
        return self.workdir / ".rudp-vm" / "console.log"

    def console(self, tail: int = 3000) -> str:
        """The end of the guest's serial console (kernel messages, boot errors)."""
        try:
            return self.console_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def _qemu_argv(self, assets: KernelAssets) -> list[str]:
        virtfs = "local,security_model=none,multidevs=remap"
        argv = [
            QEMU,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-cpu",
            "max",
            "-m",
            str(self.memory_mb),
            "-kernel",
            str(assets.kernel),
            "-initrd",
            str(assets.initramfs),
            "-append",
            "console=ttyS0 quiet panic=-1 mitigations=off",
            "-chardev",
            f"file,id=con,path={self.console_path}",
            "-serial",
            "chardev:con",
            "-virtfs",
            f"{virtfs},path=/,mount_tag=hostroot,readonly=on",
            "-virtfs",
            f"{virtfs},path={assets.modules},mount_tag=modules,readonly=on",
            "-virtfs",
            f"{virtfs},path={self.workdir},mount_tag=share",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            "stdio,id=ctl,signal=off",
            "-device",
            "virtserialport,chardev=ctl,name=rudp.ctl",
            "-qmp",
            f"unix:{self._private}/qmp,server=on,wait=off",
        ]
        if self.exact_timing:
            argv += ["-accel", "tcg", "-smp", "1", "-icount", "shift=auto,sleep=off"]
        else:
            argv += ["-accel", "tcg,thread=multi", "-smp", "2"]
        return argv

    def _write_boot_files(self) -> None:
        meta = self.workdir / ".rudp-vm"
        meta.mkdir(parents=True, exist_ok=True)
        (meta / "boot.conf").write_text(
            f"RUDP_VM_WORKDIR={shlex.quote(str(self.workdir))}\n"
            f"RUDP_VM_MODULES={shlex.quote(' '.join(self.modules))}\n"
        )
        path = ":".join(
            [os.path.dirname(self.python), os.environ.get("PATH", "/usr/bin:/bin"), _SBIN]
        )
        env = {"PATH": path + ":/run/rudp-vm/bin", "HOME": "/root", "LANG": "C.UTF-8"}
        for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHASHSEED"):
            if key in os.environ:
                env[key] = os.environ[key]
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        (meta / "boot.sh").write_text(
            exports
            + f"cd {shlex.quote(str(self.workdir))}\n"
            + f"exec {shlex.quote(self.python)} -u {shlex.quote(str(_GUEST_AGENT))}\n"
        )

    def start(self) -> VM:
        """Boot the guest and wait until its agent answers (raises on failure)."""
        if self._proc is not None:
            return self
        assets = prepare(install=self.install)
        self._write_boot_files()
        self._private = Path(tempfile.mkdtemp(prefix="rudp-vm-"))
        started = time.monotonic()
        self._proc = subprocess.Popen(
            self._qemu_argv(assets),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / ".rudp-vm" / "qemu.stderr", "wb"),  # noqa: SIM115
        )
        threading.Thread(target=self._pump, name="netem-vm-reader", daemon=True).start()
        try:
            if self.pause_idle:
                self._monitor = _Monitor(Path(f"{self._private}/qmp"), self._proc, started + 60)
            hello = self._receive(started + self.boot_timeout, "boot")
            if not hello.get("ready"):
                raise VMError(f"the guest agent sent {hello!r} instead of its greeting")
            self._pause()
        except BaseException:
            self.close()
            raise
        self.kernel_release = hello.get("kernel", "")
        self.boot_seconds = time.monotonic() - started
        log.info("netem.vm: booted %s in %.1f s", self.kernel_release, self.boot_seconds)
        return self

    def _pause(self) -> None:
        if self._monitor is not None and self.alive:
            self._monitor.execute("stop")

    def _resume(self) -> None:
        if self._monitor is not None:
            self._monitor.execute("cont")

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _receive(self, deadline: float, what: str) -> dict:
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(remaining, 0.0)) if remaining > 0 else None
            except queue.Empty:
                line = None
                remaining = 0
            if remaining <= 0 and line is None:
                self._kill(f"timed out during {what}")
                raise VMTimeout(
                    f"the VM did not finish {what} in time; it was killed. Console:\n{self.console()}"
                )
            if line is None:  # qemu exited
                status = self._exit_status()
                self._kill(f"qemu exited during {what}")
                raise VMError(
                    f"the VM stopped during {what} ({status}). Console:\n"
                    f"{self.console()}{self._qemu_stderr()}"
                )
            try:
                return json.loads(line)
            except ValueError:
                log.debug("netem.vm: ignoring non-JSON line %r", line[:200])

    def _exit_status(self) -> str:
        if self._proc is None:
            return "not started"
        try:
            rc = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "qemu still running"
        return f"qemu exit status {rc}"

    def _qemu_stderr(self) -> str:
        try:
            text = (self.workdir / ".rudp-vm" / "qemu.stderr").read_text(errors="replace")
        except OSError:
            return ""
        return f"\nqemu stderr:\n{text[-2000:]}" if text.strip() else ""

    def _kill(self, why: str) -> None:
        self._dead = why
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)

    def close(self, timeout: float = 30.0) -> None:
        """Power the guest off (kill it if it does not stop) and remove our own workdir."""
        proc = self._proc
        if proc is not None and proc.poll() is None and self._dead is None:
            deadline = time.monotonic() + timeout
            try:
                with self._lock:
                    self._resume()
                    request_id = self._take_id()
                    self._send({"id": request_id, "exit": True})
                    # Wait for the goodbye before closing stdin: qemu may drop what is
                    # still queued for the guest once it sees end of file.
                    while self._receive(deadline, "power-off").get("id") != request_id:
                        pass
                    assert proc.stdin is not None
                    proc.stdin.close()
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except (OSError, VMError, subprocess.TimeoutExpired):
                pass
        self._kill("closed")
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._dead is None

    # -- commands --

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send(self, obj: dict) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self._proc.stdin.flush()

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        timeout: float = 300.0,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        input: str | None = None,
    ) -> GuestResult:
        """Run a command in the guest as root and return what it printed.

        A string is run by ``/bin/sh -c``. ``timeout`` is host wall-clock
        seconds (the guest is 8-15x slower than the host at CPU-bound Python);
        when it passes the VM is killed and :class:`VMTimeout` raised.
        """
        if self._proc is None:
            self.start()
        if not self.alive:
            raise VMError(f"the VM is not running ({self._dead or self._exit_status()})")
        args = ["/bin/sh", "-c", argv] if isinstance(argv, str) else [str(a) for a in argv]
        with self._lock:
            request_id = self._take_id()
            started = time.monotonic()
            self._resume()
            self._send(
                {
                    "id": request_id,
                    "argv": args,
                    "env": dict(env or {}),
                    "cwd": str(cwd) if cwd is not None else str(self.workdir),
                    "input": input,
                }
            )
            while True:
                reply = self._receive(started + timeout, f"`{shlex.join(args)[:200]}`")
                if reply.get("id") == request_id:
                    break
            self._pause()
        return GuestResult(
            argv=tuple(args),
            returncode=int(reply["rc"]),
            stdout=reply["stdout"],
            stderr=reply["stderr"],
            guest_seconds=float(reply["guest_seconds"]),
            host_seconds=time.monotonic() - started,
        )

    def run_python(
        self, code: str, *args: str, timeout: float = 300.0, env: Mapping[str, str] | None = None
    ) -> GuestResult:
        """Run ``python -c code args...`` in the guest with the host's interpreter."""
        return self.run([self.python, "-c", code, *args], timeout=timeout, env=env)


def run_in_vm(
    argv: Sequence[str] | str, *, timeout: float = 600.0, **vm_options: object
) -> GuestResult:
    """Boot a VM, run one command, power off. For many commands keep a :class:`VM` instead.

    Result files: pass ``workdir=`` (shared with the guest at the same path) and
    let the command write there; a VM's own temporary workdir is removed at exit.
    """
    with VM(**vm_options) as vm:  # type: ignore[arg-type]
        return vm.run(argv, timeout=timeout)
