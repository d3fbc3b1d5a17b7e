"""Rollouts: policies acting in a gymnax environment, collected time-major.

Three ways to collect a :class:`~rl_pg.trajectory.Trajectory` ``[T, B]``, each a
``lax.scan`` over time of a ``vmap`` over the batch, jittable end to end:

* :func:`episodic_rollout`: one episode per column from a given level (reset
  key), fixed horizon ``T``, no auto-reset; ``mask`` is 0 after the episode ends
  and ``truncated`` marks where the env's time limit cut it, or columns still
  alive at ``T - 1``.
* :func:`grouped_rollout`: ``L`` levels x ``G`` rollouts per level; the ``G``
  columns of a level share its reset key and differ only in action sampling
  (GRPO's group; common random numbers for estimator comparisons).
* :func:`streaming_rollout`: auto-resetting continuous streams for training;
  carries a :class:`StreamState` between calls.

``apply_fn(params, obs) -> (logits, value)`` is a policy from
:mod:`rl_pg.policies` (value zeros without a critic).

Each takes an optional ``mesh`` (:func:`rl_pg.distributed.batch_mesh`): under
``jit`` the batch axis (levels for grouped rollouts) is then split across its
devices. Random bits do not depend on the layout, so the trajectories are those
of the unsharded call.
"""

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rl_pg import distributed
from rl_pg.trajectory import Trajectory

ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


def _act(key, params, apply_fn, obs):
    """Sample a ~ pi(.|obs) for a batch; return (action, log_prob, value)."""
    logits, value = apply_fn(params, obs)
    action = jax.random.categorical(key, logits)
    log_prob = jnp.take_along_axis(
        jax.nn.log_softmax(logits), action[..., None], axis=-1
    )[..., 0]
    return action.astype(jnp.int32), log_prob, value


def _shift_in(values: jax.Array, last: jax.Array) -> jax.Array:
    """[T, B] ``values[t + 1]``, with ``last`` (V after the final step) at T - 1.

    The collection-time value of the next step is the bootstrap value wherever an
    episode goes on, so rollouts need no second network pass per step.
    """
    return jnp.concatenate([values[1:], last[None]], axis=0)


def episodic_rollout(
    key: jax.Array,
    params: Any,
    apply_fn: ApplyFn,
    env,
    env_params,
    reset_keys: jax.Array,
    horizon: int,
    level: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> Trajectory:
    """One episode per reset key, ``horizon`` steps, masked after it ends (the
    env's time limit, ``env.is_truncated``, ends it as ``truncated``).

    Args:
      key: action-sampling key (the dynamics never use it).
      params: policy parameters.
      apply_fn: ``(params, obs[B, ...]) -> (logits[B, A], value[B])``.
      env, env_params: a gymnax environment (``step_env`` is used: no auto-reset).
      reset_keys: ``[B]`` keys; each selects a level.
      horizon: number of steps ``T`` (static).
      level: ``[B]`` int level index per column (default ``arange(B)``).
      mesh: split the B columns across its devices (B divisible by their number).

    Returns:
      Trajectory ``[T, B]``; steps after a column's episode ended have mask 0 and
      hold the (ignored) continuation of a crashed bird.
    """
    _check_keys(reset_keys, "reset_keys")
    if (
        isinstance(horizon, bool)
        or not isinstance(horizon, numbers.Integral)
        or horizon < 1
    ):
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    num = reset_keys.shape[0]
    distributed.check_divisible(num, mesh, "rollout batch")
    reset_keys = distributed.constrain(reset_keys, mesh)
    level = jnp.arange(num, dtype=jnp.int32) if level is None else level
    obs, state = jax.vmap(env.reset_env, in_axes=(0, None))(reset_keys, env_params)
    step = jax.vmap(env.step_env, in_axes=(None, 0, 0, None))
    time_limit = jax.vmap(env.is_truncated, in_axes=(0, None))

    def body(carry, key):
        obs, state, alive = carry
        action, log_prob, value = _act(key, params, apply_fn, obs)
        next_obs, next_state, reward, terminated, info = step(
            key, state, action, env_params
        )
        cut = alive & ~terminated & time_limit(next_state, env_params)
        out = dict(
            observations=obs,
            actions=action,
            rewards=reward,
            log_probs=log_prob,
            values=value,
            terminated=terminated & alive,
            truncated=cut,
            mask=alive.astype(jnp.float32),
            score=info["score"],
        )
        return (next_obs, next_state, alive & ~terminated & ~cut), out

    keys = jax.random.split(key, horizon)
    (last_obs, _, alive), out = jax.lax.scan(
        body, (obs, state, jnp.ones(num, bool)), keys
    )
    out["truncated"] = out["truncated"].at[-1].set(out["truncated"][-1] | alive)
    _, last_value = apply_fn(params, last_obs)  # one pass, for the cut at T - 1
    traj = Trajectory(
        next_values=_shift_in(out["values"], last_value),
        level=jnp.broadcast_to(level, (horizon, num)),
        **out,
    )
    return distributed.constrain(traj, mesh, axis=1)


def _check_keys(keys: jax.Array, name: str) -> None:
    """``keys`` is a batch of PRNG keys ([B] typed keys or [B, 2] raw ones)."""
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if keys.ndim != (1 if typed else 2):
        raise ValueError(
            f"{name} must be a batch of keys (jax.random.split(key, n)), "
            f"got an array of shape {keys.shape}"
        )


def grouped_rollout(
    key: jax.Array,
    params: Any,
    apply_fn: ApplyFn,
    env,
    env_params,
    level_keys: jax.Array,
    group_size: int,
    horizon: int,
    mesh: Mesh | None = None,
) -> Trajectory:
    """``L`` levels x ``G`` rollouts: columns ``l * G + g``, level index ``l``.

    The ``G`` rollouts of a level share its reset key (same pipes) and differ
    only in their sampled actions. With a ``mesh`` the levels are split across
    its devices (``L`` divisible by their number), whole groups per device.
    """
    _check_keys(level_keys, "level_keys")
    num_levels = level_keys.shape[0]
    distributed.check_divisible(num_levels, mesh, "number of levels")
    level_keys = distributed.constrain(level_keys, mesh)
    reset_keys = jnp.repeat(level_keys, group_size, axis=0)
    level = jnp.repeat(jnp.arange(num_levels, dtype=jnp.int32), group_size)
    return episodic_rollout(
        key, params, apply_fn, env, env_params, reset_keys, horizon, level, mesh
    )


class StreamState(NamedTuple):
    """What a streaming rollout carries between calls."""

    obs: jax.Array  # [B, *obs_shape]
    env_state: Any  # batched env state
    episode: jax.Array  # [B] int32 episode counter per stream (the level index)


def stream_init(
    key: jax.Array, env, env_params, num_envs: int, mesh: Mesh | None = None
) -> StreamState:
    """Reset ``num_envs`` streams (split across ``mesh`` if given)."""
    distributed.check_divisible(num_envs, mesh, "num_envs")
    keys = distributed.constrain(jax.random.split(key, num_envs), mesh)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, env_params)
    return distributed.constrain(
        StreamState(obs, state, jnp.zeros(num_envs, jnp.int32)), mesh
    )


