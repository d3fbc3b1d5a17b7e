"""The time-major batch of rollouts that every estimator consumes.

Two layouts share one container:

* **Episodic** (one episode per column ``b``): ``mask`` is 1 up to and including the
  step where the episode ended (``terminated`` or ``truncated`` set there) and 0
  afterwards. What lies under ``mask == 0`` is padding: any finite values, ignored by
  every function in ``rl_pg.returns`` and ``rl_pg.estimators``. Episodes still alive at
  ``t = T - 1`` are cut by the batch; set ``truncated[T - 1]`` for them (returns and GAE
  treat the end of the sequence as a cut either way).
* **Streaming** (several episodes per column, as in PPO): ``mask`` is all ones and
  consecutive episodes are separated by ``terminated | truncated``.

Bootstrapping convention (shared by ``rl_pg.returns``): a step with ``terminated`` set
has nothing after it (no bootstrap); a step with ``truncated`` set was cut while the
episode would have gone on, so its return bootstraps from ``next_values``.
``next_values`` is read only at truncated steps and at the last step ``t = T - 1``;
everywhere else the next state's value is ``values[t + 1]``.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class Trajectory(NamedTuple):
    """Time-major batch of rollouts; every field is [T, B, ...].

    Attributes:
      observations: [T, B, *obs_shape] observation before the action at t.
      actions: [T, B] int32 action taken at t.
      rewards: [T, B] float32 reward received for the action at t.
      log_probs: [T, B] float32 log pi_behaviour(a_t|s_t) at collection time (the
        denominator of PPO / GRPO importance ratios).
      values: [T, B] float32 V(s_t) at collection time (zeros without a critic).
      next_values: [T, B] float32 V(s_{t+1}) of the true next state (the final
        observation where an episode ended; zeros without a critic). Read only where
        ``truncated`` is set and at t = T - 1.
      terminated: [T, B] bool, the episode ended at step t and nothing follows (a crash,
        or the end of a finite-horizon task): no bootstrap.
      truncated: [T, B] bool, the episode was cut at step t while alive (a time limit or
        the end of the batch): bootstrap with ``next_values``.
      mask: [T, B] float32, 1 where step t belongs to a live episode segment (0 after
      the
        episode ended in episodic rollouts).
      level: [T, B] int32 level (group) index of the episode the step belongs to.
      score: [T, B] int32 pipes passed so far in the episode after step t.
    """

    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    log_probs: jax.Array
    values: jax.Array
    next_values: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    mask: jax.Array
    level: jax.Array
    score: jax.Array


def assert_trajectory(batch: Trajectory) -> None:
    """Checks ranks, shapes and dtypes of a ``Trajectory`` (at trace time).

    Args:
      batch: a time-major batch; every field [T, B, ...].

    Raises:
      AssertionError: if a field has the wrong rank, leading shape or dtype kind.
    """
    per_step = [
        batch.actions,
        batch.rewards,
        batch.log_probs,
        batch.values,
        batch.next_values,
        batch.terminated,
        batch.truncated,
        batch.mask,
        batch.level,
        batch.score,
    ]
    chex.assert_rank(per_step, 2)
    chex.assert_equal_shape(per_step)
    chex.assert_equal_shape_prefix([batch.observations, batch.actions], 2)
    chex.assert_type([batch.actions, batch.level, batch.score], int)
    chex.assert_type(
        [batch.rewards, batch.log_probs, batch.values, batch.next_values, batch.mask],
        float,
    )
    chex.assert_type([batch.terminated, batch.truncated], bool)


def done(batch: Trajectory) -> jax.Array:
    """[T, B] bool: the episode ended at step t (``terminated | truncated``)."""
    return jnp.logical_or(batch.terminated, batch.truncated)
