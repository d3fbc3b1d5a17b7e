"""Tabular Q-learning on the binned Flappy Bird state, many envs sharing one table.

The state is the tutorial's (SarvagyaVaish/FlappyBirdRL, ``src/screens/
MainScreen.js``): the horizontal distance ``dx`` from the bird's left edge to the
right edge of the next lower pipe, and the vertical distance ``dy`` from the
bird's top edge to the top of that lower pipe (the gap's bottom edge; y grows
downwards), each binned at ``bin_size`` px and clipped to the tutorial's ranges::

    bin(d; lo, hi) = clip(floor((d - lo) / b), 0, floor((hi - lo - 1) / b))

with ``b = bin_size``, ``dx`` in [0, 180] and ``dy`` in [-350, 190] (45 x 135
bins at 4 px). The default adds the bird's velocity (an integer in [-9, 10], 20
values) as a third coordinate: without it the problem is not Markov enough to
learn on this physics (REFERENCE.md s. 9).

Update (Watkins 1989; Sutton & Barto 2018, eq. 6.8), rewards +1 per step alive and
-1000 for the step that crashes, with no bootstrap after a crash and a bootstrap
after a time-limit truncation::

    y_i = r_i + gamma * (1 - terminated_i) * max_a' Q(s'_i, a')
    Q(s, a) <- Q(s, a) + alpha * (mean{y_i : (s_i, a_i) = (s, a)} - Q(s, a))

All ``num_envs`` transitions of a step are computed from the same table and then
applied at once; transitions that hit the same cell are averaged first. (A
scatter-add of ``alpha * (y_i - Q)`` for ``k`` duplicates moves the cell by
``k * alpha`` times the error and diverges once ``k * alpha > 2``.) Actions are
epsilon-greedy; greedy ties go to "do nothing" (action 0), as in the tutorial.

With ``gamma = 1`` the values of surviving states grow without bound and the
greedy policy keeps changing, so the scores of successive tables swing. Training
therefore scores the table every ``eval_every_steps`` env steps on validation
levels (:data:`rl_pg.evaluate.VALIDATION_SEED`) and keeps the best one; the
reported score comes from the disjoint held-out test levels.

Deliberate differences from the tutorial: it bootstraps the crash update from the
state after death and updates one env at a time; here a crash is terminal and many
envs share the table. The tutorial's physics (pipe speed, gaps) differ too.

Entry points: :func:`train` (one pure, jittable function; ``jit(vmap(train))``
over keys trains several seeds) and :func:`train_qlearning` (the whole run with
files, for ``rl-pg train --algo qlearning``).
"""

import csv
import dataclasses
import json
import math
import os
import time
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import evaluate as evaluation
from rl_pg import io
from rl_pg.envs import EnvParams, EnvState, FlappyBird

