"""Flappy Bird as a pure gymnax environment, faithful to flappy-bird-gymnasium 0.4.0.

The dynamics follow ``flappy_bird_gymnasium/envs/flappy_bird_env.py`` (v0.4.0)
step for step; every constant lives in :class:`EnvParams` so it can be vmapped
over. Per step, in the reference's order:

1. flap: ``vel = flap_vel`` if the action is 1 and ``y > flap_ceiling``;
2. score: a pipe is passed when ``pipe_x + w/2 <= bird_x + 34/2 < pipe_x + w/2 +
   pipe_speed`` (on positions before movement; the reference writes its speed,
   4, so each pipe counts once at any speed);
3. rotation ``rot -= rot_vel`` (3) while ``rot > min_rot`` (-90); gravity
   ``vel += gravity`` (1) while ``vel < max_fall_vel`` (10) and not flapping; a
   flap sets ``rot = flap_rot`` (45);
4. ``y += min(vel, ground_y - y - bird_height)``;
5. pipes move by ``-pipe_speed``; a pipe left of ``-pipe_width`` respawns at
   ``spawn_x`` with the next gap of the level;
6. observation; reward (+0.1 alive, +1 for a pipe, -0.5 when ``y < 0``, -1 on a
   crash, later rules overriding earlier ones; in LIDAR mode, -0.5 when a ray is
   shorter than the "private zone" and no pipe was passed, as in the reference);
7. crash: ``y + bird_height >= ground_y - 1``, or the bird's box overlaps a pipe
   box, with boxes truncated to integers as ``pygame.Rect`` does.

Differences from the reference, all deliberate:

* Episodes are truncated at ``params.max_steps_in_episode`` (default 10,000 steps,
  about 270 pipes); the reference has no time limit. A good policy never crashes,
  so some cap is needed; evaluation raises it.
* Pipe gaps come from the level seed (see :mod:`rl_pg.envs.levels`), not from a
  global RNG: the layout is a pure function of the reset key.
* Observations are float32 and the declared Box is honest: the reference declares
  Box(-1, 1) for features but emits pipe x down to -0.18 and bird y down to about
  -0.18 (and LIDAR distances slightly above 1).
* Actions other than 0 and 1 are treated as "no flap" (the state stays valid) and
  flagged in ``info["invalid_action"]``; jitted code cannot raise.
"""

from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

from rl_pg.envs import levels, lidar, render

OBS_MODES = ("features", "lidar", "pixels")


@struct.dataclass
class EnvState(environment.EnvState):
    """Dynamic state. Pipes are kept in screen order (leftmost first)."""

    bird_y: jax.Array  # [] float32, top edge of the bird
    bird_vel: jax.Array  # [] float32, vertical velocity (px/step, down > 0)
    bird_rot: jax.Array  # [] float32, degrees
    pipe_x: jax.Array  # [3] float32, left edge of each pipe
    pipe_gap_top: jax.Array  # [3] float32, y of the upper pipe's bottom edge
    next_pipe: jax.Array  # [] int32, index in the level of the next pipe to spawn
    level: jax.Array  # [] uint32, level seed
    score: jax.Array  # [] int32, pipes passed in this episode
    time: jax.Array  # [] int32, steps taken in this episode


@struct.dataclass
class EnvParams(environment.EnvParams):
    """Physics, rewards and limits; defaults are flappy-bird-gymnasium 0.4.0."""

    max_steps_in_episode: int = 10_000
    screen_width: float = 288.0
    screen_height: float = 512.0
    ground_y: float = 512.0 * 0.79  # 404.48
    bird_x: float = 57.0  # int(288 * 0.2)
    bird_width: float = 34.0
    bird_height: float = 24.0
    bird_start_y: float = 244.0  # int((512 - 24) / 2)
    bird_start_vel: float = -9.0
    bird_start_rot: float = 45.0
    gravity: float = 1.0
    max_fall_vel: float = 10.0
    flap_vel: float = -9.0
    flap_ceiling: float = -48.0  # a flap needs y > -2 * bird_height
    rot_vel: float = 3.0
    min_rot: float = -90.0
    flap_rot: float = 45.0
    pipe_width: float = 52.0
    pipe_height: float = 320.0
    pipe_speed: float = 4.0
    pipe_gap: float = 100.0
    first_pipe_x: float = 288.0
    pipe_spacing: float = 144.0  # initial pipes at 288, 432, 576
    spawn_x: float = 288.0 + 52.0 + 288.0 * 0.2  # 397.6
    gap_top_base: int = 80  # int(ground_y * 0.2)
    gap_offset_min: int = 20  # discrete gaps: base + choice({20, 30, ..., 90})
    gap_offset_step: int = 10
    gap_offset_count: int = 8
    continuous_gaps: bool = False  # original game: base + randrange(0, 142)
    continuous_gap_count: int = 142  # int(ground_y * 0.6 - 100)
    reward_alive: float = 0.1
    reward_pipe: float = 1.0
    reward_top: float = -0.5
    reward_crash: float = -1.0
    reward_private_zone: float = -0.5  # LIDAR mode only, as in the reference
    private_zone: float = 32.0  # (max(34, 24) + 30) / 2
    lidar_max_distance: float = 196.0  # int(288 * 0.8) - 34
    lidar_rot_threshold: float = 20.0
    base_width: float = 336.0  # the ground sprite, which LIDAR rays hit
    base_height: float = 112.0


