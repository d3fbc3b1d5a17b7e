"""Held-out evaluation: score distributions on levels that training never sees.

Any agent plugs in through one function,
``act_fn(agent_params, obs, state, key) -> action`` for a single (unbatched)
environment: policies read ``obs`` and ignore ``state``; tabular agents bin the
environment ``state``; greedy agents ignore ``key``. :func:`evaluate` runs
``num_episodes`` episodes side by side (``vmap``) without auto-reset, inside one
jitted ``lax.while_loop`` over chunks of ``chunk_size`` steps (a ``lax.scan``),
and leaves the loop as soon as every episode has crashed or reached
``max_score`` pipes (with ``median_only``, as soon as the median is decided). A
finished episode's state is frozen, so its score and length are read off the
final state.

Levels. An episode's pipe layout is a pure function of its reset key, so the
held-out levels are fixed by a seed: episode ``i`` is reset with
``jax.random.fold_in(jax.random.PRNGKey(HELD_OUT_SEED), i)``. Training code in
rl_pg draws its reset keys from the run's own key and never from these streams,
so every algorithm is scored on the same levels.
``VALIDATION_SEED`` gives a second, disjoint stream for model selection during
training (keeping the best checkpoint), so that the reported held-out score is
not selected on the levels it is reported on. (Levels are 32-bit seeds: a
training level can coincide with a held-out one by chance, about once in 2**32
draws per held-out level.)

Cost. 10,000 pipes take 376,691 steps (pipes reach the bird every 36, 36 and 41
steps), so a policy that never crashes costs that many vmapped steps; the chunked
loop keeps the per-step overhead to the vmapped step itself.
"""

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import io
from rl_pg.envs import FlappyBird, render

HELD_OUT_SEED = 0x7E57_1EE1  # test levels: eval.json scores
VALIDATION_SEED = 0x5E1E_C7ED  # validation levels: checkpoint selection in training
CONFIRMATION_SEED = VALIDATION_SEED + 1000  # more validation levels: the stop rule

# Step counts are int32: max_steps_for(max_score, params) is clamped below 2**31
# (with the default physics 50M pipes take 1.9e9 steps).
MAX_SCORE_LIMIT = 50_000_000
_MAX_STEPS = 2**31 - 2**20

ActFn = Callable[[Any, jax.Array, Any, chex.PRNGKey], jax.Array]


class EvalResult(NamedTuple):
    """Per-episode outcome of :func:`evaluate`; every field is [N].

    Attributes:
      scores: [N] int32 pipes passed, capped at ``max_score``.
      lengths: [N] int32 steps taken until the episode stopped.
      crashed: [N] bool, the episode ended in a crash (not at ``max_score`` or at
        the step limit).
      finished: [N] bool, the episode ended (all of them unless ``median_only``;
        an unfinished episode's score is a lower bound).
    """

    scores: jax.Array
    lengths: jax.Array
    crashed: jax.Array
    finished: jax.Array


class _EvalCarry(NamedTuple):
    state: Any  # EnvState, every leaf [N, ...]
    done: jax.Array  # [N] bool
    crashed: jax.Array  # [N] bool
    key: chex.PRNGKey


def max_steps_for(max_score: int | jax.Array, params: Any) -> jax.Array:
    """A step limit that a never-crashing bird needs to pass ``max_score`` pipes,
    from the pipe geometry of ``params`` (Flappy Bird's ``EnvParams``).

    The first pipe reaches the bird after ``(first_pipe_x + pipe_width / 2 -
    bird_x - bird_width / 2) / pipe_speed`` steps. The three pipes then cycle: one
    leaves at ``x < -pipe_width`` and respawns at ``spawn_x``, so any three
    consecutive pipes pass within ``(spawn_x + pipe_width + pipe_speed) /
    pipe_speed`` steps (113 with the defaults: every 36, 36, 41 steps). The limit
    allows one cycle per three pipes plus two spare cycles (380,365 steps for
    10,000 pipes with the defaults; the bird needs 376,691). int32, traceable.
    """
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    speed = f32(params.pipe_speed)
    first = jnp.ceil(
        (
            f32(params.first_pipe_x)
            + f32(params.pipe_width) / 2
            - f32(params.bird_x)
            - f32(params.bird_width) / 2
        )
        / speed
    )
    cycle = jnp.ceil((f32(params.spawn_x) + f32(params.pipe_width) + speed) / speed)
    cycles = jnp.ceil(f32(max_score) / 3.0) + 2.0
    steps = jnp.maximum(first, 0.0) + 1.0 + cycles * cycle
    return jnp.minimum(steps, _MAX_STEPS).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def held_out_keys(num_episodes: int, seed: int = HELD_OUT_SEED) -> jax.Array:
    """Reset keys ``fold_in(PRNGKey(seed), i)`` for ``i < num_episodes``: [N, 2].

    Computed once per (N, seed), as a concrete array even inside a jit trace.
    """
    with jax.ensure_compile_time_eval():
        base = jax.random.PRNGKey(seed)
        return jax.vmap(jax.random.fold_in, (None, 0))(
            base, jnp.arange(num_episodes, dtype=jnp.uint32)
        )