def streaming_rollout(
    key: jax.Array,
    params: Any,
    apply_fn: ApplyFn,
    env,
    env_params,
    stream: StreamState,
    horizon: int,
    mesh: Mesh | None = None,
) -> tuple[StreamState, Trajectory]:
    """``horizon`` steps of auto-resetting streams (``env.step``).

    ``next_values`` is the collection-time ``values[t + 1]`` (and V of the stream's
    observation after the last step, from one extra pass); where the env's time
    limit cut an episode (``truncated``) it is V of ``info["final_observation"]``,
    computed only in steps that have such a cut, so the episode bootstraps from its
    real last state. The last step of the batch is marked ``truncated`` where it is
    not an episode end, so returns bootstrap there too. ``level`` counts episodes per stream. With a
    ``mesh`` the streams are split across its devices.
    """
    num = stream.obs.shape[0]
    distributed.check_divisible(num, mesh, "num_envs")
    stream = distributed.constrain(stream, mesh)
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def cut_value(cut, final_obs):
        # V(final observation) where the time limit cut an episode: rare, so the
        # network runs only in steps that have one (under vmap both branches run).
        return jax.lax.cond(
            jnp.any(cut),
            lambda: jnp.where(cut, apply_fn(params, final_obs)[1], 0.0),
            lambda: jnp.zeros(cut.shape, jnp.float32),
        )

    def body(stream, key):
        key_act, key_step = jax.random.split(key)
        action, log_prob, value = _act(key_act, params, apply_fn, stream.obs)
        obs, state, reward, terminated, truncated, info = step(
            jax.random.split(key_step, num), stream.env_state, action, env_params
        )
        cut = truncated & ~terminated
        out = dict(
            observations=stream.obs,
            actions=action,
            rewards=reward,
            log_probs=log_prob,
            values=value,
            cut_values=cut_value(cut, info["final_observation"]),
            terminated=terminated,
            truncated=cut,
            mask=jnp.ones(num, jnp.float32),
            level=stream.episode,
            score=info["score"],
        )
        done = terminated | truncated
        return StreamState(obs, state, stream.episode + done.astype(jnp.int32)), out

    stream, out = jax.lax.scan(body, stream, jax.random.split(key, horizon))
    _, last_value = apply_fn(params, stream.obs)  # one pass, for the batch's end
    next_values = _shift_in(out["values"], last_value)
    cut_values = out.pop("cut_values")
    out["next_values"] = jnp.where(out["truncated"], cut_values, next_values)
    ended = out["terminated"][-1] | out["truncated"][-1]
    out["truncated"] = out["truncated"].at[-1].set(out["truncated"][-1] | ~ended)
    traj = distributed.constrain(Trajectory(**out), mesh, axis=1)
    return distributed.constrain(stream, mesh), traj