ENV_ID = "FlappyBird-v0"
NUM_ACTIONS = 2  # 0: do nothing, 1: flap


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class QLearningConfig:
    """Hyperparameters of a tabular Q-learning run; validated on construction.

    Attributes:
      seed: PRNG seed of the run (env resets and exploration).
      num_envs: environments stepping in parallel, sharing one table.
      total_env_steps: training budget in env steps (all envs together).
      eval_every_steps: env steps between validation evaluations (a multiple of
        ``num_envs``); also the length of one jitted training chunk.
      alpha: step size.
      gamma: discount.
      epsilon: probability of a uniformly random action.
      reward_alive: reward of a step that does not crash.
      reward_crash: reward of the step that crashes (no bootstrap after it).
      bin_size: px per bin of the two distances.
      horizontal_range: clip range (px) of the horizontal distance.
      vertical_range: clip range (px) of the vertical distance.
      use_velocity: add the bird's velocity (20 integer values) to the state.
      max_steps_in_episode: training episodes are truncated (and bootstrapped)
        after this many steps.
      eval_episodes: validation levels per evaluation during training.
      eval_max_score: an evaluation episode stops at this many pipes.
      stop_at_score: stop training once the validation median reaches this score
        (``None``: use the whole budget). Only :func:`train_qlearning` stops early.
      keep_best: report and checkpoint the table with the best validation median
        (else the last table).
      final_eval_episodes: held-out test levels scored at the end (eval.json).
    """

    seed: int = 0
    num_envs: int = 64
    total_env_steps: int = 20_000_000
    eval_every_steps: int = 320_000
    alpha: float = 0.7
    gamma: float = 1.0
    epsilon: float = 0.01
    reward_alive: float = 1.0
    reward_crash: float = -1000.0
    bin_size: float = 4.0
    horizontal_range: tuple[float, float] = (0.0, 180.0)
    vertical_range: tuple[float, float] = (-350.0, 190.0)
    use_velocity: bool = True
    max_steps_in_episode: int = 10_000
    eval_episodes: int = 32
    eval_max_score: int = 10_000
    stop_at_score: int | None = 10_000
    keep_best: bool = True
    final_eval_episodes: int = 32

    def __post_init__(self):
        problems = []
        for name in ("horizontal_range", "vertical_range"):
            value = getattr(self, name)
            try:  # lists from JSON, ints from users
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                problems.append(f"{name} must be a pair (low, high), got {value!r}")
                continue
            if not lo < hi:
                problems.append(f"{name} must have low < high, got {value!r}")
            object.__setattr__(self, name, (lo, hi))

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        def is_int(value) -> bool:
            return isinstance(value, int | np.integer) and not isinstance(value, bool)

        def is_real(value) -> bool:
            return isinstance(value, int | float | np.number) and not isinstance(
                value, bool
            )

        check(is_int(self.seed), f"seed must be an int, got {self.seed!r}")
        for name in (
            "num_envs",
            "total_env_steps",
            "eval_every_steps",
            "max_steps_in_episode",
            "eval_episodes",
            "eval_max_score",
            "final_eval_episodes",
        ):
            value = getattr(self, name)
            check(
                is_int(value) and value >= 1,
                f"{name} must be an int >= 1, got {value!r}",
            )
        check(
            not is_int(self.eval_max_score)
            or self.eval_max_score <= evaluation.MAX_SCORE_LIMIT,
            f"eval_max_score must be <= {evaluation.MAX_SCORE_LIMIT}, "
            f"got {self.eval_max_score!r}",
        )
        if is_int(self.eval_every_steps) and is_int(self.num_envs) and self.num_envs:
            check(
                self.eval_every_steps % self.num_envs == 0,
                f"eval_every_steps ({self.eval_every_steps}) must be a multiple of "
                f"num_envs ({self.num_envs})",
            )
        for name in ("alpha", "gamma", "epsilon"):
            value = getattr(self, name)
            check(
                is_real(value) and 0.0 <= value <= 1.0,
                f"{name} must be a number in [0, 1], got {value!r}",
            )
        check(
            is_real(self.alpha) and self.alpha > 0,
            f"alpha must be > 0, got {self.alpha!r}",
        )
        for name in ("reward_alive", "reward_crash"):
            value = getattr(self, name)
            check(
                is_real(value) and math.isfinite(value),
                f"{name} must be a finite number, got {value!r}",
            )
        check(
            is_real(self.bin_size) and self.bin_size > 0,
            f"bin_size must be > 0, got {self.bin_size!r}",
        )
        check(
            isinstance(self.use_velocity, bool),
            f"use_velocity must be a bool, got {self.use_velocity!r}",
        )
        check(
            isinstance(self.keep_best, bool),
            f"keep_best must be a bool, got {self.keep_best!r}",
        )
        check(
            self.stop_at_score is None
            or (is_int(self.stop_at_score) and self.stop_at_score >= 1),
            f"stop_at_score must be None or an int >= 1, got {self.stop_at_score!r}",
        )
        if problems:
            raise ValueError("Invalid QLearningConfig: " + "; ".join(problems))

    @property
    def binning(self) -> "StateBinning":
        """The binning for the physics this config trains on (``_env``)."""
        return StateBinning.for_params(
            _env(self)[1],
            bin_size=float(self.bin_size),
            horizontal_range=self.horizontal_range,
            vertical_range=self.vertical_range,
            use_velocity=self.use_velocity,
        )

    @property
    def num_chunks(self) -> int:
        """Training chunks (one validation evaluation each) in the budget."""
        return max(1, self.total_env_steps // self.eval_every_steps)


PRESETS: dict[str, QLearningConfig] = {
    "default": QLearningConfig(),
    # The tutorial exactly: 2-D state, greedy (ties -> nothing), one env.
    # REFERENCE.md s. 9: it does not learn on this physics.
    "tutorial": QLearningConfig(
        num_envs=1,
        epsilon=0.0,
        use_velocity=False,
        eval_every_steps=500_000,
    ),
}


def preset(name: str, **overrides: Any) -> QLearningConfig:
    """A named preset ("default", "tutorial"), with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(
            f"Unknown Q-learning preset {name!r}; choose from {sorted(PRESETS)}"
        )
    return dataclasses.replace(PRESETS[name], **overrides)


# --------------------------------------------------------------------------- binning


def _geometry(params: EnvParams) -> dict[str, Any]:
    """What the tabular state reads from the physics: the bird's x, the pipes'
    width and gap, and the integer velocities a bird can have (from the flap and
    start velocities up to the maximum fall speed)."""
    low = min(float(params.flap_vel), float(params.bird_start_vel))
    return dict(
        bird_x=float(params.bird_x),
        pipe_width=float(params.pipe_width),
        pipe_gap=float(params.pipe_gap),
        velocity_range=(math.floor(low), math.ceil(float(params.max_fall_vel))),
    )


@dataclasses.dataclass(frozen=True)
class StateBinning:
    """The tabular state: binned distances to the next lower pipe (+ velocity).

    The geometry (bird x, pipe width and gap, the velocity's range) comes from
    ``EnvParams``: :meth:`for_params` reads it from the params an env runs with;
    the field defaults are those of ``EnvParams()`` (bird at x = 57, pipes 52 px
    wide with a 100 px gap, velocities -9 .. 10). Hashable, so jitted code can
    take it as static.
    """

    bin_size: float = 4.0
    horizontal_range: tuple[float, float] = (0.0, 180.0)
    vertical_range: tuple[float, float] = (-350.0, 190.0)
    use_velocity: bool = True
    velocity_range: tuple[int, int] = None  # type: ignore[assignment]
    bird_x: float = None  # type: ignore[assignment]
    pipe_width: float = None  # type: ignore[assignment]
    pipe_gap: float = None  # type: ignore[assignment]

    def __post_init__(self):
        geometry = _geometry(EnvParams())
        for name, value in geometry.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    @classmethod
    def for_params(cls, params: EnvParams, **fields: Any) -> "StateBinning":
        """The binning of ``params``'s geometry (concrete params, not traced)."""
        return cls(**(_geometry(params) | fields))

    def _num_bins(self, lo: float, hi: float) -> int:
        return math.floor((hi - lo - 1) / self.bin_size) + 1

    @property
    def shape(self) -> tuple[int, ...]:
        """(vertical bins, horizontal bins[, velocity values])."""
        dims = (
            self._num_bins(*self.vertical_range),
            self._num_bins(*self.horizontal_range),
        )
        if self.use_velocity:
            lo, hi = self.velocity_range
            dims += (hi - lo + 1,)
        return dims

    @property
    def num_states(self) -> int:
        return math.prod(self.shape)

    def distances(self, state: EnvState) -> tuple[jax.Array, jax.Array]:
        """(dx, dy) in px from the bird to the next lower pipe, unbinned.

        The next pipe is the leftmost whose right edge is not left of the bird
        (``pipe_x + pipe_width >= bird_x``); pipes are in screen order, and the
        second one is always ahead, so it is pipe 0 or pipe 1.
        """
        first_ahead = state.pipe_x[0] + self.pipe_width >= self.bird_x
        i = jnp.where(first_ahead, 0, 1)
        dx = state.pipe_x[i] + self.pipe_width - self.bird_x
        dy = state.bird_y - (state.pipe_gap_top[i] + self.pipe_gap)
        return dx, dy

    def _bin(self, d: jax.Array, lo: float, hi: float) -> jax.Array:
        b = jnp.floor((d - lo) / self.bin_size).astype(jnp.int32)
        return jnp.clip(b, 0, self._num_bins(lo, hi) - 1)

    def coordinates(self, state: EnvState) -> jax.Array:
        """Integer coordinates [2] or [3]: (vertical bin, horizontal bin[, vel])."""
        dx, dy = self.distances(state)
        coords = [
            self._bin(dy, *self.vertical_range),
            self._bin(dx, *self.horizontal_range),
        ]
        if self.use_velocity:
            lo, hi = self.velocity_range
            vel = jnp.round(state.bird_vel).astype(jnp.int32)
            coords.append(jnp.clip(vel - lo, 0, hi - lo))
        return jnp.stack(coords)

    def index(self, state: EnvState) -> jax.Array:
        """Flat int32 row of the Q-table for one (unbatched) env state."""
        coords = self.coordinates(state)
        return jnp.ravel_multi_index(tuple(coords), self.shape, mode="clip").astype(
            jnp.int32
        )


def greedy_actions(q_rows: jax.Array) -> jax.Array:
    """argmax over {0, 1} with ties to 0 ("do nothing"): [..., 2] -> [...] int32."""
    return (q_rows[..., 1] > q_rows[..., 0]).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class GreedyPolicy:
    """``act_fn`` for :func:`rl_pg.evaluate.evaluate`: greedy on a Q-table.

    Call as ``policy(q, obs, state, key)``; ``obs`` and ``key`` are unused.
    Equal instances hash equal, so evaluations reuse one compilation.
    """

    binning: StateBinning

    def __call__(self, q: jax.Array, obs: jax.Array, state: EnvState, key) -> jax.Array:
        del obs, key
        return greedy_actions(q[self.binning.index(state)])


# ---------------------------------------------------------------------------- update


def q_update(
    q: jax.Array,
    states: jax.Array,
    actions: jax.Array,
    targets: jax.Array,
    alpha: float | jax.Array,
) -> jax.Array:
    """Apply a batch of Q-learning targets at once, averaging duplicates per cell.

    ``Q(s, a) += alpha * (mean{y_i : (s_i, a_i) = (s, a)} - Q(s, a))``; cells not
    in the batch are unchanged. Costs O(B^2) for the duplicate search, nothing
    proportional to the table.

    Args:
      q: [S, A] table.
      states: [B] int rows.
      actions: [B] int columns.
      targets: [B] float targets y_i.
      alpha: step size.

    Returns:
      The updated [S, A] table.
    """
    chex.assert_rank([q, states, actions, targets], [2, 1, 1, 1])
    chex.assert_equal_shape([states, actions, targets])
    cells = states * q.shape[1] + actions
    same = (cells[:, None] == cells[None, :]).astype(q.dtype)  # [B, B]
    mean_target = (same @ targets.astype(q.dtype)) / same.sum(axis=1)
    current = q[states, actions]
    # Duplicates compute bit-identical values, so their writes agree.
    return q.at[states, actions].set(current + alpha * (mean_target - current))


def td_targets(
    q: jax.Array,
    next_states: jax.Array,
    rewards: jax.Array,
    terminated: jax.Array,
    gamma: float | jax.Array,
) -> jax.Array:
    """``y = r + gamma * (1 - terminated) * max_a' Q(s', a')``: all [B]."""
    bootstrap = jnp.max(q[next_states], axis=-1)
    return rewards + gamma * jnp.where(terminated, 0.0, bootstrap)


# -------------------------------------------------------------------------- training


class QLearningState(NamedTuple):
    """Carry of the training loop."""

    q: jax.Array  # [S, 2] float32, the table being trained
    env_state: EnvState  # every leaf [num_envs, ...]
    key: chex.PRNGKey
    env_steps: jax.Array  # [] int32, env steps so far (all envs)
    best_q: jax.Array  # [S, 2] float32, table with the best validation median
    best_median: jax.Array  # [] float32, its validation median (-1 before any)
    best_mean: jax.Array  # [] float32, its validation mean (tie-breaker)
    best_env_steps: jax.Array  # [] int32, env steps when it was taken


class ChunkMetrics(NamedTuple):
    """Statistics of one training chunk; every field [] (or [num_chunks] stacked)."""

    env_steps: jax.Array  # int32, env steps at the end of the chunk
    episodes: jax.Array  # int32, training episodes finished in the chunk
    crashes: jax.Array  # int32, of which ended by a crash (the rest truncated)
    train_score_mean: jax.Array  # float32, mean score of those episodes (nan if none)
    train_score_max: jax.Array  # int32, best of them (0 if none)
    eval_median: jax.Array  # float32, validation median of the chunk's last table
    eval_mean: jax.Array  # float32
    best_median: jax.Array  # float32, best validation median so far
    best_env_steps: jax.Array  # int32


class TrainStats(NamedTuple):
    """Training episodes finished during :func:`train_steps`; every field []."""

    episodes: jax.Array  # int32
    crashes: jax.Array  # int32, episodes ended by a crash (the rest truncated)
    score_sum: jax.Array  # float32
    score_max: jax.Array  # int32, 0 if none


def _env(config: QLearningConfig) -> tuple[FlappyBird, EnvParams]:
    # Not rl_pg.make: its validate_params calls jnp, which fails under jit tracing;
    # the config has validated max_steps_in_episode already.
    env = FlappyBird("features")
    return env, env.default_params.replace(
        max_steps_in_episode=config.max_steps_in_episode
    )


def _select_envs(done: jax.Array, new: Any, old: Any) -> Any:
    """Per-env select between two batched pytrees (``done`` is [num_envs])."""

    def select(a, b):
        return jnp.where(done.reshape(done.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(select, new, old)


def init(config: QLearningConfig, key: chex.PRNGKey) -> QLearningState:
    """A zero table and ``num_envs`` freshly reset environments."""
    env, params = _env(config)
    num_states = config.binning.num_states
    q = jnp.zeros((num_states, NUM_ACTIONS), jnp.float32)
    key, key_reset = jax.random.split(key)
    reset_keys = jax.random.split(key_reset, config.num_envs)
    _, env_state = jax.vmap(env.reset_env, (0, None))(reset_keys, params)
    return QLearningState(
        q=q,
        env_state=env_state,
        key=key,
        env_steps=jnp.asarray(0, jnp.int32),
        best_q=q,
        best_median=jnp.asarray(-1.0, jnp.float32),
        best_mean=jnp.asarray(-1.0, jnp.float32),
        best_env_steps=jnp.asarray(0, jnp.int32),
    )


def _train_step(
    config: QLearningConfig,
    env: FlappyBird,
    params: EnvParams,
    binning: StateBinning,
    q: jax.Array,
    env_state: EnvState,
    key: chex.PRNGKey,
) -> tuple[jax.Array, EnvState, TrainStats]:
    """One epsilon-greedy step of every env and one averaged table update."""
    num_envs = config.num_envs
    key_bits, key_step = jax.random.split(key)
    # One draw of raw bits serves exploration, random actions and reset keys:
    # threefry in the hot path is what costs (REFERENCE.md s. 8).
    bits = jax.random.bits(key_bits, (4, num_envs), jnp.uint32)
    threshold = jnp.uint32(min(int(config.epsilon * 2.0**32), 2**32 - 1))
    explore = bits[0] < threshold
    states = jax.vmap(binning.index)(env_state)
    actions = jnp.where(
        explore, (bits[1] & 1).astype(jnp.int32), greedy_actions(q[states])
    )
    _, next_state, _, terminated, _ = jax.vmap(env.step_env, (None, 0, 0, None))(
        key_step, env_state, actions, params
    )
    rewards = jnp.where(terminated, config.reward_crash, config.reward_alive)
    targets = td_targets(
        q, jax.vmap(binning.index)(next_state), rewards, terminated, config.gamma
    )
    q = q_update(q, states, actions, targets, config.alpha)

    done = terminated | (next_state.time >= params.max_steps_in_episode)
    reset_keys = jnp.stack([bits[2], bits[3]], axis=1)  # raw uint32[2] keys
    _, reset_state = jax.vmap(env.reset_env, (0, None))(reset_keys, params)
    env_state = _select_envs(done, reset_state, next_state)
    stats = TrainStats(
        episodes=jnp.sum(done, dtype=jnp.int32),
        crashes=jnp.sum(terminated, dtype=jnp.int32),
        score_sum=jnp.sum(jnp.where(done, next_state.score, 0), dtype=jnp.float32),
        score_max=jnp.max(jnp.where(done, next_state.score, 0)),
    )
    return q, env_state, stats


def train_steps(
    config: QLearningConfig, state: QLearningState
) -> tuple[QLearningState, TrainStats]:
    """``eval_every_steps`` env steps of training (a ``lax.scan``); jittable."""
    env, params = _env(config)
    binning = config.binning
    num_iterations = config.eval_every_steps // config.num_envs

    def body(carry, key):
        q, env_state, stats = carry
        q, env_state, step = _train_step(
            config, env, params, binning, q, env_state, key
        )
        stats = TrainStats(
            episodes=stats.episodes + step.episodes,
            crashes=stats.crashes + step.crashes,
            score_sum=stats.score_sum + step.score_sum,
            score_max=jnp.maximum(stats.score_max, step.score_max),
        )
        return (q, env_state, stats), None

    key, key_train = jax.random.split(state.key)
    zero = jnp.asarray(0, jnp.int32)
    stats = TrainStats(zero, zero, jnp.asarray(0.0, jnp.float32), zero)
    (q, env_state, stats), _ = jax.lax.scan(
        body,
        (state.q, state.env_state, stats),
        jax.random.split(key_train, num_iterations),
    )
    state = state._replace(
        q=q,
        env_state=env_state,
        key=key,
        env_steps=state.env_steps + num_iterations * config.num_envs,
    )
    return state, stats


def validate(
    config: QLearningConfig, state: QLearningState
) -> tuple[QLearningState, evaluation.EvalResult]:
    """Score the current table on the validation levels; keep it if it is best.

    Best means the highest validation median, ties broken by the mean (a lower
    bound: the evaluation stops once the median is decided). Works
    traced (inside :func:`train`) and eagerly (between jitted chunks, where the
    jitted evaluation is shared with the final held-out one).
    """
    env, params = _env(config)
    key, key_eval = jax.random.split(state.key)
    result = evaluation.evaluate(
        GreedyPolicy(config.binning),
        state.q,
        env,
        params,
        key_eval,
        max_score=config.eval_max_score,
        reset_keys=evaluation.held_out_keys(
            config.eval_episodes, evaluation.VALIDATION_SEED
        ),
        median_only=True,
    )
    return _keep_best(state, key, result), result


@jax.jit
def _keep_best(
    state: QLearningState, key: chex.PRNGKey, result: evaluation.EvalResult
) -> QLearningState:
    scores = result.scores.astype(jnp.float32)
    median, mean = jnp.median(scores), jnp.mean(scores)
    better = (median > state.best_median) | (
        (median == state.best_median) & (mean > state.best_mean)
    )
    return state._replace(
        key=key,
        best_q=jnp.where(better, state.q, state.best_q),
        best_median=jnp.where(better, median, state.best_median),
        best_mean=jnp.where(better, mean, state.best_mean),
        best_env_steps=jnp.where(better, state.env_steps, state.best_env_steps),
    )


def _chunk_metrics(
    state: QLearningState, stats: TrainStats, result: evaluation.EvalResult
) -> ChunkMetrics:
    scores = result.scores.astype(jnp.float32)
    return ChunkMetrics(
        env_steps=state.env_steps,
        episodes=stats.episodes,
        crashes=stats.crashes,
        train_score_mean=jnp.where(
            stats.episodes > 0,
            stats.score_sum / jnp.maximum(stats.episodes, 1),
            jnp.nan,
        ),
        train_score_max=stats.score_max,
        eval_median=jnp.median(scores),
        eval_mean=jnp.mean(scores),
        best_median=state.best_median,
        best_env_steps=state.best_env_steps,
    )


def train_chunk(
    config: QLearningConfig, state: QLearningState
) -> tuple[QLearningState, ChunkMetrics]:
    """:func:`train_steps` then :func:`validate`; pure and jittable."""
    state, stats = train_steps(config, state)
    state, result = validate(config, state)
    return state, _chunk_metrics(state, stats, result)


def train(
    config: QLearningConfig, key: chex.PRNGKey
) -> tuple[QLearningState, ChunkMetrics]:
    """The whole run as one pure function: ``num_chunks`` chunks in a ``lax.scan``.

    No early stop (``stop_at_score`` is for :func:`train_qlearning`), so every
    seed gets the full budget. ``jax.jit(jax.vmap(functools.partial(train,
    config)))(keys)`` trains several seeds at once.

    Returns:
      The final state (``best_q`` is the selected table) and [num_chunks] metrics.
    """
    state = init(config, key)
    return jax.lax.scan(
        lambda s, _: train_chunk(config, s), state, None, length=config.num_chunks
    )


def _traced_config(config: QLearningConfig) -> QLearningConfig:
    """``config`` with the fields that jitted code never reads set to defaults.

    Jitted functions take the config as a static argument; normalising the seed,
    the budget and the run-level options lets runs that differ only in those
    share one compilation.
    """
    default = QLearningConfig()
    return dataclasses.replace(
        config,
        seed=default.seed,
        total_env_steps=config.eval_every_steps,
        stop_at_score=default.stop_at_score,
        keep_best=default.keep_best,
        final_eval_episodes=default.final_eval_episodes,
    )


_jit_init = jax.jit(init, static_argnums=0)
_jit_train_steps = jax.jit(train_steps, static_argnums=0)


# ----------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: str | os.PathLike,
    q: jax.Array,
    config: QLearningConfig,
    **metadata: Any,
) -> None:
    """Write the table and its config to ``path`` (.npz), atomically."""
    buffer = BytesIO()
    np.savez_compressed(
        buffer,
        q=np.asarray(q),
        config=np.asarray(_to_json(dataclasses.asdict(config))),
        metadata=np.asarray(_to_json(metadata)),
    )
    io.atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> tuple[np.ndarray, QLearningConfig]:
    """Read a table written by :func:`save_checkpoint`: (q [S, 2], config)."""
    try:
        with np.load(path) as data:
            q = data["q"]
            config = QLearningConfig(**json.loads(str(data["config"])))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such Q-table checkpoint") from None
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        zipfile.BadZipFile,
    ) as e:
        raise ValueError(f"{path} is not a readable Q-table checkpoint: {e}") from None
    if q.shape != (config.binning.num_states, NUM_ACTIONS):
        raise ValueError(f"{path}: table shape {q.shape} does not match its config")
    return q, config


def _to_json(data: Any) -> str:
    return json.dumps(
        data, default=lambda o: o.item() if hasattr(o, "item") else str(o)
    )


# ------------------------------------------------------------------------- full run


class RunResult(NamedTuple):
    """What :func:`train_qlearning` wrote, in memory."""

    q: np.ndarray  # [S, 2] the reported (best or last) table
    eval: dict[str, Any]  # the contents of eval.json
    metrics: list[dict[str, Any]]  # the rows of metrics.csv
    out_dir: Path


METRICS_COLUMNS = (
    "env_steps",
    "wall_clock_s",
    "episodes",
    "crashes",
    "train_score_mean",
    "train_score_max",
    "eval_median",
    "eval_mean",
    "best_median",
    "best_env_steps",
)


def _plot_learning_curve(path: Path, rows: list[dict[str, Any]], config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["env_steps"] for r in rows]) / 1e6
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["eval_median"] for r in rows], "o-", label="validation median")
    ax.plot(steps, [r["best_median"] for r in rows], "--", label="best so far")
    ax.plot(steps, [r["train_score_mean"] for r in rows], ".-", label="training mean")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(0, config.eval_max_score * 1.5)
    ax.set_xlabel("env steps (millions)")
    ax.set_ylabel("score (pipes)")
    ax.set_title(
        f"Tabular Q-learning, {config.num_envs} envs, epsilon {config.epsilon}, "
        f"velocity {'on' if config.use_velocity else 'off'}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    io.save_figure(fig, path, dpi=100)
    plt.close(fig)


def train_qlearning(
    config: QLearningConfig, out_dir: str | os.PathLike, progress: bool = True
) -> RunResult:
    """Train, evaluate on held-out levels and write a run directory.

    Writes into ``out_dir`` (which must not exist or be empty): ``config.json``
    (config, env params, library versions), ``metrics.csv`` (one row per chunk),
    ``checkpoints/best.npz`` and ``checkpoints/last.npz``, ``eval.json`` (the
    reported table on ``config.final_eval_episodes`` held-out test levels, capped
    at ``config.eval_max_score``), ``learning_curve.png`` and ``agent.gif``.

    ``eval.json``'s ``wall_clock_s`` covers everything up to the end of training
    (compilation and validation evaluations included) and ``env_steps`` is the
    step count of the reported table; ``total_wall_clock_s`` adds the final
    evaluation.

    Raises:
      FileExistsError: ``out_dir`` exists and is not empty (checked first).
    """
    if not isinstance(config, QLearningConfig):
        raise TypeError(
            f"config must be a QLearningConfig, got {type(config).__name__}"
        )
    out_dir = io.new_out_dir(out_dir)
    start = time.perf_counter()
    env, params = _env(config)
    io.write_config(
        out_dir,
        dict(
            algo="qlearning",
            env_id=ENV_ID,
            config=dataclasses.asdict(config),
            num_states=config.binning.num_states,
            held_out_seed=evaluation.HELD_OUT_SEED,
            validation_seed=evaluation.VALIDATION_SEED,
            env_params=_jsonable(dataclasses.asdict(params)),
        ),
    )
    (out_dir / "checkpoints").mkdir()

    traced = _traced_config(config)
    state = _jit_init(traced, jax.random.PRNGKey(config.seed))
    rows: list[dict[str, Any]] = []
    bar = _progress_bar(config, progress)
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        for _ in range(config.num_chunks):
            state, stats = _jit_train_steps(traced, state)
            state, result = validate(traced, state)
            metrics = jax.device_get(_chunk_metrics(state, stats, result))
            row = {k: _scalar(getattr(metrics, k)) for k in ChunkMetrics._fields}
            row["wall_clock_s"] = round(time.perf_counter() - start, 3)
            rows.append(row)
            writer.writerow({k: row[k] for k in METRICS_COLUMNS})
            f.flush()
            bar.set_postfix(
                val_median=row["eval_median"],
                best=row["best_median"],
                train_mean=round(row["train_score_mean"], 1),
                refresh=False,
            )
            bar.update(config.eval_every_steps)
            if (
                config.stop_at_score is not None
                and row["best_median"] >= config.stop_at_score
            ):
                break
    bar.close()
    train_wall_clock = time.perf_counter() - start

    last_q = np.asarray(state.q)
    best_q = np.asarray(state.best_q)
    best_steps = int(state.best_env_steps)
    q, q_steps = (
        (best_q, best_steps) if config.keep_best else (last_q, int(state.env_steps))
    )
    save_checkpoint(
        out_dir / "checkpoints" / "best.npz",
        best_q,
        config,
        env_steps=best_steps,
        validation_median=float(state.best_median),
    )
    save_checkpoint(
        out_dir / "checkpoints" / "last.npz",
        last_q,
        config,
        env_steps=int(state.env_steps),
    )

    policy = GreedyPolicy(config.binning)
    # A stream apart from training's (which starts from PRNGKey(seed) itself).
    key_eval, key_gif = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    )
    result = evaluation.evaluate(
        policy,
        jnp.asarray(q),
        env,
        params,
        key_eval,
        num_episodes=config.final_eval_episodes,
        max_score=config.eval_max_score,
    )
    result = jax.device_get(result)
    eval_data = evaluation.write_eval_json(
        out_dir / "eval.json",
        result,
        wall_clock_s=train_wall_clock,
        env_steps=q_steps,
        total_env_steps=int(state.env_steps),
        total_wall_clock_s=time.perf_counter() - start,
        max_score=config.eval_max_score,
        held_out_seed=evaluation.HELD_OUT_SEED,
        table="best" if config.keep_best else "last",
        validation_median=float(state.best_median),
    )
    _plot_learning_curve(out_dir / "learning_curve.png", rows, config)
    evaluation.agent_gif(
        policy, jnp.asarray(q), env, params, out_dir / "agent.gif", key_gif
    )
    return RunResult(q=q, eval=eval_data, metrics=rows, out_dir=out_dir)


def _progress_bar(config: QLearningConfig, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.num_chunks * config.eval_every_steps,
        unit="step",
        unit_scale=True,
        desc="qlearning",
        disable=not enabled,
    )


def _scalar(value: Any) -> Any:
    value = np.asarray(value).item()
    return round(value, 4) if isinstance(value, float) else value


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v.item() if hasattr(v, "item") else v for k, v in data.items()}


__all__ = [
    "ChunkMetrics",
    "GreedyPolicy",
    "PRESETS",
    "QLearningConfig",
    "QLearningState",
    "RunResult",
    "StateBinning",
    "TrainStats",
    "greedy_actions",
    "init",
    "load_checkpoint",
    "preset",
    "q_update",
    "save_checkpoint",
    "td_targets",
    "train",
    "train_chunk",
    "train_qlearning",
    "train_steps",
    "validate",
]
