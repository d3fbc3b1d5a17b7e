"""Environment throughput: jitted rl_pg envs against gymnax CartPole and the reference.

Steps per second with uniformly random actions in ``jit(scan(vmap(step)))`` (the
observation is reduced every step so XLA cannot skip computing it), side by side
in one run with gymnax's CartPole-v1 and with flappy-bird-gymnasium 0.4.0 stepped
in Python. The machine is shared and noisy, so ratios from the same run are the
numbers to compare; at each batch size the envs are timed in turns (best of 5),
so that they see the same spells of load.
"""

import math
import numbers
import os
import time
from collections.abc import Sequence
from pathlib import Path

import gymnax
import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import io
from rl_pg.envs import make

MODES = {
    "features": "FlappyBird-v0",
    "lidar": "FlappyBird-lidar-v0",
    "pixels": "FlappyBird-pixels-v0",
}
# Env steps per timed call, per mode (the slower modes get fewer).
STEP_BUDGET = {
    "cartpole": 4_000_000,
    "features": 4_000_000,
    "lidar": 100_000,
    "pixels": 400_000,
}


def compiled_rollout(env, params, num_envs: int, num_steps: int):
    """A jitted ``key -> scalar`` random-action rollout, compiled and warmed up."""

    @jax.jit
    def rollout(key):
        key_reset, key_run = jax.random.split(key)
        _, state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(key_reset, num_envs), params
        )

        def body(state, key):
            key_act, key_step = jax.random.split(key)
            actions = jax.random.randint(key_act, (num_envs,), 0, 2)
            obs, state, reward, *_ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(key_step, num_envs), state, actions, params
            )
            return state, reward.sum() + obs.astype(jnp.float32).mean()

        _, out = jax.lax.scan(body, state, jax.random.split(key_run, num_steps))
        return out.sum()

    rollout(jax.random.PRNGKey(0)).block_until_ready()  # compile
    return rollout


def interleaved_steps_per_second(
    rollouts: dict, steps: dict, key: jax.Array, repeats: int = 5
) -> dict:
    """Best-of-``repeats`` steps/s of each rollout, timed in turns.

    Round-robin timing puts every env through the same spells of machine load,
    so same-run ratios hold on a shared machine where absolute rates swing.
    """
    best = dict.fromkeys(rollouts, np.inf)
    for i in range(repeats):
        for name, rollout in rollouts.items():
            start = time.perf_counter()
            rollout(jax.random.fold_in(key, i)).block_until_ready()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: steps[name] / best[name] for name in rollouts}


def jax_steps_per_second(
    env, params, num_envs: int, num_steps: int, key: jax.Array, repeats: int = 3
) -> float:
    """Best-of-``repeats`` env steps per second of a jitted random-action rollout."""
    rollout = compiled_rollout(env, params, num_envs, num_steps)
    rates = interleaved_steps_per_second(
        {"env": rollout}, {"env": num_envs * num_steps}, key, repeats
    )
    return rates["env"]


def reference_steps_per_second(use_lidar: bool, seconds: float = 2.0) -> float | None:
    """flappy-bird-gymnasium 0.4.0 stepped in Python; None if it is not installed."""
    try:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        from flappy_bird_gymnasium.envs.flappy_bird_env import FlappyBirdEnv
    except ImportError:
        return None
    env = FlappyBirdEnv(use_lidar=use_lidar)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            _, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
            if terminated or truncated:
                env.reset()
        steps += 100
    return steps / (time.perf_counter() - start)


def check_args(
    num_envs: Sequence[int], modes: Sequence[str], reference_seconds: float
) -> None:
    """Raise ValueError for arguments :func:`run_benchmark` cannot use."""
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ValueError(
            f"Unknown modes {sorted(unknown) or list(modes)}; choose from {list(MODES)}"
        )
    if not num_envs or any(
        isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1
        for n in num_envs
    ):
        raise ValueError(f"num_envs must be positive ints, got {list(num_envs)}")
    if not (
        isinstance(reference_seconds, numbers.Real)
        and math.isfinite(reference_seconds)
        and reference_seconds > 0
    ):
        raise ValueError(
            f"reference_seconds must be a positive number, got {reference_seconds!r}"
        )


def parse_ints(text: str, name: str) -> list[int]:
    """``"64,1024"`` -> ``[64, 1024]``; a ValueError names ``name`` otherwise."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} takes comma-separated ints, got {text!r}") from None


def run_benchmark(
    num_envs: Sequence[int] = (1, 64, 1024, 16384, 65536),
    modes: Sequence[str] = ("features", "lidar", "pixels"),
    reference_seconds: float = 2.0,
    seed: int = 0,
    progress=None,
) -> dict:
    """All measurements of one run as a dict (see :func:`write_results`)."""
    check_args(num_envs, modes, reference_seconds)
    key = jax.random.PRNGKey(seed)
    envs = {"cartpole": gymnax.make("CartPole-v1")}
    envs.update({mode: make(MODES[mode]) for mode in modes})
    jax_rates = {name: {} for name in envs}
    for n in num_envs:
        steps = {
            name: int(n) * int(np.clip(STEP_BUDGET[name] // n, 4, 4000))
            for name in envs
        }
        rollouts = {
            name: compiled_rollout(env, params, int(n), steps[name] // int(n))
            for name, (env, params) in envs.items()
        }
        rates = interleaved_steps_per_second(rollouts, steps, key)
        for name, rate in rates.items():
            jax_rates[name][int(n)] = rate
            if progress is not None:
                progress(f"{name:9s} {n:6d} envs: {rate:,.0f} steps/s")
    reference = {"features": reference_steps_per_second(False, reference_seconds)}
    if "lidar" in modes:
        reference["lidar"] = reference_steps_per_second(True, reference_seconds)
    return {
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "steps_per_second": jax_rates,
        "reference_steps_per_second": reference,
    }


def markdown_table(results: dict) -> str:
    """Steps/s per mode and num_envs, with same-run ratios."""
    rates, ref = results["steps_per_second"], results["reference_steps_per_second"]
    cartpole = rates["cartpole"]
    lines = [
        f"Env steps per second, random actions, `jit(scan(vmap(step)))`, "
        f"{results['platform']} ({results['cpu_count']} cores), "
        f"jax {results['jax_version']}.",
        "",
        "| env | num_envs | steps/s | vs CartPole-v1 | vs flappy-bird-gymnasium |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, by_n in rates.items():
        reference = None if name == "cartpole" else ref.get(name)  # no pixels
        for n, rate in by_n.items():
            vs_cp = "" if name == "cartpole" else f"{rate / cartpole[n]:.2f}x"
            vs_ref = f"{rate / reference:,.0f}x" if reference else ""
            label = "gymnax CartPole-v1" if name == "cartpole" else MODES[name]
            lines.append(f"| {label} | {n} | {rate:,.0f} | {vs_cp} | {vs_ref} |")
    lines.append("")
    for name, rate in ref.items():
        if rate is not None:
            lines.append(
                f"flappy-bird-gymnasium 0.4.0 ({name}, Python, 1 env): "
                f"{rate:,.0f} steps/s"
            )
    lines.append(
        "flappy-bird-gymnasium has no image observation, so pixel steps are compared "
        "with CartPole only."
    )
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    io.write_json(out_dir / "throughput.json", results)
    io.atomic_write_text(out_dir / "throughput.md", markdown_table(results))