_POSITIVE_FIELDS = (
    "max_steps_in_episode",
    "screen_width",
    "screen_height",
    "ground_y",
    "bird_width",
    "bird_height",
    "max_fall_vel",
    "pipe_width",
    "pipe_height",
    "pipe_speed",
    "pipe_gap",
    "pipe_spacing",
    "gap_offset_count",
    "continuous_gap_count",
    "lidar_max_distance",
)


def validate_params(params: EnvParams) -> EnvParams:
    """Raise ValueError for physically meaningless parameters; return params.

    Only concrete (Python or numpy) values are checked; traced values pass through,
    so ``vmap`` over params still works.
    """
    if not isinstance(params, EnvParams):
        raise TypeError(f"params must be an EnvParams, got {type(params).__name__}")
    problems = []
    for name in _POSITIVE_FIELDS + ("gravity", "gap_offset_step"):
        value = getattr(params, name)
        if isinstance(value, jax.core.Tracer):
            continue
        # numpy, not jnp: inside jit, jnp would trace even a constant
        array = np.asarray(value)
        if name in _POSITIVE_FIELDS and not (array.size and np.all(array > 0)):
            problems.append(f"{name} must be > 0 (got {value!r})")
        elif not np.all(array >= 0):
            problems.append(f"{name} must be >= 0 (got {value!r})")
    min_rot = params.min_rot  # the rotation's scale in the observation
    if not isinstance(min_rot, jax.core.Tracer) and not np.all(np.asarray(min_rot) < 0):
        problems.append(f"min_rot must be < 0 (got {min_rot!r})")
    if problems:
        raise ValueError("Invalid FlappyBird EnvParams: " + "; ".join(problems))
    return params


def gap_top(level: jax.Array, pipe_index: jax.Array, params: EnvParams) -> jax.Array:
    """The gap top (y of the upper pipe's bottom edge) of pipe ``pipe_index``.

    Discrete (reference): ``80 + 20 + 10 * u`` with ``u`` uniform on {0..7}, i.e.
    one of {100, 110, ..., 170}. Continuous (original FlapPyBird): ``80 + u`` with
    ``u`` uniform on {0..141}, i.e. any integer in [80, 221].
    """
    h = levels.pipe_hash(level, pipe_index)
    discrete = params.gap_offset_min + params.gap_offset_step * (
        h % jnp.asarray(params.gap_offset_count, jnp.uint32)
    ).astype(jnp.int32)
    continuous = (h % jnp.asarray(params.continuous_gap_count, jnp.uint32)).astype(
        jnp.int32
    )
    offset = jnp.where(params.continuous_gaps, continuous, discrete)
    return (params.gap_top_base + offset).astype(jnp.float32)


def initial_state(
    level: jax.Array, params: EnvParams, gaps: jax.Array | None = None
) -> EnvState:
    """The first state of ``level``: the bird mid-screen, three pipes ahead.

    ``gaps``: the level's first three gap tops, if already computed.
    """
    index = jnp.arange(3, dtype=jnp.int32)
    gaps = gap_top(level, index, params) if gaps is None else gaps
    return EnvState(
        bird_y=jnp.asarray(params.bird_start_y, jnp.float32),
        bird_vel=jnp.asarray(params.bird_start_vel, jnp.float32),
        bird_rot=jnp.asarray(params.bird_start_rot, jnp.float32),
        pipe_x=(params.first_pipe_x + params.pipe_spacing * index).astype(jnp.float32),
        pipe_gap_top=gaps,
        next_pipe=jnp.asarray(3, jnp.int32),
        level=level,
        score=jnp.asarray(0, jnp.int32),
        time=jnp.asarray(0, jnp.int32),
    )