def _where_tree(pred: jax.Array, new: Any, old: Any) -> Any:
    """Per-episode select between two batched pytrees (``pred`` is [N])."""

    def select(a, b):
        return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(select, new, old)


def _step_limit(env: Any, env_params: Any, max_score: jax.Array) -> tuple[Any, Any]:
    """``(env_params, max_steps)``: Flappy Bird stops once ``max_score`` pipes can
    be passed (:func:`max_steps_for`); another gymnax env keeps its own limit
    (its score is the episode return)."""
    if isinstance(env, FlappyBird):
        max_steps = max_steps_for(max_score, env_params)
        return env_params.replace(max_steps_in_episode=max_steps), max_steps
    return env_params, env_params.max_steps_in_episode


def _one_step(act_fn, agent_params, env, env_params, max_score, max_steps, n: int):
    """``one_step(carry, _) -> (carry, None)``: every live episode of the ``n``
    takes one step; a finished one stays as it was."""
    # Observations are recomputed from the state rather than carried: an act_fn
    # that ignores them (tabular agents) then costs no observation at all.
    observe = jax.vmap(env.get_obs, (0, None))
    act = jax.vmap(act_fn, (None, 0, 0, 0))
    step = jax.vmap(env.step_env, (0, 0, 0, None))

    def one_step(carry: _EvalCarry, _) -> tuple[_EvalCarry, None]:
        key, key_act, key_step = jax.random.split(carry.key, 3)
        action = act(
            agent_params,
            observe(carry.state, env_params),
            carry.state,
            jax.random.split(key_act, n),
        )
        _, state, _, terminated, _ = step(
            jax.random.split(key_step, n), carry.state, action, env_params
        )
        live = ~carry.done
        state = _where_tree(live, state, carry.state)
        crashed = carry.crashed | (live & terminated)
        done = crashed | (state.score >= max_score) | (state.time >= max_steps)
        return _EvalCarry(state, done, crashed, key), None

    return one_step


def _median_known(carry: _EvalCarry, num_episodes: int) -> jax.Array:
    """Whether the scores' median is already decided.

    Pipes reach the bird at the same steps on every level, so an episode still
    running will end with at least the score of every crashed one: crashed
    episodes fill the lowest ranks, finished uncrashed ones the highest. The
    median needs the 1-indexed order statistics ``(N + 1) // 2`` and ``N // 2 + 1``.
    """
    lo, hi = (num_episodes + 1) // 2, num_episodes // 2 + 1
    num_low = jnp.sum(carry.crashed)
    num_high = jnp.sum(carry.done & ~carry.crashed)

    def known(k):
        return (k <= num_low) | (k > num_episodes - num_high)

    return known(lo) & known(hi)


@functools.partial(jax.jit, static_argnames=("act_fn", "env", "chunk_size"))
def _evaluate(
    act_fn: ActFn,
    agent_params: Any,
    env: Any,
    env_params: Any,
    key: chex.PRNGKey,
    reset_keys: jax.Array,
    max_score: jax.Array,
    median_only: jax.Array,
    chunk_size: int,
) -> EvalResult:
    env_params, max_steps = _step_limit(env, env_params, max_score)
    num_episodes = reset_keys.shape[0]
    _, state = jax.vmap(env.reset_env, (0, None))(reset_keys, env_params)
    one_step = _one_step(
        act_fn, agent_params, env, env_params, max_score, max_steps, num_episodes
    )

    def chunk(carry: _EvalCarry) -> _EvalCarry:
        return jax.lax.scan(one_step, carry, None, length=chunk_size)[0]

    def keep_going(carry: _EvalCarry) -> jax.Array:
        known = median_only & _median_known(carry, num_episodes)
        return ~jnp.all(carry.done) & ~known

    done = jnp.zeros(num_episodes, bool)
    carry = _EvalCarry(state, done, done, key)
    carry = jax.lax.while_loop(keep_going, chunk, carry)
    score_dtype = jnp.int32 if isinstance(env, FlappyBird) else jnp.float32
    return EvalResult(
        scores=jnp.minimum(carry.state.score, max_score).astype(score_dtype),
        lengths=carry.state.time.astype(jnp.int32),
        crashed=carry.crashed,
        finished=carry.done,
    )


