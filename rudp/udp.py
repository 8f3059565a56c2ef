"""Batched, non-blocking datagram I/O on one UDP socket.

The endpoint calls :func:`configure` once per socket, then :func:`recv_batch`
when the socket is readable and :func:`send_batch` / :func:`send_many` when it
flushes. On Linux the compiled ``rudp._udp`` moves many datagrams per system
call (``recvmmsg``/``sendmmsg``) and, above all, lets the kernel handle runs of
equal-sized datagrams as one buffer (UDP GSO on send, GRO on receive): on
loopback that is worth about 4x over a ``sendto`` loop, while batching system
calls alone gains little. :class:`PythonDatagramIO` is the portable fallback
and the readable specification of the behaviour; both give identical results.
The per-socket state (receive buffers, address caches, whether GSO still
works) lives in a :class:`DatagramIO` object that :func:`configure` attaches to
the socket; :func:`datagram_io` returns it.

Contract shared by both implementations:

- Nothing blocks. ``recv_batch`` returns ``[]`` when nothing is queued; the
  send functions return how many datagrams (a prefix, in order) the kernel
  took, and the caller keeps the rest for when the socket is writable again.
- A socket error (``ConnectionRefusedError`` after an ICMP port unreachable on
  a connected socket, for instance) is raised. When some datagrams already
  went through in the same call, they are reported normally and the error is
  raised by the next call instead, so nothing is lost or sent twice.
- GSO that fails with ``EIO``/``EINVAL``/``EMSGSIZE`` (a device or route that
  cannot segment) is switched off for the socket and the datagrams are resent
  plainly; :attr:`Capabilities.gso` then reads ``False``.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import sys
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Address",
    "Capabilities",
    "DatagramIO",
    "PythonDatagramIO",
    "configure",
    "datagram_io",
    "native_available",
    "recv_batch",
    "send_batch",
    "send_many",
]

Address = tuple[str, int] | tuple[str, int, int, int]

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: send-side segment size (GSO)
UDP_GRO = 104  # linux/udp.h: coalesce on receive, report the segment size
SO_SNDBUFFORCE = 32  # asm-generic/socket.h: as SO_SNDBUF, past wmem_max (needs CAP_NET_ADMIN)
SO_RCVBUFFORCE = 33
#: The kernel's UDP_MAX_SEGMENTS on older kernels (newer ones allow 128).
MAX_GSO_SEGMENTS = 64
#: Largest UDP payload over IPv4: one GSO buffer must fit in it.
MAX_GSO_BYTES = 65507
#: A receive slot holds any UDP datagram, or one GRO buffer.
RECV_SIZE = 65536
#: Payload bytes one recv_batch aims at: bigger batches of fresh bytes objects make
#: malloc hand the memory back to the kernel and fault it in again on the next call,
#: which costs more per datagram (about 4x at 1400 bytes here) than extra calls.
RECV_BUDGET = 65536
DEFAULT_BUFFER_SIZE = 4 * 1024 * 1024
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
_GRO_CONTROL = socket.CMSG_SPACE(_INT.size) if hasattr(socket, "CMSG_SPACE") else 0
_TRANSIENT = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)
_GSO_UNSUPPORTED = (errno.EIO, errno.EINVAL, errno.EMSGSIZE)

try:
    from rudp._udp import NativeDatagramIO
except ImportError:  # no compiler at install time, or not Linux
    NativeDatagramIO = None


@dataclass(frozen=True)
class Capabilities:
    """What the I/O layer uses on this socket (reported by ``rudp bench``)."""

    native: bool  #: the compiled Linux implementation is in use
    mmsg: bool  #: recvmmsg/sendmmsg
    gso: bool  #: UDP_SEGMENT on send
    gro: bool  #: UDP_GRO on receive
    rcvbuf: int  #: SO_RCVBUF as the kernel reports it (Linux doubles the request)
    sndbuf: int


class DatagramIO(Protocol):
    """The interface both implementations provide."""

    sock: socket.socket
    gso: bool
    gro: bool

    @property
    def capabilities(self) -> Capabilities: ...

    def recv_batch(self, max_datagrams: int | None = None) -> list[tuple[bytes, Address]]: ...

    def send_batch(self, datagrams: Iterable[bytes], addr: Address | None = None) -> int: ...

    def send_many(self, items: Iterable[tuple[bytes, Address]]) -> int: ...

    def stats(self) -> dict[str, int]: ...


def native_available() -> bool:
    """True when the compiled Linux implementation can be used."""
    return NativeDatagramIO is not None and sys.platform.startswith("linux")


def _set_buffer(sock: socket.socket, option: int, force_option: int, size: int) -> int:
    try:  # root may exceed net.core.[rw]mem_max
        sock.setsockopt(socket.SOL_SOCKET, force_option, size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)
    return sock.getsockopt(socket.SOL_SOCKET, option)


def grow_receive_buffer(sock: socket.socket, size: int) -> int:
    """Raise the socket's receive buffer to at least ``size`` bytes (never shrink it).

    Returns the size the kernel reports (Linux doubles what is asked, for its own
    bookkeeping). A server grows it as connections arrive, so the datagrams all
    their windows allow can wait in the socket instead of being dropped there.
    """
    current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if current >= size:
        return current
    return _set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, size)


def _enable_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def _gso_supported(sock: socket.socket) -> bool:
    try:  # the option is known (kernel >= 4.18); devices that can't segment are found on send
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def configure(
    sock: socket.socket,
    *,
    native: bool | None = None,
    gso: bool = True,
    gro: bool = True,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    max_datagrams: int = 64,
) -> Capabilities:
    """Make ``sock`` non-blocking, size its buffers, and set it up for batched I/O.

    ``native=None`` picks the compiled implementation when available, ``True``
    requires it (``RuntimeError`` otherwise), ``False`` forces the fallback.
    ``gso``/``gro`` allow those offloads (they are used only where the kernel
    has them); ``max_datagrams`` is the number of kernel messages one
    ``recv_batch`` takes (a GRO message may hold up to 64 datagrams).
    """
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError("sock must be an AF_INET or AF_INET6 SOCK_DGRAM socket")
    if not 1 <= max_datagrams <= 1024:
        raise ValueError(f"max_datagrams must be in [1, 1024], got {max_datagrams}")
    if not 1024 <= buffer_size <= 1 << 30:
        raise ValueError(f"buffer_size must be in [1024, {1 << 30}], got {buffer_size}")
    if native is None:
        native = native_available()
    elif native and not native_available():
        raise RuntimeError("the compiled rudp._udp extension is not available on this system")
    linux = sys.platform.startswith("linux")
    sock.setblocking(False)
    rcvbuf = _set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, buffer_size)
    sndbuf = _set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, buffer_size)
    use_gso = gso and linux and _gso_supported(sock)
    use_gro = gro and linux and _enable_gro(sock)
    cls = NativeDatagramIO if native else PythonDatagramIO
    io = cls(
        sock, gso=use_gso, gro=use_gro, max_datagrams=max_datagrams, rcvbuf=rcvbuf, sndbuf=sndbuf
    )
    _ios[sock] = io
    return io.capabilities


#: The I/O state of each configured socket; it goes away with the socket.
_ios: weakref.WeakKeyDictionary[socket.socket, DatagramIO] = weakref.WeakKeyDictionary()


def datagram_io(sock: socket.socket) -> DatagramIO:
    """The state :func:`configure` attached to ``sock`` (counters: ``.stats()``)."""
    try:
        return _ios[sock]
    except KeyError:
        raise ValueError("call rudp.udp.configure(sock) before batched I/O on it") from None


def recv_batch(
    sock: socket.socket, max_datagrams: int | None = None
) -> list[tuple[bytes, Address]]:
    """Receive what is queued on ``sock``: ``[(payload, address), ...]``, ``[]`` if nothing.

    ``max_datagrams`` bounds the kernel messages taken (a GRO message is split
    back into the datagrams it holds); a call also stops at about
    :data:`RECV_BUDGET` bytes, so call again while the socket stays readable.
    """
    return datagram_io(sock).recv_batch(max_datagrams)


def send_batch(sock: socket.socket, datagrams: Iterable[bytes], addr: Address | None = None) -> int:
    """Send ``datagrams`` to one peer (``addr=None`` on a connected socket), in order.

    Runs of equal-sized datagrams (the last may be shorter) go out as one GSO
    buffer. Returns how many were sent; the caller keeps the rest.
    """
    return datagram_io(sock).send_batch(datagrams, addr)


def send_many(sock: socket.socket, items: Iterable[tuple[bytes, Address]]) -> int:
    """Send ``[(payload, address), ...]`` to any number of peers, in order; returns how many went."""
    return datagram_io(sock).send_many(items)


class PythonDatagramIO:
    """Portable implementation: ``recvfrom``/``sendto``, or on Linux ``recvmsg``/``sendmsg``
    carrying the GRO/GSO control messages. The specification of the native one."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        gso: bool,
        gro: bool,
        max_datagrams: int = 64,
        rcvbuf: int = 0,
        sndbuf: int = 0,
    ) -> None:
        self.sock = sock
        self.gso = gso
        self.gro = gro
        self.max_datagrams = max_datagrams
        self.rcvbuf = rcvbuf
        self.sndbuf = sndbuf
        self._counters = dict.fromkeys(
            (
                "recv_calls",
                "recv_messages",
                "recv_datagrams",
                "send_calls",
                "send_messages",
                "send_datagrams",
                "truncated",
                "gso_fallbacks",
            ),
            0,
        )
        self._pending: OSError | None = None

    def stats(self) -> dict[str, int]:
        """Counters: system calls, kernel messages and datagrams each way, drops, GSO fallbacks."""
        return dict(self._counters)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            native=False,
            mmsg=False,
            gso=self.gso,
            gro=self.gro,
            rcvbuf=self.rcvbuf,
            sndbuf=self.sndbuf,
        )

    def _raise_pending(self) -> None:
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc

    # ------------------------------------------------------------------ receive

    def recv_batch(self, max_datagrams: int | None = None) -> list[tuple[bytes, Address]]:
        """Receive what is queued, up to ``max_datagrams`` kernel messages (see the module)."""
        self._raise_pending()
        limit = self.max_datagrams
        if max_datagrams is not None:
            if max_datagrams < 1:
                raise ValueError(f"max_datagrams must be at least 1, got {max_datagrams}")
            limit = min(limit, max_datagrams)
        out: list[tuple[bytes, Address]] = []
        sock = self.sock
        counters = self._counters
        taken = 0
        for _ in range(limit):
            if taken >= RECV_BUDGET:
                break
            counters["recv_calls"] += 1
            try:
                if self.gro:
                    data, ancdata, flags, addr = sock.recvmsg(RECV_SIZE, _GRO_CONTROL)
                    counters["recv_messages"] += 1
                    if flags & socket.MSG_TRUNC:
                        counters["truncated"] += 1
                        continue
                    segment = 0
                    for level, kind, value in ancdata:
                        if level == SOL_UDP and kind == UDP_GRO:
                            segment = _INT.unpack_from(value)[0]
                    taken += len(data)
                    if 0 < segment < len(data):
                        out.extend(
                            (data[off : off + segment], addr)
                            for off in range(0, len(data), segment)
                        )
                        continue
                else:
                    data, addr = sock.recvfrom(RECV_SIZE)
                    counters["recv_messages"] += 1
                    taken += len(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if out:
                    self._pending = exc
                    break
                raise
            out.append((data, addr))
        counters["recv_datagrams"] += len(out)
        return out

    # --------------------------------------------------------------------- send

    def send_batch(self, datagrams: Iterable[bytes], addr: Address | None = None) -> int:
        """Send ``datagrams`` to one peer (``None``: the connected one); returns how many went."""
        self._raise_pending()
        return self._send([(bytes(d) if not isinstance(d, bytes) else d, addr) for d in datagrams])

    def send_many(self, items: Iterable[tuple[bytes, Address]]) -> int:
        """Send ``[(payload, address), ...]`` in order; returns how many went."""
        self._raise_pending()
        return self._send([(bytes(d) if not isinstance(d, bytes) else d, a) for d, a in items])

    def _runs(self, items: Sequence[tuple[bytes, Address | None]], start: int) -> Iterable[int]:
        """End index of each GSO run (or single datagram) from ``start`` on."""
        j, n = start, len(items)
        while j < n:
            data, addr = items[j]
            size = len(data)
            k = j + 1
            if self.gso and size > 0:
                total = size
                while (
                    k < n
                    and k - j < MAX_GSO_SEGMENTS
                    and items[k][1] == addr
                    and len(items[k][0]) == size
                    and total + size <= MAX_GSO_BYTES
                ):
                    total += size
                    k += 1
                if (
                    k < n
                    and k - j < MAX_GSO_SEGMENTS
                    and items[k][1] == addr
                    and 0 < len(items[k][0]) < size
                    and total + len(items[k][0]) <= MAX_GSO_BYTES
                ):
                    k += 1
            yield k
            j = k

    def _send(self, items: Sequence[tuple[bytes, Address | None]]) -> int:
        sent = self._send_runs(items)
        self._counters["send_datagrams"] += sent
        return sent

    def _send_runs(self, items: Sequence[tuple[bytes, Address | None]]) -> int:
        sent = 0
        sock = self.sock
        counters = self._counters
        while True:
            start = sent
            for end in self._runs(items, start):
                data, addr = items[start]
                counters["send_calls"] += 1
                try:
                    if end - start > 1:
                        control = [(SOL_UDP, UDP_SEGMENT, _U16.pack(len(data)))]
                        payloads = [d for d, _ in items[start:end]]
                        if addr is None:
                            sock.sendmsg(payloads, control)
                        else:
                            sock.sendmsg(payloads, control, 0, addr)
                    elif addr is None:
                        sock.send(data)
                    else:
                        sock.sendto(data, addr)
                except (BlockingIOError, InterruptedError):
                    return sent
                except OSError as exc:
                    if exc.errno in _TRANSIENT:
                        return sent
                    if self.gso and end - start > 1 and exc.errno in _GSO_UNSUPPORTED:
                        self.gso = False  # this route cannot segment: resend plainly
                        counters["gso_fallbacks"] += 1
                        break
                    if sent:
                        self._pending = exc
                        return sent
                    raise
                except Exception as exc:  # a bad address after a partial send
                    if sent:
                        self._pending = exc
                        return sent
                    raise
                counters["send_messages"] += 1
                sent += end - start
                start = end
            else:
                return sent