def _int(x: jax.Array) -> jax.Array:
    """pygame.Rect's float -> int conversion (towards zero), as int32."""
    return jnp.asarray(x, jnp.float32).astype(jnp.int32)


# Auto-reset levels. gymnax's auto-reset computes a fresh state for every env
# on every step and keeps it where the episode ended; the integer hashing of a
# fresh level (a threefry block for the reset key, the level seed, three gaps)
# was most of a features step. Under vmap it is computed for the ended envs
# only: custom_vmap sees the whole batch.

_MIN_COMPACT_BATCH = 64  # below this, hashing every env is as cheap


def _fresh_level_unmasked(key, params):
    """``(level, gaps)`` that gymnax's auto-reset gives an env stepped with key."""
    level = levels.level_seed(levels.auto_reset_key(key))
    return level, gap_top(level, jnp.arange(3, dtype=jnp.int32), params)


def _masked(done, level, gaps):
    """``(level, gaps)`` where ``done``, zeros elsewhere (never used there)."""
    return (
        jnp.where(done, level, jnp.zeros_like(level)),
        jnp.where(done[..., None], gaps, jnp.zeros_like(gaps)),
    )


@jax.custom_batching.custom_vmap
def _fresh_level(key, done, params):
    """One env: its auto-reset ``(level, gaps)`` where ``done``, else zeros."""
    return _masked(done, *_fresh_level_unmasked(key, params))


@jax.custom_batching.custom_vmap
def _fresh_levels(keys, done, params):
    """A batch (leading axis): :func:`_fresh_level` of each env.

    Hashes only the ended envs when they are few (at most 1/8 of the batch),
    gathered into a smaller batch; none when none ended; all of them otherwise.
    Every branch returns the same values.
    """
    n = done.shape[0]

    def every():
        return _masked(done, *jax.vmap(_fresh_level_unmasked, (0, None))(keys, params))

    if n < _MIN_COMPACT_BATCH:
        return every()
    capacity = n // 8
    count = jnp.sum(done, dtype=jnp.int32)

    def none():
        return (
            jnp.zeros((n,), jnp.uint32),
            jnp.zeros((n, 3), jnp.float32),
        )

    def few():
        rank = jnp.cumsum(done, dtype=jnp.int32) - 1
        slot = jnp.where(done, rank, capacity)  # out of range: dropped
        index = jnp.zeros((capacity,), jnp.int32)
        index = index.at[slot].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
        level, gaps = jax.vmap(_fresh_level_unmasked, (0, None))(keys[index], params)
        rank = jnp.clip(rank, 0, capacity - 1)
        return _masked(done, level[rank], gaps[rank])

    branch = jnp.where(count == 0, 0, jnp.where(count <= capacity, 1, 2))
    return jax.lax.switch(branch, (none, few, every))


def _broadcast_batched(axis_size, in_batched, args):
    """``args`` with a leading batch axis on every leaf."""
    return jax.tree.map(
        lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *jnp.shape(x))),
        args,
        in_batched,
    )


@_fresh_level.def_vmap
def _fresh_level_vmap(axis_size, in_batched, key, done, params):
    if any(jax.tree.leaves(in_batched[2])):  # per-env params: hash every env
        args = _broadcast_batched(axis_size, tuple(in_batched), (key, done, params))
        return jax.vmap(_fresh_level.fun)(*args), (True, True)
    key, done = _broadcast_batched(axis_size, tuple(in_batched[:2]), (key, done))
    return _fresh_levels(key, done, params), (True, True)


@_fresh_levels.def_vmap
def _fresh_levels_vmap(axis_size, in_batched, keys, done, params):
    """vmap of a batch (seeds x envs, say): one flat batch of envs."""
    if any(jax.tree.leaves(in_batched[2])):
        args = _broadcast_batched(axis_size, tuple(in_batched), (keys, done, params))
        return jax.vmap(_fresh_levels.fun)(*args), (True, True)
    keys, done = _broadcast_batched(axis_size, tuple(in_batched[:2]), (keys, done))
    flat = (axis_size * done.shape[1],)
    level, gaps = _fresh_levels(
        keys.reshape(flat + keys.shape[2:]), done.reshape(flat), params
    )
    return (
        level.reshape(done.shape),
        gaps.reshape(done.shape + gaps.shape[1:]),
    ), (True, True)


