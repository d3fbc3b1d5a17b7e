"""Returns and advantages of one time-major sequence.

As in rlax, every function takes one unbatched sequence of length T (time index t is the
step at which the action a_t was taken and the reward r_t received) and leaves batching
to ``jax.vmap``; the ``batch_*`` wrappers map over axis 1 of ``[T, B]`` arrays, the
layout of ``rl_pg.trajectory.Trajectory``. Backward recursions are a reverse
``lax.scan``.

Conventions (see ``rl_pg.trajectory``):

* ``mask`` (float, 1 = live step) zeroes rewards of padding steps.
* ``done_t = terminated_t | truncated_t`` ends an episode at step t; nothing flows
  across it, so several episodes can share one column (streaming batches).
* A terminated step does not bootstrap; a truncated step bootstraps from
  ``next_values_t`` = V(s_{t+1}) of its true next state. The end of the sequence is a
  cut as well: a step t = T - 1 that is not terminated bootstraps from
  ``next_values[T-1]``. Elsewhere V(s_{t+1}) = ``values[t+1]``, so ``next_values`` is
  read only at truncated steps and at t = T - 1.

Padding (mask 0, or anything after a done step) never reaches earlier steps; recursions
select with ``jnp.where`` rather than multiplying by 0, so even non-finite padding stays
put. Values returned at padding steps are meaningless.
"""

import numbers

import chex
import jax
import jax.numpy as jnp


