"""The ``rudp`` command: layered configuration, exit codes, serve/connect as netcat."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from rudp.cli import main

RUDP = [sys.executable, "-m", "rudp.cli"]


def test_print_config_layers_defaults_file_and_flags(tmp_path, capsys):
    config = tmp_path / "rudp.toml"
    config.write_text('mode = "fast2"\nmtu = 1200\nsndwnd = 64\ninterval = "20ms"\n')
    assert main(["connect", "h", "1", "-c", str(config), "--mtu", "1300", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert 'mode = "fast2"' in out  # from the file
    assert "mtu = 1300" in out  # the flag overrides the file
    assert "sndwnd = 64" in out and "interval = 0.02" in out
    assert "rcvwnd = 512" in out  # the built-in default


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--mtu", "20", "mtu"),
        ("--sndwnd", "0", "sndwnd"),
        ("--mode", "warp", "mode"),
        ("--fec", "300,3", "fec"),
    ],
)
def test_invalid_configuration_exits_2_naming_the_field(flag, value, field, capsys):
    assert main(["connect", "h", "1", flag, value, "--print-config"]) == 2
    assert field in capsys.readouterr().err


def test_unknown_field_in_config_file(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("windowz = 3\n")
    assert main(["serve", "0", "-c", str(config), "--print-config"]) == 2
    assert "windowz" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_and_connect_move_a_file(tmp_path):
    data = os.urandom(500_000)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    port = _free_udp_port()
    received = tmp_path / "out.bin"
    server = subprocess.Popen(
        [*RUDP, "serve", str(port), "--host", "127.0.0.1", "-v"],
        stdin=subprocess.DEVNULL,
        stdout=received.open("wb"),
        stderr=subprocess.PIPE,
    )
    try:
        server.stderr.readline()  # "rudp: serving on ...": the socket is bound
        with source.open("rb") as stdin:
            client = subprocess.run(
                [*RUDP, "connect", "127.0.0.1", str(port)],
                stdin=stdin,
                capture_output=True,
                timeout=60,
            )
        assert client.returncode == 0, client.stderr
        server.wait(timeout=30)
        assert server.returncode == 0
        assert received.read_bytes() == data
    finally:
        server.kill()


def test_connect_to_nothing_exits_1():
    port = _free_udp_port()
    result = subprocess.run(
        [*RUDP, "connect", "127.0.0.1", str(port), "--connect-timeout", "1s"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert b"refused" in result.stderr.lower() or b"nothing listens" in result.stderr.lower()