# The steps of the reference's ``step``, in its order, as pure functions.


def flaps(bird_y: jax.Array, action: jax.Array, params: EnvParams) -> jax.Array:
    """Action 1 flaps, unless the bird is above the flap ceiling."""
    return (action == 1) & (bird_y > params.flap_ceiling)


def passes_pipe(pipe_x: jax.Array, params: EnvParams) -> jax.Array:
    """The score check, on positions before movement.

    A pipe is passed when its centre is at or left of the bird's centre by less
    than one step's scroll: ``pipe_mid <= bird_mid < pipe_mid + pipe_speed``
    (the reference writes the 4 of its pipe speed), so each pipe counts once.
    """
    bird_mid = params.bird_x + params.bird_width / 2
    pipe_mid = pipe_x + params.pipe_width / 2
    return jnp.any((pipe_mid <= bird_mid) & (bird_mid < pipe_mid + params.pipe_speed))


def rotate(bird_rot: jax.Array, flapped: jax.Array, params: EnvParams) -> jax.Array:
    """``rot -= rot_vel`` while above ``min_rot``; a flap sets ``flap_rot``."""
    rot = jnp.where(bird_rot > params.min_rot, bird_rot - params.rot_vel, bird_rot)
    return jnp.where(flapped, params.flap_rot, rot)


def accelerate(bird_vel: jax.Array, flapped: jax.Array, params: EnvParams) -> jax.Array:
    """A flap sets ``flap_vel``; otherwise gravity, up to ``max_fall_vel``."""
    vel = jnp.where(flapped, params.flap_vel, bird_vel)
    falls = (vel < params.max_fall_vel) & ~flapped
    return jnp.where(falls, vel + params.gravity, vel)


def move_bird(bird_y: jax.Array, vel: jax.Array, params: EnvParams) -> jax.Array:
    """``y += vel``, never through the ground."""
    return bird_y + jnp.minimum(vel, params.ground_y - bird_y - params.bird_height)


