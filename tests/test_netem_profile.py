"""Profiles: parsing, validation, tc rendering, shipped files, distribution tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import netem
from netem.distributions import table
from netem.profile import Impairment, Profile, Slot

# The exact tc command line every shipped profile stands for (one direction).
SHIPPED = {
    "lan": "delay 500us",
    "wifi": "delay 5ms 2ms loss 1%",
    "4g": "delay 20ms 5ms loss 2% rate 20mbit",
    "lossy": "delay 25ms loss 10%",
    "burst": "delay 25ms loss gemodel 1% 20% 100% 0%",
    "weak-mobile": "delay 100ms 75ms distribution paretonormal loss 11% rate 100mbit",
    "satellite": "delay 300ms loss 1% rate 10mbit",
    "kcp-sim": "delay 46ms 16ms loss 5% rate 10gbit",
}


def test_every_required_profile_ships():
    assert sorted(SHIPPED) == netem.list_profiles()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profile_renders_as_its_tc_command(name):
    profile = netem.load_profile(name)
    assert profile.name == name
    assert profile.description
    assert profile.forward.tc_args() == SHIPPED[name]
    assert profile.reverse.tc_args() == SHIPPED[name]
    assert profile.tc_commands("veth-c", "veth-s") == [
        f"tc qdisc add dev veth-c root netem {SHIPPED[name]}",
        f"tc qdisc add dev veth-s root netem {SHIPPED[name]}",
    ]
    assert Impairment.from_tc_args(SHIPPED[name]) == profile.forward


def test_shipped_values_match_the_reference_table():
    lossy = netem.load_profile("lossy").forward
    assert (lossy.delay, lossy.jitter, lossy.loss) == (0.025, 0.0, 0.10)
    kcp = netem.load_profile("kcp-sim").forward
    assert (kcp.delay - kcp.jitter, kcp.delay + kcp.jitter) == pytest.approx((0.030, 0.062))
    assert kcp.rate > 0  # FIFO, like KCP's simulator
    burst = netem.load_profile("burst").forward
    p, r, bad_loss, _good_loss = burst.loss_gemodel
    assert p / (p + r) * bad_loss == pytest.approx(0.05, abs=0.005)
    mobile = netem.load_profile("weak-mobile").forward
    assert (mobile.delay, mobile.jitter, mobile.loss) == (0.100, 0.075, 0.11)
    assert netem.load_profile("4g").forward.rate == 20_000_000
    assert netem.load_profile("satellite").forward.rate == 10_000_000


def test_inline_options_build_a_symmetric_profile():
    profile = Profile.from_options(delay="40ms", jitter="10ms", loss="2%")
    assert profile.forward == profile.reverse
    assert profile.forward.tc_args() == "delay 40ms 10ms loss 2%"
    assert profile.name == "inline"


def test_inline_options_override_a_base_profile_keeping_the_rest():
    lossy = netem.load_profile("lossy")
    profile = Profile.from_options(base=lossy, loss="5%", rate="1mbit")
    assert profile.forward.tc_args() == "delay 25ms loss 5% rate 1mbit"
    assert profile.name == "lossy+inline"
    assert Profile.from_options(base=lossy) is lossy


def test_a_loss_option_replaces_the_whole_loss_model():
    burst = netem.load_profile("burst").forward
    assert burst.with_options({"loss": "3%"}).tc_args() == "delay 25ms loss 3%"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("delay 100ms 10ms 25% distribution normal", "delay 100ms 10ms 25% distribution normal"),
        ("loss random 2% 30%", "loss 2% 30%"),
        ("loss state 1%", "loss state 1% 99% 0% 100% 0%"),  # tc's defaults
        ("loss state 1% 30% 2% 40% 0.5%", "loss state 1% 30% 2% 40% 0.5%"),
        ("loss gemodel 1%", "loss gemodel 1% 99% 100% 0%"),  # Bernoulli, tc's defaults
        ("loss gemodel 1% 20% 70%", "loss gemodel 1% 20% 70% 0%"),
        ("delay 10ms reorder 25% 50% gap 5", "delay 10ms reorder 25% 50% gap 5"),
        ("delay 10ms reorder 25%", "delay 10ms reorder 25%"),
        ("duplicate 1% corrupt 0.1% 5%", "duplicate 1% corrupt 0.1% 5%"),
        ("rate 5kbit 20 100 5", "rate 5kbit 20 100 5"),
        ("rate 1mbit -14", "rate 1mbit -14"),
        ("limit 50 delay 1ms", "limit 50 delay 1ms"),
        ("slot 800us 2ms packets 4 bytes 6000", "slot 800us 2ms packets 4 bytes 6000"),
        (
            "slot distribution pareto 5ms 1ms packets 8",
            "slot distribution pareto 5ms 1ms packets 8",
        ),
        ("slot 1ms delay 5ms", "delay 5ms slot 1ms"),
        ("", ""),
    ],
)
def test_tc_syntax_parses_and_prints_back(text, expected):
    imp = Impairment.from_tc_args(text)
    assert imp.tc_args() == expected
    assert Impairment.from_tc_args(imp.tc_args()) == imp


def test_gap_defaults_to_one_as_tc_sends_it():
    assert Impairment.from_tc_args("delay 10ms reorder 25%").gap == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": "150%"}, "loss"),
        ({"loss": "2"}, "loss: write percentages with '%'"),
        ({"delay": "25"}, "delay: write a time with its unit"),
        ({"delay": "-5ms"}, "delay"),
        ({"delay": "300s"}, "delay must be in"),
        ({"delay": "10ms", "jitter": "3s"}, "jitter must be in"),
        ({"rate": "fast"}, "rate"),
        ({"rate": "4bit"}, "rate must be 0"),
        ({"delay": "10ms 2ms", "distribution": "gaussian"}, "distribution must be one of"),
        (
            {"delay": "10ms", "distribution": "normal"},
            "distribution normal needs a delay and a jitter",
        ),
        ({"gap": 5}, "gap needs a reorder"),
        ({"reorder": "10%"}, "reorder needs a delay"),
        ({"loss": "state 60% 10% 0% 100% 50%"}, "p13 + p14"),
        ({"loss": "gemodel 1% 20% 30% 40% 50%"}, "expected 1 to 4"),
        ({"limit": 0}, "limit must be in"),
        ({"limit": "many"}, "limit: expected an integer"),
        ({"latency": "10ms"}, "unknown netem option(s) latency"),
        ({"slot": "5ms 1ms"}, "max_delay"),
        ({"packet_overhead": 14}, "need a rate"),
    ],
)
def test_invalid_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Profile.from_options(**options)


def test_two_loss_models_are_rejected():
    with pytest.raises(ValueError, match="one loss model"):
        Impairment(loss=0.1, loss_gemodel=(0.01, 0.2, 1.0, 0.0))


def test_unknown_tc_word_is_rejected_with_the_known_list():
    with pytest.raises(ValueError, match="unknown netem option 'ecn'"):
        Impairment.from_tc_args("loss 1% ecn")


def test_profile_file_with_per_direction_overrides(tmp_path: Path):
    path = tmp_path / "asym.toml"
    path.write_text(
        'description = "uplink slower"\ndelay = "20ms"\n'
        '[forward]\nrate = "1mbit"\n[reverse]\nrate = "10mbit"\nloss = "1%"\n'
    )
    profile = netem.load_profile(path)
    assert profile.name == "asym"
    assert not profile.symmetric
    assert profile.tc_commands("a", "b") == [
        "tc qdisc add dev a root netem delay 20ms rate 1mbit",
        "tc qdisc add dev b root netem delay 20ms loss 1% rate 10mbit",
    ]
    assert netem.load_profile(str(path)) == profile


def test_profile_file_accepts_a_raw_tc_string(tmp_path: Path):
    path = tmp_path / "raw.toml"
    path.write_text('netem = "delay 10ms 1ms loss 2%"\nlimit = 50\n')
    assert netem.load_profile(path).forward.tc_args() == "limit 50 delay 10ms 1ms loss 2%"


def test_invalid_profile_file_names_the_direction_and_field(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text('delay = "20ms"\n[reverse]\nloss = "lots"\n')
    with pytest.raises(ValueError, match=r"profile bad: reverse\.loss"):
        netem.load_profile(path)
    path.write_text("delay = [\n")
    with pytest.raises(ValueError, match="profile bad: invalid TOML"):
        netem.load_profile(path)
    path.write_text("loss = 0.1\n")
    with pytest.raises(ValueError, match=r"profile bad\.loss: write percentages"):
        netem.load_profile(path)


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'moon'.*lossy"):
        netem.load_profile("moon")
    with pytest.raises(ValueError, match="not found"):
        netem.load_profile("/nonexistent/x.toml")


def test_slot_needs_one_form():
    with pytest.raises(ValueError, match="slot jitter"):
        Slot(distribution="normal", delay=0.005)
    assert Impairment(slot=Slot(min_delay=0.001, max_delay=0.001)).tc_args() == "slot 1ms"


# Generated impairments round-trip through their tc text.
_percent = st.integers(min_value=0, max_value=10000).map(lambda v: v / 10000)
_time = st.integers(min_value=0, max_value=2_000_000).map(lambda us: us / 1e6)


@st.composite
def impairments(draw):
    delay = draw(_time)
    jitter = draw(_time) if delay else 0.0
    kwargs = {"delay": delay, "jitter": jitter}
    if jitter:
        kwargs["delay_correlation"] = draw(_percent)
        if draw(st.booleans()):
            kwargs["distribution"] = draw(st.sampled_from(["normal", "pareto", "paretonormal"]))
    model = draw(st.sampled_from(["none", "random", "state", "gemodel"]))
    if model == "random":
        kwargs["loss"] = draw(_percent.filter(bool))
        kwargs["loss_correlation"] = draw(_percent)
    elif model == "state":
        p13 = draw(_percent)
        p14 = draw(_percent) * (1 - p13)
        p31 = draw(_percent)
        p32 = draw(_percent) * (1 - p31)
        kwargs["loss_state"] = (p13, p31, p32, draw(_percent), p14)
    elif model == "gemodel":
        kwargs["loss_gemodel"] = tuple(draw(_percent) for _ in range(4))
    for name in ("duplicate", "corrupt"):
        kwargs[name] = draw(_percent)
        if kwargs[name]:
            kwargs[f"{name}_correlation"] = draw(_percent)
    if delay and draw(st.booleans()):
        kwargs["reorder"] = draw(_percent.filter(bool))
        kwargs["gap"] = draw(st.integers(min_value=1, max_value=10))
    if draw(st.booleans()):
        kwargs["rate"] = draw(st.integers(min_value=1, max_value=10**10)) * 8
        kwargs["packet_overhead"] = draw(st.integers(min_value=-14, max_value=100))
    kwargs["limit"] = draw(st.integers(min_value=1, max_value=100000))
    return Impairment(**kwargs)


@given(impairments())
def test_tc_text_round_trips(imp):
    assert Impairment.from_tc_args(imp.tc_args()) == imp


def _installed_table(name: str) -> list[int] | None:
    for folder in ("/usr/lib/x86_64-linux-gnu/tc", "/usr/lib/tc", "/usr/lib64/tc"):
        path = Path(folder) / f"{name}.dist"
        if path.exists():
            return [
                int(word)
                for line in path.read_text().splitlines()
                if not line.startswith("#")
                for word in line.split()
            ]
    return None


@pytest.mark.parametrize("name", ["normal", "pareto", "paretonormal"])
def test_distribution_tables_equal_iproute2s(name):
    installed = _installed_table(name)
    if installed is None:
        pytest.skip(f"iproute2's {name}.dist is not installed here")
    assert list(table(name)) == installed


def test_distribution_table_shapes():
    assert table("uniform") is None
    normal = table("normal")
    assert len(normal) == 4096
    assert abs(sum(normal) / len(normal)) < 20  # mean ~0 in units of 1/8192 sigma
    assert sorted(normal) == list(normal)
    with pytest.raises(ValueError, match="distribution must be one of"):
        table("weird")
