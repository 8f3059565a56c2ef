"""Linux batched datagram I/O: ``recvmmsg``/``sendmmsg`` with UDP GSO and GRO.

The per-datagram cost of the kernel, not of the system call, dominates UDP on
Linux, so the large win is GSO (one ``sendmsg`` carries up to 64 equal-sized
datagrams as one buffer) and GRO (one receive returns them as one buffer plus
the segment size). ``sendmmsg``/``recvmmsg`` carry several such messages per
call. Payloads are sent straight from the caller's ``bytes`` objects (one
``iovec`` each, no copy); received bytes are copied once into the ``bytes``
objects handed back. Peer address objects come from a small cache keyed by the
raw ``sockaddr``, because a peer usually sends many datagrams in a row.

``rudp.udp.PythonDatagramIO`` is the readable specification of the same
behaviour; the tests hold both to identical results.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_XDECREF, Py_XINCREF
from libc.errno cimport EAGAIN, EINTR, EINVAL, EIO, EMSGSIZE, ENOBUFS, errno
from libc.stdint cimport uint16_t, uint32_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset, strerror

import socket as _socket

cdef extern from *:
    """
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <netinet/in.h>
    #include <arpa/inet.h>
    #include <netdb.h>
    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103
    #endif
    #ifndef UDP_GRO
    #define UDP_GRO 104
    #endif
    """
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    struct iovec:
        void *iov_base
        size_t iov_len

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    struct timespec:
        pass

    int AF_INET, AF_INET6, SOL_UDP, UDP_SEGMENT, UDP_GRO
    int MSG_DONTWAIT, MSG_TRUNC
    int NI_NUMERICHOST
    int EWOULDBLOCK

    int recvmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags, timespec *timeout) nogil
    int sendmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags) nogil
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)
    uint16_t ntohs(uint16_t)
    uint16_t htons(uint16_t)
    uint32_t ntohl(uint32_t)
    uint32_t htonl(uint32_t)
    int inet_pton(int af, const char *src, void *dst)
    int getnameinfo(const sockaddr *addr, socklen_t addrlen, char *host, socklen_t hostlen,
                    char *serv, socklen_t servlen, int flags)


cdef enum:
    # The kernel's UDP_MAX_SEGMENTS on older kernels (newer ones allow 128).
    MAX_GSO_SEGMENTS = 64
    # Largest UDP payload over IPv4; one GSO buffer must fit in it.
    MAX_GSO_BYTES = 65507
    # Datagrams handed to one sendmmsg call (below the kernel's UIO_MAXIOV of 1024).
    SEND_CHUNK = 256
    ADDR_CACHE_SIZE = 64  # power of two
    ADDR_LEN_MAX = 28  # sizeof(struct sockaddr_in6)
    # Control space for one u16 (GSO) or one int (GRO), with room to spare.
    CONTROL_SPACE = 64
    # Payload bytes one recv_batch aims at. Bigger batches of fresh bytes objects
    # make malloc return the freed memory to the kernel and fault it in again on
    # the next call, which costs more per datagram than the extra system calls.
    RECV_BUDGET = 65536
    HOST_TEXT_MAX = 1025  # NI_MAXHOST


cdef struct AddrEntry:
    unsigned char raw[ADDR_LEN_MAX]
    socklen_t length
    PyObject *obj


cdef union Control:
    cmsghdr align
    unsigned char data[CONTROL_SPACE]


cdef inline unsigned int _addr_hash(const unsigned char *raw, socklen_t length) nogil:
    cdef uint32_t h = 2166136261u
    cdef socklen_t i
    for i in range(2, length):  # skip the family: it is the same for every peer
        h = (h ^ raw[i]) * 16777619u
    return (h ^ (h >> 16)) & (ADDR_CACHE_SIZE - 1)


cdef int _errno_is_transient(int err) noexcept nogil:
    return err == EAGAIN or err == EWOULDBLOCK or err == ENOBUFS


cdef class NativeDatagramIO:
    """Batched non-blocking I/O on one UDP socket (use :func:`rudp.udp.configure`)."""

    cdef readonly object sock
    cdef readonly int family
    cdef readonly bint gro
    cdef public bint gso
    cdef readonly int max_datagrams
    cdef readonly Py_ssize_t recv_size
    # counters, see stats()
    cdef unsigned long long truncated
    cdef unsigned long long gso_fallbacks
    cdef unsigned long long recv_calls, recv_messages, recv_datagrams
    cdef unsigned long long send_calls, send_messages, send_datagrams
    cdef readonly int rcvbuf
    cdef readonly int sndbuf
    cdef object _pending
    cdef double _msg_bytes  # running average of payload bytes per received message
    cdef bint _recv_busy
    cdef bint _send_busy

    # receive side: one slot per message
    cdef unsigned char *_rbuf
    cdef mmsghdr *_rmsgs
    cdef iovec *_riov
    cdef sockaddr_in6 *_rnames
    cdef Control *_rctl
    cdef AddrEntry _rcache[ADDR_CACHE_SIZE]

    # send side: one iovec per datagram, one message per GSO run
    cdef mmsghdr _smsgs[SEND_CHUNK]
    cdef iovec _siov[SEND_CHUNK]
    cdef sockaddr_in6 _snames[SEND_CHUNK]
    cdef socklen_t _snamelens[SEND_CHUNK]
    cdef Control _sctl[SEND_CHUNK]
    cdef int _saddr_index[SEND_CHUNK]
    cdef int _msg_first[SEND_CHUNK]
    cdef object _last_send_addr
    cdef sockaddr_in6 _last_send_raw
    cdef socklen_t _last_send_len

    def __cinit__(self):
        self._rbuf = NULL
        self._rmsgs = NULL
        self._riov = NULL
        self._rnames = NULL
        self._rctl = NULL
        memset(self._rcache, 0, sizeof(self._rcache))

    def __init__(self, sock, *, bint gso, bint gro, int max_datagrams=64,
                 Py_ssize_t recv_size=65536, int rcvbuf=0, int sndbuf=0):
        if self._rbuf != NULL:
            raise RuntimeError("NativeDatagramIO is already initialised")
        if max_datagrams < 1 or max_datagrams > 1024:
            raise ValueError(f"max_datagrams must be in [1, 1024], got {max_datagrams}")
        if recv_size < 1 or recv_size > 65536:
            raise ValueError(f"recv_size must be in [1, 65536], got {recv_size}")
        if sock.family not in (_socket.AF_INET, _socket.AF_INET6):
            raise ValueError(f"socket family must be AF_INET or AF_INET6, got {sock.family!r}")
        self.sock = sock
        self.family = int(sock.family)
        self.gso = gso
        self.gro = gro
        self.max_datagrams = max_datagrams
        self.recv_size = recv_size
        self.rcvbuf = rcvbuf
        self.sndbuf = sndbuf
        self._pending = None
        self._msg_bytes = 1500.0
        self._last_send_addr = None
        self._last_send_len = 0
        # Slots are allocated once. Pages of the big buffer are only touched
        # (made resident) by datagrams actually received.
        self._rbuf = <unsigned char *> malloc(<size_t> max_datagrams * recv_size)
        self._rmsgs = <mmsghdr *> calloc(max_datagrams, sizeof(mmsghdr))
        self._riov = <iovec *> calloc(max_datagrams, sizeof(iovec))
        self._rnames = <sockaddr_in6 *> calloc(max_datagrams, sizeof(sockaddr_in6))
        self._rctl = <Control *> calloc(max_datagrams, sizeof(Control))
        if not (self._rbuf and self._rmsgs and self._riov and self._rnames and self._rctl):
            raise MemoryError()
        cdef int i
        for i in range(max_datagrams):
            self._riov[i].iov_base = self._rbuf + <size_t> i * recv_size
            self._riov[i].iov_len = recv_size
            self._rmsgs[i].msg_hdr.msg_iov = &self._riov[i]
            self._rmsgs[i].msg_hdr.msg_iovlen = 1
            self._rmsgs[i].msg_hdr.msg_name = &self._rnames[i]

    def __dealloc__(self):
        cdef int i
        for i in range(ADDR_CACHE_SIZE):
            Py_XDECREF(self._rcache[i].obj)
            self._rcache[i].obj = NULL
        free(self._rbuf)
        free(self._rmsgs)
        free(self._riov)
        free(self._rnames)
        free(self._rctl)

    @property
    def capabilities(self):
        from rudp.udp import Capabilities

        return Capabilities(
            native=True, mmsg=True, gso=self.gso, gro=self.gro,
            rcvbuf=self.rcvbuf, sndbuf=self.sndbuf,
        )

    def stats(self) -> dict:
        """Counters: system calls, kernel messages and datagrams each way, drops, GSO fallbacks."""
        return {
            "recv_calls": self.recv_calls,
            "recv_messages": self.recv_messages,
            "recv_datagrams": self.recv_datagrams,
            "send_calls": self.send_calls,
            "send_messages": self.send_messages,
            "send_datagrams": self.send_datagrams,
            "truncated": self.truncated,
            "gso_fallbacks": self.gso_fallbacks,
        }

    cdef inline void _raise_pending(self) except *:
        if self._pending is not None:
            exc = self._pending
            self._pending = None
            raise exc

    # ------------------------------------------------------------------ receive

    cdef object _address(self, const unsigned char *raw, socklen_t length):
        """The Python address tuple for a raw sockaddr, from the cache when possible."""
        if length > ADDR_LEN_MAX:
            length = ADDR_LEN_MAX
        cdef unsigned int h = _addr_hash(raw, length)
        cdef AddrEntry *entry = &self._rcache[h]
        if entry.obj != NULL and entry.length == length and memcmp(entry.raw, raw, length) == 0:
            return <object> entry.obj
        addr = self._make_address(raw, length)
        Py_XDECREF(entry.obj)
        Py_XINCREF(<PyObject *> addr)
        entry.obj = <PyObject *> addr
        memcpy(entry.raw, raw, length)
        entry.length = length
        return addr

    cdef object _make_address(self, const unsigned char *raw, socklen_t length):
        # The same text the socket module produces (getnameinfo, numeric host).
        cdef char host[HOST_TEXT_MAX]
        cdef const sockaddr *sa = <const sockaddr *> raw
        cdef const sockaddr_in *a4
        cdef const sockaddr_in6 *a6
        if getnameinfo(sa, length, host, HOST_TEXT_MAX, NULL, 0, NI_NUMERICHOST) != 0:
            raise OSError("getnameinfo failed for a received address")
        text = host.decode("ascii")
        if sa.sa_family == AF_INET:
            a4 = <const sockaddr_in *> raw
            return (text, ntohs(a4.sin_port))
        if sa.sa_family == AF_INET6:
            a6 = <const sockaddr_in6 *> raw
            return (text, ntohs(a6.sin6_port), ntohl(a6.sin6_flowinfo), a6.sin6_scope_id)
        raise OSError(f"unexpected address family {sa.sa_family}")

    def recv_batch(self, max_datagrams=None) -> list:
        """Receive what is queued, up to ``max_datagrams`` kernel messages.

        Returns ``[(payload, address), ...]`` in arrival order; a GRO buffer
        counts as one message and is split back into its datagrams. Returns an
        empty list when nothing is queued. ``OSError`` (for example
        ``ConnectionRefusedError`` on a connected socket after an ICMP port
        unreachable) is raised; if datagrams were already received in the same
        call, they are returned and the error is raised by the next call.
        """
        cdef int vlen = self.max_datagrams
        cdef int fd, n, i, err, gso_size
        cdef unsigned int length, off, seg
        cdef msghdr *hdr
        cdef cmsghdr *cm
        cdef unsigned char *base
        self._raise_pending()
        if max_datagrams is not None:
            vlen = max_datagrams
            if vlen < 1:
                raise ValueError(f"max_datagrams must be at least 1, got {max_datagrams}")
            if vlen > self.max_datagrams:
                vlen = self.max_datagrams
        if vlen > RECV_BUDGET / self._msg_bytes:
            vlen = max(1, <int> (RECV_BUDGET / self._msg_bytes))
        if self._recv_busy:
            raise RuntimeError("recv_batch called concurrently on one DatagramIO")
        fd = self.sock.fileno()
        for i in range(vlen):
            hdr = &self._rmsgs[i].msg_hdr
            hdr.msg_namelen = sizeof(sockaddr_in6)
            hdr.msg_flags = 0
            if self.gro:
                hdr.msg_control = &self._rctl[i]
                hdr.msg_controllen = sizeof(Control)
            else:
                hdr.msg_control = NULL
                hdr.msg_controllen = 0
        self._recv_busy = True
        try:
            while True:
                with nogil:
                    n = recvmmsg(fd, self._rmsgs, vlen, MSG_DONTWAIT, NULL)
                    err = errno
                self.recv_calls += 1
                if n >= 0 or err != EINTR:
                    break
        finally:
            self._recv_busy = False
        out = []
        if n < 0:
            if err == EAGAIN or err == EWOULDBLOCK:
                return out
            raise OSError(err, strerror(err).decode())
        self.recv_messages += n
        cdef size_t total = 0
        for i in range(n):
            total += self._rmsgs[i].msg_len
        if n:
            self._msg_bytes = 0.75 * self._msg_bytes + 0.25 * max(1.0, <double> total / n)
        for i in range(n):
            hdr = &self._rmsgs[i].msg_hdr
            if hdr.msg_flags & MSG_TRUNC:
                self.truncated += 1
                continue
            length = self._rmsgs[i].msg_len
            base = <unsigned char *> self._riov[i].iov_base
            addr = self._address(<const unsigned char *> hdr.msg_name, hdr.msg_namelen)
            gso_size = 0
            if hdr.msg_controllen:
                cm = CMSG_FIRSTHDR(hdr)
                while cm != NULL:
                    if cm.cmsg_level == SOL_UDP and cm.cmsg_type == UDP_GRO:
                        memcpy(&gso_size, CMSG_DATA(cm), sizeof(int))
                    cm = CMSG_NXTHDR(hdr, cm)
            if gso_size <= 0 or <unsigned int> gso_size >= length:
                out.append((PyBytes_FromStringAndSize(<char *> base, length), addr))
                continue
            off = 0
            while off < length:
                seg = length - off
                if seg > <unsigned int> gso_size:
                    seg = gso_size
                out.append((PyBytes_FromStringAndSize(<char *> base + off, seg), addr))
                off += seg
        self.recv_datagrams += len(out)
        return out

    # --------------------------------------------------------------------- send

    cdef socklen_t _sockaddr(self, object addr, sockaddr_in6 *out) except 0:
        """Fill ``out`` from a Python address; numeric hosts fast, names via getaddrinfo."""
        cdef sockaddr_in *a4 = <sockaddr_in *> out
        cdef long port, flowinfo = 0, scope_id = 0
        if not isinstance(addr, tuple) or len(addr) < 2:
            raise TypeError(f"address must be a (host, port) tuple, got {addr!r}")
        host = addr[0]
        port = addr[1]
        if not 0 <= port <= 65535:
            raise OverflowError("port must be 0-65535.")
        memset(out, 0, sizeof(sockaddr_in6))
        host_b = host.encode("idna") if isinstance(host, str) else bytes(host)
        if self.family == AF_INET:
            if len(addr) != 2:
                raise TypeError(f"AF_INET address must be a (host, port) tuple, got {addr!r}")
            a4.sin_family = AF_INET
            a4.sin_port = htons(<uint16_t> port)
            if inet_pton(AF_INET, host_b, &a4.sin_addr) == 1:
                return sizeof(sockaddr_in)
        else:
            if len(addr) > 4:
                raise TypeError(f"AF_INET6 address must be a 2- to 4-tuple, got {addr!r}")
            if len(addr) > 2:
                flowinfo = addr[2]
            if len(addr) > 3:
                scope_id = addr[3]
            out.sin6_family = AF_INET6
            out.sin6_port = htons(<uint16_t> port)
            out.sin6_flowinfo = htonl(<uint32_t> flowinfo)
            out.sin6_scope_id = <uint32_t> scope_id
            if inet_pton(AF_INET6, host_b, &out.sin6_addr) == 1:
                return sizeof(sockaddr_in6)
        # Not numeric (a name, '', '<broadcast>', a scoped IPv6 literal): resolve as
        # the socket module would, then convert the numeric result.
        resolved = _socket.getaddrinfo(host, port, self.family, _socket.SOCK_DGRAM)[0][4]
        if self.family == AF_INET6 and len(addr) > 2:
            resolved = (resolved[0], resolved[1], flowinfo, scope_id or resolved[3])
        if resolved[0] == host:
            raise OSError(f"cannot convert address {addr!r}")
        return self._sockaddr(resolved, out)

    cdef int _send_address(self, object addr) except -1:
        """Convert ``addr`` into ``_last_send_raw`` unless it is the address used last."""
        if addr is self._last_send_addr and self._last_send_len:
            return 0
        if self._last_send_len and self._last_send_addr == addr:
            self._last_send_addr = addr
            return 0
        self._last_send_len = 0
        self._last_send_len = self._sockaddr(addr, &self._last_send_raw)
        self._last_send_addr = addr
        return 0

    def send_batch(self, datagrams, addr=None) -> int:
        """Send ``datagrams`` to one peer (``addr=None`` on a connected socket).

        Runs of equal-sized datagrams (the last of a run may be shorter) go out
        as one GSO buffer, everything in as few ``sendmmsg`` calls as possible.
        Returns how many datagrams were sent, in order: fewer than given when
        the socket buffer is full (the caller keeps the rest).
        """
        cdef tuple seq = tuple(datagrams)
        self._raise_pending()
        if addr is not None:
            self._send_address(addr)
        return self._send(seq, addr is not None, False)

    def send_many(self, items) -> int:
        """Send ``[(payload, address), ...]``, to any number of peers, in order.

        Same contract as :meth:`send_batch`; consecutive datagrams to one peer
        still share GSO buffers.
        """
        cdef tuple seq = tuple(items)
        self._raise_pending()
        return self._send(seq, True, True)

    cdef Py_ssize_t _send(self, tuple seq, bint addressed, bint per_item) except -1:
        cdef Py_ssize_t total = len(seq)
        cdef Py_ssize_t start = 0, sent = 0, done
        if self._send_busy:
            raise RuntimeError("send called concurrently on one DatagramIO")
        self._send_busy = True
        try:
            while start < total:
                try:
                    done = self._send_chunk(seq, start, addressed, per_item)
                except Exception as exc:  # report what went; the next call raises
                    if not sent:
                        raise
                    self._pending = exc
                    break
                sent += done
                self.send_datagrams += done
                if done < min(total - start, SEND_CHUNK):
                    break
                start += done
        finally:
            self._send_busy = False
        return sent

    cdef Py_ssize_t _send_chunk(self, tuple seq, Py_ssize_t start, bint addressed,
                                bint per_item) except -1:
        """Send up to SEND_CHUNK datagrams from ``seq[start:]``; returns how many went."""
        cdef Py_ssize_t count = min(len(seq) - start, SEND_CHUNK)
        cdef Py_ssize_t i, sent = 0
        cdef int naddrs = 0, first, nmsgs, m0, r, err, fd, k
        cdef list keep = None  # non-bytes payloads converted for this call
        cdef object data
        for i in range(count):
            item = seq[start + i]
            if per_item:
                if not isinstance(item, tuple) or len(<tuple> item) != 2:
                    raise TypeError(f"send_many items must be (payload, address) pairs, got {item!r}")
                data = (<tuple> item)[0]
                if (<tuple> item)[1] is not self._last_send_addr or not self._last_send_len:
                    self._send_address((<tuple> item)[1])
                    naddrs = self._intern_address(naddrs)
                elif naddrs == 0:
                    naddrs = self._intern_address(naddrs)
                self._saddr_index[i] = naddrs - 1
            else:
                data = item
                self._saddr_index[i] = 0
            if not PyBytes_CheckExact(data):
                data = bytes(data)
                if keep is None:
                    keep = []
                keep.append(data)
            self._siov[i].iov_base = PyBytes_AS_STRING(data)
            self._siov[i].iov_len = PyBytes_GET_SIZE(data)
        if addressed and not per_item:
            memcpy(&self._snames[0], &self._last_send_raw, sizeof(sockaddr_in6))
            self._snamelens[0] = self._last_send_len
        fd = self.sock.fileno()
        first = 0
        while True:
            nmsgs = self._build_messages(first, <int> count, addressed)
            m0 = 0
            while m0 < nmsgs:
                with nogil:
                    r = sendmmsg(fd, &self._smsgs[m0], nmsgs - m0, 0)
                    err = errno
                self.send_calls += 1
                if r > 0:
                    self.send_messages += r
                    for k in range(m0, m0 + r):
                        sent += self._smsgs[k].msg_hdr.msg_iovlen
                    m0 += r
                    continue
                if err == EINTR:
                    continue
                if _errno_is_transient(err):
                    return sent
                if (self.gso and self._smsgs[m0].msg_hdr.msg_iovlen > 1
                        and (err == EIO or err == EINVAL or err == EMSGSIZE)):
                    # This route cannot segment: remember, and resend the rest plainly.
                    self.gso = False
                    self.gso_fallbacks += 1
                    first = self._msg_first[m0]
                    break
                exc = OSError(err, strerror(err).decode())
                if sent:
                    self._pending = exc
                    return sent
                raise exc
            else:
                return sent

    cdef int _intern_address(self, int naddrs) except -1:
        """Make ``_last_send_raw`` the current entry of this chunk's address table."""
        if naddrs and self._snamelens[naddrs - 1] == self._last_send_len and memcmp(
                &self._snames[naddrs - 1], &self._last_send_raw, self._last_send_len) == 0:
            return naddrs
        memcpy(&self._snames[naddrs], &self._last_send_raw, sizeof(sockaddr_in6))
        self._snamelens[naddrs] = self._last_send_len
        return naddrs + 1

    cdef int _build_messages(self, int first, int count, bint addressed) noexcept:
        """Group datagrams ``first..count-1`` into messages (GSO runs); returns the count."""
        cdef int j = first, k, nmsgs = 0, a
        cdef size_t size, total
        cdef msghdr *hdr
        cdef cmsghdr *cm
        while j < count:
            size = self._siov[j].iov_len
            a = self._saddr_index[j]
            k = j + 1
            if self.gso and size > 0:
                total = size
                while (k < count and k - j < MAX_GSO_SEGMENTS and self._saddr_index[k] == a
                       and self._siov[k].iov_len == size and total + size <= MAX_GSO_BYTES):
                    total += size
                    k += 1
                # A run may end with one shorter datagram.
                if (k < count and k - j < MAX_GSO_SEGMENTS and self._saddr_index[k] == a
                        and 0 < self._siov[k].iov_len < size
                        and total + self._siov[k].iov_len <= MAX_GSO_BYTES):
                    k += 1
            hdr = &self._smsgs[nmsgs].msg_hdr
            memset(hdr, 0, sizeof(msghdr))
            hdr.msg_iov = &self._siov[j]
            hdr.msg_iovlen = k - j
            if addressed:
                hdr.msg_name = &self._snames[a]
                hdr.msg_namelen = self._snamelens[a]
            if k - j > 1:
                memset(&self._sctl[nmsgs], 0, sizeof(Control))
                hdr.msg_control = &self._sctl[nmsgs]
                hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
                cm = CMSG_FIRSTHDR(hdr)
                cm.cmsg_level = SOL_UDP
                cm.cmsg_type = UDP_SEGMENT
                cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                (<uint16_t *> CMSG_DATA(cm))[0] = <uint16_t> size
            self._msg_first[nmsgs] = j
            nmsgs += 1
            j = k
        return nmsgs