def evaluate(
    act_fn: ActFn,
    agent_params: Any,
    env: Any,
    env_params: Any,
    key: chex.PRNGKey,
    num_episodes: int = 32,
    max_score: int = 10_000,
    *,
    reset_keys: jax.Array | None = None,
    median_only: bool | jax.Array = False,
    chunk_size: int = 128,
) -> EvalResult:
    """Score an agent on held-out levels, one episode per level, no auto-reset.

    Jitted (``act_fn`` and ``env`` are static: pass the same function object to
    reuse the compilation) and usable inside other jitted or vmapped code.

    Args:
      act_fn: ``(agent_params, obs, state, key) -> action`` for one environment;
        greedy or sampled as it decides.
      agent_params: whatever ``act_fn`` reads (network params, a Q-table, ...).
      env: a Flappy Bird environment (``rl_pg.make``), or another gymnax env
        wrapped by ``rl_pg.envs.scored.EpisodeReturn`` (scores are then float32
        episode returns; ``median_only`` is ignored).
      env_params: its ``EnvParams``; for Flappy Bird ``max_steps_in_episode`` is
        replaced by ``max_steps_for(max_score, env_params)``.
      key: action-sampling key (the levels do not depend on it).
      num_episodes: N, the number of levels; ignored when ``reset_keys`` is given.
      max_score: an episode stops counting (and stops) at this many pipes (an
        int, or an int32 array inside jitted code, not checked).
      reset_keys: [N, 2] reset keys; default ``held_out_keys(num_episodes)``.
      median_only: stop as soon as the median score is decided (cheaper when a
        few long episodes outlast the median; used for checkpoint selection).
        Exact for the median; other scores of unfinished episodes are lower
        bounds (``finished`` tells which). Traced: no recompilation.
      chunk_size: steps per ``lax.scan`` chunk between checks that all are done.

    Returns:
      EvalResult with [N] scores (capped at ``max_score``), lengths and crash flags.
    """
    if not isinstance(max_score, jax.Array) and not (  # an array: traced, unchecked
        isinstance(max_score, int)
        and not isinstance(max_score, bool)
        and 1 <= max_score <= MAX_SCORE_LIMIT
    ):
        raise ValueError(
            f"max_score must be an int in [1, {MAX_SCORE_LIMIT}], got {max_score!r}"
        )
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if reset_keys is None:
        if not (isinstance(num_episodes, int) and num_episodes >= 1):
            raise ValueError(f"num_episodes must be an int >= 1, got {num_episodes!r}")
        reset_keys = held_out_keys(num_episodes)
    shape = getattr(reset_keys, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] < 1:
        raise ValueError(f"reset_keys must be [N >= 1, 2] PRNG keys, got shape {shape}")
    if not isinstance(env, FlappyBird):
        median_only = False  # the early stop relies on pipes' common timing
    return _evaluate(
        act_fn,
        agent_params,
        env,
        env_params,
        key,
        reset_keys,
        jnp.asarray(max_score, jnp.int32),  # traced, like median_only: one compile
        jnp.asarray(median_only, bool),
        chunk_size,
    )


def _number(x: Any) -> int | float:
    """An int for integral scores (pipes, most returns), else a float."""
    x = float(x)
    return int(x) if x.is_integer() else x


def summarize(result: EvalResult) -> dict[str, Any]:
    """JSON-ready statistics of an evaluation (median, mean, min, max, scores)."""
    scores = np.asarray(result.scores)
    return dict(
        median_score=float(np.median(scores)),
        mean_score=float(np.mean(scores)),
        min_score=_number(scores.min()),
        max_score_reached=_number(scores.max()),
        num_episodes=int(scores.size),
        num_crashed=int(np.sum(np.asarray(result.crashed))),
        scores=[_number(s) for s in scores],
    )


