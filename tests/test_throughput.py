"""The throughput benchmark's bad-input errors and its table of same-run ratios."""

import re

import pytest

from rl_pg import throughput


def test_bad_input_raises_before_measuring():
    with pytest.raises(ValueError, match="Unknown modes"):
        throughput.run_benchmark(modes=("features", "sonar"))
    with pytest.raises(ValueError, match="positive"):
        throughput.run_benchmark(num_envs=(64, 0))


def test_table_gives_same_run_ratios():
    results = {
        "platform": "cpu",
        "cpu_count": 2,
        "jax_version": "0",
        "steps_per_second": {
            "cartpole": {64: 1000.0},
            "features": {64: 1500.0},
            "lidar": {64: 100.0},
            "pixels": {64: 50.0},
        },
        "reference_steps_per_second": {"features": 10.0, "lidar": 0.5},
    }
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:6]]
        for line in throughput.markdown_table(results).splitlines()
        if line.startswith("| ") and "num_envs" not in line
    }
    assert rows["FlappyBird-v0"] == ["1,500", "1.50x", "150x"]
    assert rows["FlappyBird-lidar-v0"] == ["100", "0.10x", "200x"]
    # the reference has no image observation: pixels compare with CartPole only
    assert rows["FlappyBird-pixels-v0"] == ["50", "0.05x", ""]
    assert rows["gymnax CartPole-v1"] == ["1,000", "", ""]


@pytest.mark.parametrize(
    "num_envs, modes, seconds, message",
    [
        ((), ("features",), 1.0, "num_envs must be positive ints, got []"),
        ((True,), ("features",), 1.0, "num_envs must be positive ints"),
        ((2.5,), ("features",), 1.0, "num_envs must be positive ints"),
        ((4,), (), 1.0, "Unknown modes"),
        ((4,), ("features",), 0.0, "reference_seconds must be a positive number"),
        ((4,), ("features",), float("nan"), "reference_seconds must be a positive"),
    ],
)
def test_check_args(num_envs, modes, seconds, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        throughput.check_args(num_envs, modes, seconds)
    throughput.check_args((1, 4), ("features", "pixels"), 0.5)  # good ones pass


def test_parse_ints_names_the_option():
    assert throughput.parse_ints("1,64", "--num-envs") == [1, 64]
    with pytest.raises(ValueError, match="--num-envs takes comma-separated ints"):
        throughput.parse_ints("1,,2", "--num-envs")
