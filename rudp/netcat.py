"""``rudp serve`` and ``rudp connect``: netcat over rudp (stdin → stream → stdout).

``rudp serve 9000 > file`` and ``rudp connect HOST 9000 < file`` move a file;
``rudp serve 9000 --echo`` is an echo server for tests and benchmarks. End of
stdin half-closes the stream (the peer reads EOF); the command ends when the
peer's EOF has been written to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from collections.abc import AsyncIterator

import rudp
from rudp.cli import add_configuration_arguments, configuration_from_args, format_configuration

COPY_CHUNK = 64 * 1024


def _address(parser: argparse.ArgumentParser, server: bool) -> None:
    if server:
        parser.add_argument("port", type=int, help="UDP port to listen on (0: any free port)")
        parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    else:
        parser.add_argument("host", help="server host name or address")
        parser.add_argument("port", type=int, help="server UDP port")
    add_configuration_arguments(parser)


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    _address(parser, server=True)
    parser.add_argument("--echo", action="store_true", help="echo every connection's bytes back")
    parser.add_argument(
        "-k",
        "--keep-open",
        action="store_true",
        help="keep serving after the first connection ends",
    )


def connect_arguments(parser: argparse.ArgumentParser) -> None:
    _address(parser, server=False)


async def _stdin_chunks() -> AsyncIterator[bytes]:
    """stdin in chunks, read by a daemon thread: epoll cannot watch regular files or
    /dev/null, and a daemon thread blocked on a terminal never delays exit."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    def read() -> None:
        while True:
            data = sys.stdin.buffer.read1(COPY_CHUNK)
            asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            if not data:
                return

    threading.Thread(target=read, name="rudp-stdin", daemon=True).start()
    while data := await queue.get():
        yield data


async def _pump_in(writer: rudp.StreamWriter) -> None:
    """stdin → stream, then half-close."""
    async for data in _stdin_chunks():
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def _pump_out(reader: rudp.StreamReader) -> None:
    """stream → stdout until the peer's EOF."""
    loop = asyncio.get_running_loop()
    out = sys.stdout.buffer

    def write(data: bytes) -> None:  # in a thread: a full pipe must not stall the event loop
        out.write(data)
        out.flush()

    while data := await reader.read(COPY_CHUNK):
        await loop.run_in_executor(None, write, data)


async def _copy_both_ways(reader: rudp.StreamReader, writer: rudp.StreamWriter) -> None:
    pump_in = asyncio.ensure_future(_pump_in(writer))
    try:
        await _pump_out(reader)
        if writer.can_write_eof() and not pump_in.done():
            await pump_in  # finish sending what stdin still has
    finally:
        pump_in.cancel()
    writer.close()
    await writer.wait_closed()


async def _serve(args: argparse.Namespace) -> int:
    config = configuration_from_args(args)
    done = asyncio.get_running_loop().create_future()

    async def echo(reader: rudp.StreamReader, writer: rudp.StreamWriter) -> None:
        while data := await reader.read(COPY_CHUNK):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def netcat(reader: rudp.StreamReader, writer: rudp.StreamWriter) -> None:
        try:
            await _copy_both_ways(reader, writer)
        finally:
            if not args.keep_open and not done.done():
                done.set_result(None)

    server = await rudp.start_server(
        echo if args.echo else netcat, args.host, args.port, configuration=config
    )
    async with server:
        if args.verbose:
            print(f"rudp: serving on {server.addresses()[0]}", file=sys.stderr)
        if args.echo or args.keep_open:
            await server.serve_forever()
        else:
            await done
    return 0


async def _connect(args: argparse.Namespace) -> int:
    config = configuration_from_args(args)
    reader, writer = await rudp.open_connection(args.host, args.port, configuration=config)
    if args.verbose:
        print(f"rudp: connected to {writer.get_extra_info('peername')}", file=sys.stderr)
    await _copy_both_ways(reader, writer)
    if args.verbose:
        print(f"rudp: {writer.get_extra_info('stats')}", file=sys.stderr)
    return 0


def _run(main, args: argparse.Namespace) -> int:
    if args.print_config:
        print(format_configuration(configuration_from_args(args)))
        return 0
    try:
        return asyncio.run(main(args))
    except (rudp.RudpError, OSError) as exc:
        print(f"rudp: {exc}", file=sys.stderr)
        return 1


def serve(args: argparse.Namespace) -> int:
    return _run(_serve, args)


def connect(args: argparse.Namespace) -> int:
    return _run(_connect, args)