def scroll_pipes(
    state: EnvState, params: EnvParams
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pipes move left; the leftmost, once past ``-pipe_width``, respawns at
    ``spawn_x`` with the level's next gap. Returns ``(pipe_x, gap_top, next)``."""
    pipe_x = state.pipe_x - params.pipe_speed
    leaves = pipe_x[0] < -params.pipe_width
    new_gap = gap_top(state.level, state.next_pipe, params)
    shifted_x = jnp.stack([pipe_x[1], pipe_x[2], jnp.float32(params.spawn_x)])
    shifted_gap = jnp.stack([state.pipe_gap_top[1], state.pipe_gap_top[2], new_gap])
    return (
        jnp.where(leaves, shifted_x, pipe_x),
        jnp.where(leaves, shifted_gap, state.pipe_gap_top),
        state.next_pipe + leaves.astype(jnp.int32),
    )


def crashed(state: EnvState, params: EnvParams) -> jax.Array:
    """Ground contact, or the bird's box overlapping a pipe box.

    Boxes are ``pygame.Rect``s, whose constructor truncates position and size
    to ints; ``colliderect`` is then integer arithmetic, done here in int32.
    """
    on_ground = state.bird_y + params.bird_height >= params.ground_y - 1.0
    bird_x, bird_y = _int(params.bird_x), _int(state.bird_y)
    bird_w, bird_h = _int(params.bird_width), _int(params.bird_height)
    pipe_x, pipe_w, pipe_h = (
        _int(state.pipe_x),
        _int(params.pipe_width),
        _int(params.pipe_height),
    )

    def overlaps(top):  # Rect.colliderect's y test, for boxes of positive size
        return (bird_y < top + pipe_h) & (top < bird_y + bird_h)

    upper = overlaps(_int(state.pipe_gap_top - params.pipe_height))
    lower = overlaps(_int(state.pipe_gap_top + params.pipe_gap))
    in_column = (bird_x < pipe_x + pipe_w) & (pipe_x < bird_x + bird_w)
    return on_ground | jnp.any(in_column & (upper | lower))


def reward(
    passed: jax.Array,
    bird_y: jax.Array,
    too_close: jax.Array,
    terminated: jax.Array,
    params: EnvParams,
) -> jax.Array:
    """The reference's reward; later rules override earlier ones.

    +alive (or the LIDAR mode's private-zone penalty when ``too_close``), +pipe
    when a pipe is passed, the top penalty when ``y < 0``, the crash penalty.
    """
    alive = jnp.where(too_close, params.reward_private_zone, params.reward_alive)
    r = jnp.where(passed, params.reward_pipe, alive)
    r = jnp.where(bird_y < 0, params.reward_top, r)
    return jnp.where(terminated, params.reward_crash, r).astype(jnp.float32)


def features(state: EnvState, params: EnvParams) -> jax.Array:
    """The reference's 12-entry observation, normalised, float32.

    For each pipe in screen order: (x / 288, gap_top / 512, gap_bottom / 512), a
    pipe right of the screen replaced by (1, 0, 1); then y / 512, vel / 10,
    rot / 90 (screen width and height, ``max_fall_vel``, ``|min_rot|``).

    Entry ``j`` is picked with selects on ``j`` (pipe ``j // 3``, field ``j % 3``)
    rather than stacked and concatenated: under ``vmap``, XLA's CPU backend
    turns the nested stacks (and the transpose that batching the bird's stack
    of scalars adds) into a slow kernel. With the selects, ``rl-pg bench``'s
    rollout ran about 1.1-1.25x faster at 1,024 envs and 1.03-1.4x at 16,384
    (interleaved best-of runs on the shared 2-core CPU). Each entry is the
    same float operations as in the stacked form, so the values are
    bit-equal (tested).
    """
    w, h = params.screen_width, params.screen_height
    j = jnp.arange(12)
    pipe, field = jnp.minimum(j // 3, 2), j % 3

    def per_pipe(values):  # entry j: values[pipe j]
        return jnp.where(
            pipe == 0, values[0], jnp.where(pipe == 1, values[1], values[2])
        )

    x, gap_top = per_pipe(state.pipe_x), per_pipe(state.pipe_gap_top)
    hidden = x > w
    pipes = jnp.where(
        field == 0,
        jnp.where(hidden, w, x) / w,
        jnp.where(
            field == 1,
            jnp.where(hidden, 0.0, gap_top) / h,
            jnp.where(hidden, h, gap_top + params.pipe_gap) / h,
        ),
    )
    bird = jnp.where(
        field == 0,
        state.bird_y / h,
        jnp.where(
            field == 1,
            state.bird_vel / params.max_fall_vel,
            state.bird_rot / jnp.abs(params.min_rot),
        ),
    )
    return jnp.where(j < 9, pipes, bird).astype(jnp.float32)


class FlappyBird(environment.Environment[EnvState, EnvParams]):
    """Flappy Bird (flappy-bird-gymnasium 0.4.0 physics) as a gymnax environment.

    Args:
        obs_mode: "features" (12 floats), "lidar" (``num_rays`` distances) or
            "pixels" (``pixel_shape`` grayscale uint8 image).
        num_rays: LIDAR rays, spread over 180 degrees (reference: 180).
        pixel_shape: (height, width) of the pixel observation.
    """

    def __init__(
        self,
        obs_mode: str = "features",
        num_rays: int = 180,
        pixel_shape: tuple[int, int] = (84, 84),
    ):
        super().__init__()
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        if not (isinstance(num_rays, int) and num_rays >= 1):
            raise ValueError(f"num_rays must be a positive int, got {num_rays!r}")
        pixel_shape = tuple(pixel_shape)
        if not (
            len(pixel_shape) == 2
            and all(isinstance(n, int) and 8 <= n <= 1024 for n in pixel_shape)
        ):
            raise ValueError(
                f"pixel_shape must be (height, width) ints in [8, 1024], "
                f"got {pixel_shape!r}"
            )
        self.obs_mode = obs_mode
        self.num_rays = num_rays
        self.pixel_shape = pixel_shape

    # Hashing on the static configuration lets jit cache across equal instances.
    def _key(self):
        return (type(self), self.obs_mode, self.num_rays, self.pixel_shape)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, FlappyBird) and self._key() == other._key()

    def __repr__(self):
        return (
            f"FlappyBird(obs_mode={self.obs_mode!r}, num_rays={self.num_rays}, "
            f"pixel_shape={self.pixel_shape})"
        )

    @property
    def default_params(self) -> EnvParams:
        return EnvParams()

    @property
    def name(self) -> str:
        suffix = {"features": "", "lidar": "-lidar", "pixels": "-pixels"}
        return f"FlappyBird{suffix[self.obs_mode]}-v0"

    @property
    def num_actions(self) -> int:
        return 2

    def reset_env(self, key: chex.PRNGKey, params: EnvParams) -> tuple[Any, EnvState]:
        """Start the level that ``key`` selects (bird mid-screen, three pipes)."""
        state = initial_state(levels.level_seed(key), params)
        return self.get_obs(state, params), state

    @partial(jax.jit, static_argnames=("self",))
    def step(
        self,
        key: chex.PRNGKey,
        state: EnvState,
        action: int | jax.Array,
        params: EnvParams | None = None,
    ) -> tuple[Any, EnvState, jax.Array, jax.Array, jax.Array, dict[str, Any]]:
        """gymnax's ``step`` (auto-reset, same info, same outputs), made cheaper.

        gymnax splits ``key`` and computes a reset, observation included, for
        every env on every step, selecting it where the episode ended. Here:

        * the reset key ``split(key)[1]`` is computed alone, as one fused
          threefry block (:func:`levels.auto_reset_key`); ``step_env`` ignores
          its key, so the other half of the split is not needed;
        * under ``vmap``, the fresh level and its gaps (integer hashing) are
          computed for the envs whose episode ended only (:func:`_fresh_levels`);
          elsewhere the fresh state is never selected;
        * the reset observation is computed once per batch where it can be
          (:meth:`_reset_where_done`).
        """
        if params is None:
            params = self.default_params
        obs_st, state_st, reward, terminated, info = self.step_env(
            key, state, action, params
        )
        truncated = self.is_truncated(state_st, params)
        done = jnp.logical_or(terminated, truncated)
        # a level's layout takes no gradient (and custom_vmap's rule cannot be
        # linearised)
        level, gaps = _fresh_level(key, done, jax.lax.stop_gradient(params))
        fresh = initial_state(level, params, gaps)
        state = jax.tree.map(lambda x, y: jax.lax.select(done, x, y), fresh, state_st)
        obs = self._reset_where_done(done, fresh, obs_st, params)
        info = {
            **info,
            "terminated": terminated,
            "truncated": truncated,
            "final_observation": obs_st,
        }
        return obs, state, reward, terminated, truncated, info

    def _reset_where_done(self, done, fresh, obs_st, params) -> jax.Array:
        """``obs_st``, with ``get_obs(fresh)`` where ``done``.

        A fresh state's pipes usually start out of sight (x >= 288: right of the
        screen and beyond the rays' reach of 91 + 196 px). Its observation then
        depends on ``params`` only, not on the level, and since that condition
        depends on ``params`` only too, ``lax.cond`` on it stays a branch under
        ``vmap`` with shared params: the observation is computed once per batch
        instead of once per env. (With per-env params the conds become selects
        that run both sides, as costly as computing it per env.) The shared
        observation is the output of a ``cond`` of its own so that XLA keeps it
        as a buffer rather than fusing its computation into, and repeating it
        in, the per-env select.

        Pixel frames are selected without their channel axis, which is added
        last: XLA then lays the observation out with that unit axis outermost,
        as it does for rendered frames. (Innermost, it makes XLA's CPU
        reductions over the observations several times slower.)
        """
        if self.obs_mode == "features":
            return jax.lax.select(done, self.get_obs(fresh, params), obs_st)

        def observe(state):
            return self._strip_channel(self.get_obs(state, params))

        if self.obs_mode == "lidar":
            in_sight = lidar.pipes_in_reach(fresh.pipe_x, params)
        else:
            in_sight = render.pipes_in_view(fresh.pipe_x, params, self.pixel_shape)
        gaps = fresh.pipe_gap_top
        level_free = fresh.replace(
            pipe_gap_top=jnp.zeros(gaps.shape, gaps.dtype),
            level=jnp.zeros(fresh.level.shape, fresh.level.dtype),
        )
        stepped = self._strip_channel(obs_st)
        shared = jax.lax.cond(
            in_sight,
            lambda: jnp.zeros(stepped.shape, stepped.dtype),
            lambda: observe(level_free),
        )
        obs = jax.lax.cond(
            in_sight,
            lambda: jax.lax.select(done, observe(fresh), stepped),
            lambda: jax.lax.select(done, shared, stepped),
        )
        return obs[..., None] if self.obs_mode == "pixels" else obs

    def _strip_channel(self, obs: jax.Array) -> jax.Array:
        """A pixel observation without its channel axis; others unchanged."""
        return obs[..., 0] if self.obs_mode == "pixels" else obs

    def step_env(
        self,
        key: chex.PRNGKey,
        state: EnvState,
        action: int | jax.Array,
        params: EnvParams,
    ) -> tuple[Any, EnvState, jax.Array, jax.Array, dict[str, Any]]:
        """One reference step; ``key`` is unused (the dynamics are deterministic)."""
        del key
        action = jnp.asarray(action)
        flapped = flaps(state.bird_y, action, params)
        passed = passes_pipe(state.pipe_x, params)  # before anything moves
        vel = accelerate(state.bird_vel, flapped, params)
        pipe_x, pipe_gap_top, next_pipe = scroll_pipes(state, params)
        score = state.score + passed.astype(jnp.int32)
        moved = state.replace(
            bird_y=move_bird(state.bird_y, vel, params).astype(jnp.float32),
            bird_vel=vel.astype(jnp.float32),
            bird_rot=rotate(state.bird_rot, flapped, params).astype(jnp.float32),
            pipe_x=pipe_x.astype(jnp.float32),
            pipe_gap_top=pipe_gap_top.astype(jnp.float32),
            next_pipe=next_pipe,
            score=score,
            time=state.time + 1,
        )
        obs, too_close = self._observe(moved, params)
        terminated = crashed(moved, params)
        r = reward(passed, moved.bird_y, too_close, terminated, params)
        # the reference zeroes the velocity at a crash
        moved = moved.replace(bird_vel=jnp.where(terminated, 0.0, moved.bird_vel))
        info = {"score": score, "invalid_action": (action != 0) & (action != 1)}
        return (
            jax.lax.stop_gradient(obs),
            jax.lax.stop_gradient(moved),
            r,
            terminated,
            info,
        )

    def _observe(self, state: EnvState, params: EnvParams):
        """``(observation, too_close)``: a ray inside the private zone (LIDAR)."""
        if self.obs_mode != "lidar":
            return self.get_obs(state, params), jnp.bool_(False)
        distances = lidar.scan(state, params, self.num_rays)
        too_close = jnp.any(distances < params.private_zone)
        return distances / params.lidar_max_distance, too_close

    def get_obs(self, state: EnvState, params: EnvParams, key=None) -> jax.Array:
        """Observation of ``state`` in this environment's mode."""
        del key
        if self.obs_mode == "features":
            return features(state, params)
        if self.obs_mode == "lidar":
            return lidar.scan(state, params, self.num_rays) / params.lidar_max_distance
        frame = render.render_gray(state, params, self.pixel_shape)
        return frame[..., None]

    def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
        return crashed(state, params)

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        """0: do nothing, 1: flap."""
        return spaces.Discrete(2)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        """An honest Box: what the observations really span under default params."""
        if self.obs_mode == "features":
            # pipe x >= -52/288 - eps; bird y >= about -0.2; velocity in [-0.9, 1]
            return spaces.Box(-1.0, 1.0 + 1e-6, (12,), jnp.float32)
        if self.obs_mode == "lidar":
            # distances are clipped to the ray length but the ground clamp can
            # lengthen a ray slightly; the reference emits values up to ~1.1
            return spaces.Box(0.0, 2.0, (self.num_rays,), jnp.float32)
        return spaces.Box(0, 255, (*self.pixel_shape, 1), jnp.uint8)

    def state_space(self, params: EnvParams | None = None) -> spaces.Dict:
        params = self.default_params if params is None else params
        inf = jnp.inf
        return spaces.Dict(
            {
                "bird_y": spaces.Box(-inf, inf, (), jnp.float32),
                "bird_vel": spaces.Box(-inf, inf, (), jnp.float32),
                "bird_rot": spaces.Box(
                    params.min_rot - params.rot_vel,
                    max(params.flap_rot, params.bird_start_rot),
                    (),
                    jnp.float32,
                ),
                "pipe_x": spaces.Box(-inf, inf, (3,), jnp.float32),
                "pipe_gap_top": spaces.Box(0.0, inf, (3,), jnp.float32),
                "next_pipe": spaces.Discrete(2**31 - 1),
                "level": spaces.Discrete(2**32 - 1),
                "score": spaces.Discrete(2**31 - 1),
                "time": spaces.Discrete(params.max_steps_in_episode),
            }
        )