def _as_float(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_unit(**values: float) -> None:
    """A Python number given as gamma or lam lies in [0, 1] (arrays: unchecked)."""
    for name, v in values.items():
        if isinstance(v, numbers.Real) and not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")


def _done(terminated: jax.Array, truncated: jax.Array) -> jax.Array:
    return jnp.logical_or(terminated, truncated)


def _bootstrap_values(
    values: jax.Array, next_values: jax.Array, truncated: jax.Array
) -> jax.Array:
    """V(s_{t+1}) per step: ``next_values`` where truncated or t = T - 1, else
    ``values[t + 1]``."""
    shifted = jnp.concatenate([values[1:], next_values[-1:]])
    return jnp.where(truncated, next_values, shifted)


def reward_to_go(
    rewards: jax.Array, mask: jax.Array, done: jax.Array | None = None
) -> jax.Array:
    """Undiscounted reward-to-go G_t = sum_{t' >= t} r_{t'} within the episode.

    G_t = m_t r_t + (1 - done_t) G_{t+1},   G_T = 0.

    No bootstrap: this is the Monte Carlo return of the rest of the episode as observed.
    Used by the "reward-to-go" policy gradient (OpenAI Spinning Up; Williams 1992).

    Args:
      rewards: [T] rewards r_t.
      mask: [T] 1 for live steps, 0 for padding (rewards there are ignored).
      done: optional [T] bool episode ends (``terminated | truncated``); None means the
        whole sequence is one episode.

    Returns:
      [T] float32 reward-to-go.
    """
    chex.assert_rank([rewards, mask], 1)
    chex.assert_equal_shape([rewards, mask])
    r = jnp.where(mask > 0, _as_float(rewards), 0.0)
    if done is None:
        done = jnp.zeros(r.shape, bool)
    chex.assert_equal_shape([rewards, done])

    def body(g_next, xs):
        r_t, done_t = xs
        g_t = r_t + jnp.where(done_t, 0.0, g_next)
        return g_t, g_t

    _, g = jax.lax.scan(body, jnp.zeros((), jnp.float32), (r, done), reverse=True)
    return g


def total_return(
    rewards: jax.Array, mask: jax.Array, done: jax.Array | None = None
) -> jax.Array:
    """Total return R(tau) = sum_t r_t of the episode each step belongs to.

    The result is per step (R broadcast over the episode's steps), so that it has the
    same [T] shape as every other return and an estimator can weight
    ``log pi(a_t|s_t)`` by it step by step, as in REINFORCE (Williams 1992):
    grad J = E[sum_t grad log pi(a_t|s_t) R(tau)].

    R_t = G_t + P_t with G the reward-to-go (``reward_to_go``) and P_t the reward
    collected before t in the same episode (a forward scan reset after done).

    Args:
      rewards: [T] rewards r_t.
      mask: [T] 1 for live steps, 0 for padding (rewards there are ignored).
      done: optional [T] bool episode ends; None means the whole sequence is one
        episode, so every entry equals sum_t m_t r_t.

    Returns:
      [T] float32; entry t is the total return of the episode containing step t.
    """
    chex.assert_rank([rewards, mask], 1)
    chex.assert_equal_shape([rewards, mask])
    r = jnp.where(mask > 0, _as_float(rewards), 0.0)
    if done is None:
        return jnp.full(r.shape, jnp.sum(r), jnp.float32)
    chex.assert_equal_shape([rewards, done])
    future = reward_to_go(rewards, mask, done)

    def body(past_t, xs):
        r_t, done_t = xs
        past_next = jnp.where(done_t, 0.0, past_t + r_t)
        return past_next, past_t

    _, past = jax.lax.scan(body, jnp.zeros((), jnp.float32), (r, done))
    return future + past


def discounted_returns(
    rewards: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    next_values: jax.Array,
    gamma: float,
) -> jax.Array:
    """Discounted returns with bootstrapping only where the episode was cut.

    G_t = r_t                                   if terminated_t
    G_t = r_t + gamma * V(s_{t+1})              if truncated_t or t = T - 1
    G_t = r_t + gamma * G_{t+1}                 otherwise

    with V(s_{t+1}) = ``next_values_t``. (Sutton & Barto 2018, sec. 3.3; rlax
    ``discounted_returns`` with discount_t = gamma (1 - terminated_t).)

    Args:
      rewards: [T] rewards r_t.
      terminated: [T] bool, episode ended at t with nothing after (no bootstrap).
      truncated: [T] bool, episode cut at t while alive (bootstrap).
      next_values: [T] V(s_{t+1}) of the true next state; read at truncated steps and at
        t = T - 1 only.
      gamma: discount in [0, 1].

    Returns:
      [T] float32 discounted returns.
    """
    chex.assert_rank([rewards, terminated, truncated, next_values], 1)
    chex.assert_equal_shape([rewards, terminated, truncated, next_values])
    _check_unit(gamma=gamma)
    r = _as_float(rewards)
    next_values = _as_float(next_values)

    def body(g_next, xs):
        r_t, term_t, trunc_t, nv_t = xs
        future = jnp.where(trunc_t, nv_t, g_next)
        g_t = r_t + jnp.where(term_t, 0.0, gamma * future)
        return g_t, g_t

    # The carry entering t = T - 1 is next_values[T - 1]: the sequence end is a cut.
    last = next_values[-1] if r.shape[0] else jnp.zeros((), jnp.float32)  # T = 0
    _, g = jax.lax.scan(
        body, last, (r, terminated, truncated, next_values), reverse=True
    )
    return g


def gae(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float,
    lam: float,
) -> jax.Array:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    delta_t = r_t + gamma (1 - terminated_t) V(s_{t+1}) - V(s_t)
    A_t     = delta_t + gamma lam (1 - done_t) A_{t+1},   A_T = 0,

    with done_t = terminated_t | truncated_t, V(s_t) = ``values_t`` and V(s_{t+1}) =
    ``next_values_t`` where truncated or t = T - 1, ``values_{t+1}`` elsewhere. So
    episodes in a streaming batch do not leak into each other, truncated episodes
    bootstrap from V and terminated ones do not. With lam = 1, A_t =
    ``discounted_returns`` - V(s_t); with lam = 0, A_t = delta_t.

    Args:
      rewards: [T] rewards r_t.
      values: [T] V(s_t).
      next_values: [T] V(s_{t+1}) of the true next state (read where truncated and at
        t = T - 1).
      terminated: [T] bool, episode ended at t with nothing after.
      truncated: [T] bool, episode cut at t while alive.
      gamma: discount in [0, 1].
      lam: GAE lambda in [0, 1].

    Returns:
      [T] float32 advantages A_t.
    """
    chex.assert_rank([rewards, values, next_values, terminated, truncated], 1)
    chex.assert_equal_shape([rewards, values, next_values, terminated, truncated])
    _check_unit(gamma=gamma, lam=lam)
    r = _as_float(rewards)
    values = _as_float(values)
    v_next = _bootstrap_values(values, _as_float(next_values), truncated)
    delta = r + jnp.where(terminated, 0.0, gamma * v_next) - values
    done = _done(terminated, truncated)

    def body(a_next, xs):
        delta_t, done_t = xs
        a_t = delta_t + jnp.where(done_t, 0.0, gamma * lam * a_next)
        return a_t, a_t

    _, advantages = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (delta, done), reverse=True
    )
    return advantages


def lambda_returns(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float,
    lam: float,
) -> jax.Array:
    """TD(lambda) targets G^lambda_t = A^GAE_t + V(s_t), the usual critic target.

    Args and conventions as in ``gae``.

    Returns:
      [T] float32 lambda-returns.
    """
    advantages = gae(rewards, values, next_values, terminated, truncated, gamma, lam)
    return advantages + _as_float(values)


# Batched over axis 1 of [T, B] arrays; scalars (gamma, lam) are shared.
def batch_reward_to_go(
    rewards: jax.Array, mask: jax.Array, done: jax.Array | None = None
) -> jax.Array:
    """``reward_to_go`` on [T, B] arrays -> [T, B]."""
    return jax.vmap(reward_to_go, in_axes=1, out_axes=1)(rewards, mask, done)


def batch_total_return(
    rewards: jax.Array, mask: jax.Array, done: jax.Array | None = None
) -> jax.Array:
    """``total_return`` on [T, B] arrays -> [T, B]."""
    return jax.vmap(total_return, in_axes=1, out_axes=1)(rewards, mask, done)


def batch_discounted_returns(
    rewards: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    next_values: jax.Array,
    gamma: float,
) -> jax.Array:
    """``discounted_returns`` on [T, B] arrays -> [T, B]."""
    fn = jax.vmap(discounted_returns, in_axes=(1, 1, 1, 1, None), out_axes=1)
    return fn(rewards, terminated, truncated, next_values, gamma)


def batch_gae(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float,
    lam: float,
) -> jax.Array:
    """``gae`` on [T, B] arrays -> [T, B]."""
    fn = jax.vmap(gae, in_axes=(1, 1, 1, 1, 1, None, None), out_axes=1)
    return fn(rewards, values, next_values, terminated, truncated, gamma, lam)


def batch_lambda_returns(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float,
    lam: float,
) -> jax.Array:
    """``lambda_returns`` on [T, B] arrays -> [T, B]."""
    fn = jax.vmap(lambda_returns, in_axes=(1, 1, 1, 1, 1, None, None), out_axes=1)
    return fn(rewards, values, next_values, terminated, truncated, gamma, lam)


def trajectory_gae(traj, gamma: float, lam: float) -> jax.Array:
    """``batch_gae`` of a ``Trajectory`` [T, B] from its collection-time values."""
    return batch_gae(
        traj.rewards,
        traj.values,
        traj.next_values,
        traj.terminated,
        traj.truncated,
        gamma,
        lam,
    )
