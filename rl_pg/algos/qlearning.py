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

Entry points: :data:`ALGORITHM` (the :class:`rl_pg.algos.base.Algorithm` that
``rl-pg train --algo qlearning`` runs through the one run driver; checkpoints are
``checkpoints/best.npz`` and ``last.npz``) and :func:`train` (one pure, jittable
function; ``jit(vmap(train))`` over keys trains several seeds).
"""

import dataclasses
import json
import math
import os
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import io
from rl_pg.algos import base
from rl_pg.algos.config import Checks, RunConfig
from rl_pg.envs import EnvParams, EnvState, FlappyBird

ENV_ID = "FlappyBird-v0"
NUM_ACTIONS = 2  # 0: do nothing, 1: flap


# ---------------------------------------------------------------------------- config


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class QLearningConfig(RunConfig):
    """Hyperparameters of a tabular Q-learning run; validated on construction.

    Attributes:
      num_envs: environments stepping in parallel, sharing one table.
      total_env_steps: training budget in env steps (all envs together); the run
        takes ``num_chunks * eval_every_steps`` of them (whole chunks).
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

    The other run fields (evaluation, stop rule, checkpoints) are
    ``RunConfig``'s; the stop is unconfirmed by default (the best validation
    median reaching ``stop_at_score`` stops).
    """

    SWEEPABLE: ClassVar[tuple[str, ...]] = ("alpha", "gamma")

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
    final_eval_episodes: int = 32

    def check(self, checks: Checks) -> None:
        super().check(checks)
        for name in ("horizontal_range", "vertical_range"):
            value = getattr(self, name)
            try:  # lists from JSON, ints from users
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                checks.require(
                    False, f"{name} must be a pair (low, high), got {value!r}"
                )
                continue
            checks.require(lo < hi, f"{name} must have low < high, got {value!r}")
            object.__setattr__(self, name, (lo, hi))
        for name in ("num_envs", "max_steps_in_episode"):
            checks.int_at_least(name, 1)
        checks.divides("num_envs", "eval_every_steps")
        if not checks.problems:  # relations between fields that passed alone
            checks.require(
                self.total_env_steps >= self.eval_every_steps,
                f"total_env_steps ({self.total_env_steps}) must be at least one "
                f"chunk (eval_every_steps = {self.eval_every_steps})",
            )
        checks.real_in("alpha", 0.0, 1.0, low_open=True)
        checks.real_in("gamma", 0.0, 1.0)
        checks.real_in("epsilon", 0.0, 1.0)
        checks.real_in(
            "reward_alive", -math.inf, math.inf, low_open=True, high_open=True
        )
        checks.real_in(
            "reward_crash", -math.inf, math.inf, low_open=True, high_open=True
        )
        checks.real_in("bin_size", 0.0, math.inf, low_open=True, high_open=True)
        checks.boolean("use_velocity")

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
        return self.total_env_steps // self.eval_every_steps


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
    config: QLearningConfig, state: QLearningState, num_iterations: int | None = None
) -> tuple[QLearningState, TrainStats]:
    """``num_iterations`` vector steps (default: one chunk, ``eval_every_steps``
    env steps) of training (a ``lax.scan``); jittable."""
    env, params = _env(config)
    binning = config.binning
    if num_iterations is None:
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


COLUMNS = ("episodes", "crashes", "train_score_mean", "train_score_max")


def steps(
    config: QLearningConfig, state: QLearningState, num_iterations: int
) -> tuple[QLearningState, dict[str, jax.Array]]:
    """:func:`train_steps` and the chunk's ``metrics.csv`` columns."""
    state, stats = train_steps(config, state, num_iterations)
    # The key moves on once more per chunk (it used to draw the validation's).
    state = state._replace(key=jax.random.split(state.key)[0])
    return state, dict(
        episodes=stats.episodes,
        crashes=stats.crashes,
        train_score_mean=jnp.where(
            stats.episodes > 0,
            stats.score_sum / jnp.maximum(stats.episodes, 1),
            jnp.nan,
        ),
        train_score_max=stats.score_max,
    )


# ----------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: str | os.PathLike,
    q: jax.Array,
    config: QLearningConfig,
    **metadata: Any,
) -> None:
    """Write the table and its config to ``path`` (.npz), atomically; creates
    ``path``'s parent directories (``checkpoints/evaluations/``) as needed."""
    buffer = BytesIO()
    np.savez_compressed(
        buffer,
        q=np.asarray(q),
        config=np.asarray(_to_json(dataclasses.asdict(config))),
        metadata=np.asarray(_to_json(metadata)),
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> tuple[np.ndarray, QLearningConfig]:
    """Read a table written by :func:`save_checkpoint`: (q [S, 2], config)."""
    try:
        with np.load(path) as data:
            q = data["q"]
            saved = json.loads(str(data["config"]))
            # Tables saved before the shared run fields also hold ``keep_best``.
            fields = {f.name for f in dataclasses.fields(QLearningConfig)}
            config = QLearningConfig(**{k: v for k, v in saved.items() if k in fields})
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


# ------------------------------------------------------------------ the algorithm


def _save(path: str | os.PathLike, config: QLearningConfig, q, **meta: Any) -> Path:
    """The table at ``path.npz`` (``checkpoints/best`` -> ``checkpoints/best.npz``)."""
    path = Path(path).with_suffix(".npz")
    save_checkpoint(path, q, config, **meta)
    return path


def _load(path: str | os.PathLike, greedy: bool = True) -> base.Agent:
    """The greedy agent of a table written by :func:`_save` (its metadata as meta)."""
    if not greedy:
        raise ValueError(f"{path}: a Q-table's policy is greedy; it samples no actions")
    q, config = load_checkpoint(path)
    with np.load(path) as data:
        meta = json.loads(str(data["metadata"])) if "metadata" in data else {}
    env, env_params = _env(config)
    return base.Agent(
        GreedyPolicy(config.binning), jnp.asarray(q), env, env_params, meta
    )


def _describe(config: QLearningConfig) -> dict[str, Any]:
    return dict(
        env_id=ENV_ID,
        num_states=config.binning.num_states,
        env_params={
            k: v.item() if hasattr(v, "item") else v
            for k, v in dataclasses.asdict(_env(config)[1]).items()
        },
    )


ALGORITHM = base.Algorithm(
    name="qlearning",
    config_cls=QLearningConfig,
    init=init,
    steps=steps,
    chunk_sizes=lambda c: (c.eval_every_steps // c.num_envs,) * c.num_chunks,
    params=lambda state: state.q,
    env_steps=lambda state: state.env_steps,
    make_env=_env,
    act_fn=lambda config: GreedyPolicy(config.binning),
    save=_save,
    describe=_describe,
    columns=COLUMNS,
    load=_load,
    is_checkpoint=lambda path: Path(path).suffix == ".npz" and Path(path).is_file(),
)
train = base.make_train(ALGORITHM)


__all__ = [
    "ALGORITHM",
    "COLUMNS",
    "GreedyPolicy",
    "PRESETS",
    "QLearningConfig",
    "QLearningState",
    "StateBinning",
    "TrainStats",
    "greedy_actions",
    "init",
    "load_checkpoint",
    "preset",
    "q_update",
    "save_checkpoint",
    "steps",
    "td_targets",
    "train",
    "train_steps",
]