def write_eval_json(
    path: str | os.PathLike,
    result: EvalResult,
    wall_clock_s: float,
    env_steps: int,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``eval.json`` (the public contract) and return what was written.

    Fields: ``median_score``, ``mean_score``, ``scores``, ``wall_clock_s``,
    ``env_steps`` (training steps behind the agent), plus ``min_score``,
    ``max_score_reached``, ``num_episodes``, ``num_crashed`` and any ``extra``
    fields (for instance ``max_score``, ``held_out_seed``).
    """
    data = summarize(result)
    data.update(wall_clock_s=float(wall_clock_s), env_steps=int(env_steps), **extra)
    io.write_json(path, data)
    return data


@functools.partial(jax.jit, static_argnames=("act_fn", "env", "num_steps"))
def _greedy_states(act_fn, agent_params, env, env_params, key, reset_key, num_steps):
    """States of one episode for ``num_steps`` steps, frozen after a crash."""
    obs, state = env.reset_env(reset_key, env_params)

    def one_step(carry, key):
        obs, state, done = carry
        key_act, key_step = jax.random.split(key)
        action = act_fn(agent_params, obs, state, key_act)
        new_obs, new_state, _, terminated, _ = env.step_env(
            key_step, state, action, env_params
        )
        obs, state = _where_tree(~done, (new_obs, new_state), (obs, state))
        return (obs, state, done | terminated), (state, done)

    keys = jax.random.split(key, num_steps)
    _, (states, was_done) = jax.lax.scan(one_step, (obs, state, False), keys)
    first = jax.tree.map(lambda x: x[None], state)
    states = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, states)
    return states, jnp.concatenate([jnp.zeros(1, bool), was_done])


# One frame at a time: compiling a batched (vmap / lax.map) renderer costs more
# than rendering a few hundred frames one by one.
_render_rgb = jax.jit(render.render_rgb)


def agent_gif(
    act_fn: ActFn,
    agent_params: Any,
    env: Any,
    env_params: Any,
    path: str | os.PathLike,
    key: chex.PRNGKey,
    *,
    reset_key: jax.Array | None = None,
    max_frames: int = 200,
    frame_skip: int = 2,
    fps: int = 15,
) -> int:
    """Render one episode of the agent to an animated GIF; return the frame count.

    The episode is held-out level 0 (``held_out_keys(1)[0]``) unless ``reset_key``
    is given; it runs for at most ``(max_frames - 1) * frame_skip`` steps or until
    the crash (the crash frame is included). Frames are 512 x 288 RGB from
    ``rl_pg.envs.render.render_rgb``, every ``frame_skip``-th step, at ``fps``
    (the game runs at 30 steps per second: ``fps = 30 / frame_skip`` is real time).
    Other gymnax envs have no renderer here: nothing is written and 0 returned.
    """
    if not isinstance(env, FlappyBird):
        return 0
    if not (isinstance(max_frames, int) and max_frames >= 2):
        raise ValueError(f"max_frames must be an int >= 2, got {max_frames!r}")
    if not (isinstance(frame_skip, int) and frame_skip >= 1):
        raise ValueError(f"frame_skip must be an int >= 1, got {frame_skip!r}")
    if reset_key is None:
        reset_key = held_out_keys(1)[0]
    num_steps = (max_frames - 1) * frame_skip
    states, was_done = _greedy_states(
        act_fn, agent_params, env, env_params, key, reset_key, num_steps
    )
    states, was_done = jax.device_get((states, was_done))
    # The state at index t is after t steps; it is frozen from the crash on, so
    # the first frozen index follows the crash state.
    last = int(np.argmax(was_done)) - 1 if was_done.any() else num_steps
    indices = list(range(0, last + 1, frame_skip))
    if indices[-1] != last:  # always show the final (crash) state
        indices = indices[: max_frames - 1] + [last]
    frames = np.stack(
        [
            np.asarray(
                _render_rgb(jax.tree.map(lambda x, i=i: x[i], states), env_params)
            )
            for i in indices
        ]
    )
    render.write_gif(frames, path, fps=fps)
    return int(frames.shape[0])
