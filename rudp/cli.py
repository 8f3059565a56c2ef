"""The ``rudp`` command.

Settings come in three layers, each overriding the one before: the built-in
defaults of :class:`rudp.Configuration`, a TOML file (``-c FILE``), then
command-line flags. ``--print-config`` shows the result. The flags are derived
from the dataclass fields, so a new configuration field is a new flag with no
second list to keep in sync.

Exit codes: 0 success, 1 failure (network, peer, I/O), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import tomllib
from collections.abc import Callable, Sequence
from typing import Any

from rudp import units
from rudp.config import Configuration

__all__ = ["add_configuration_arguments", "configuration_from_args", "main"]

_DURATIONS = {
    "interval",
    "rto_min",
    "rto_max",
    "connect_timeout",
    "idle_timeout",
    "keepalive",
    "close_timeout",
}
_SIZES = {
    "max_message_size",
    "stream_buffer",
    "session_buffer",
    "send_buffer",
    "max_frame_size",
    "mtu",
}


def _parse_fec(text: str) -> Any:
    """``off``, ``auto`` or ``DATA,PARITY`` (also ``DATA/PARITY``, ``DATA+PARITY``)."""
    text = text.strip().lower()
    if text in ("off", "auto"):
        return text
    for sep in (",", "/", "+", ":"):
        if sep in text:
            k, m = text.split(sep, 1)
            try:
                return (int(k), int(m))
            except ValueError:
                break
    raise ValueError(f"fec: expected off, auto or DATA,PARITY (e.g. 10,3), got {text!r}")


def _field_parser(field: dataclasses.Field[Any]) -> Callable[[Any], Any]:
    name = field.name
    if name in _DURATIONS:
        return lambda v: units.parse_duration(v, name)
    if name in _SIZES:
        return lambda v: units.parse_size(v, name)
    if name == "fec":
        return lambda v: v if isinstance(v, list | tuple) else _parse_fec(str(v))
    if str(field.type).startswith("int"):
        return lambda v: int(v) if not isinstance(v, str) else int(units.parse_size(v, name))
    return lambda v: v


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_configuration_arguments(
    parser: argparse.ArgumentParser, rename: dict[str, str] | None = None
) -> None:
    """Add ``-c``/``--print-config`` and one flag per :class:`Configuration` field.

    ``rename`` maps a field name to another flag name, for commands whose own
    options would clash (``{"interval": "arq-interval"}``).
    """
    rename = rename or {}
    group = parser.add_argument_group("rudp configuration (defaults < -c FILE < flags)")
    group.add_argument("-c", "--config", metavar="FILE", help="TOML file of configuration fields")
    group.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    for field in dataclasses.fields(Configuration):
        default = field.default
        help_text = f"(default: {default})"
        if isinstance(default, bool) or str(field.type).startswith("bool"):
            group.add_argument(
                _option(rename.get(field.name, field.name)),
                dest=f"cfg_{field.name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            group.add_argument(
                _option(rename.get(field.name, field.name)),
                dest=f"cfg_{field.name}",
                default=None,
                metavar=field.name.upper(),
                help=help_text,
            )


def _coerce(values: dict[str, Any], source: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(Configuration)}
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"{source}: unknown configuration field {key!r}")
        out[name] = _field_parser(fields[name])(value)
    return out


def configuration_from_args(args: argparse.Namespace, **overrides: Any) -> Configuration:
    """Defaults, then the ``-c`` TOML file, then flags, then ``overrides`` from code."""
    layered: dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config, "rb") as f:
            layered.update(_coerce(tomllib.load(f), args.config))
    flags = {
        f.name: getattr(args, f"cfg_{f.name}")
        for f in dataclasses.fields(Configuration)
        if getattr(args, f"cfg_{f.name}", None) is not None
    }
    layered.update(_coerce(flags, "command line"))
    layered.update(overrides)
    return Configuration(**layered)


def format_configuration(config: Configuration) -> str:
    """The configuration as TOML (loadable again with ``-c``)."""
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f'"{value}"'
        elif isinstance(value, tuple):
            text = "[" + ", ".join(map(str, value)) + "]"
        else:
            text = repr(value)
        lines.append(f"{field.name} = {text}")
    return "\n".join(lines)


#: Subcommand name → ``module`` providing ``add_arguments(parser)`` and ``run(args) -> int``,
#: or ``module:name`` providing ``name_arguments(parser)`` and ``name(args) -> int``.
SUBCOMMANDS: dict[str, str] = {
    "serve": "rudp.netcat:serve",
    "connect": "rudp.netcat:connect",
    "bench": "rudp.bench",
    "sim": "rudp.sim",
    "tunnel": "rudp.tunnel",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rudp", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more output (repeatable)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in SUBCOMMANDS.items():
        module_name, _, function = target.partition(":")
        module = importlib.import_module(module_name)
        add_arguments = getattr(module, f"{function}_arguments" if function else "add_arguments")
        run = getattr(module, function or "run")
        sub = subparsers.add_parser(name, help=(module.__doc__ or "").strip().split("\n")[0])
        sub.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except ValueError as exc:
        print(f"rudp: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
