"""A small enumerable episodic MDP whose policy gradient is known exactly.

Three states, two actions, horizon four, stochastic transitions with a crash outcome
that ends the episode early (so masks matter), rewards on every step and a crash
penalty. The policy is a tabular softmax, ``pi(a|s) = softmax(params["logits"][s])``,
with an optional tabular value ``params["value"][s]`` (used as a baseline; it does not
change J).

The objective J(theta) = E_tau[sum_t r_t] is computed by enumerating every trajectory
(every initial state, action and transition outcome; at most 3 * 8^4 = 12288 of them):

    J(theta) = sum_tau p(tau; theta) R(tau),
    log p(tau; theta) = log p0(s_0) + sum_t [log pi(a_t|s_t) + log P(o_t|s_t, a_t)],

so ``exact_gradient = jax.grad(exact_objective)`` is the true policy gradient against
which Monte Carlo estimators are checked. ``sample_batch`` draws the same process with
``lax.scan`` over time and vectorised over trajectories, returning an episodic
``Trajectory``.

The task has a finite horizon: an episode that survives to t = H - 1 ends there with
nothing after it, so that step is marked ``terminated`` (not truncated) and no estimator
bootstraps from it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import policies
from rl_pg.trajectory import Trajectory

Params = dict[str, jax.Array]
Policy = policies.Policy


class EnumerableMDP(NamedTuple):
    """A finite-horizon MDP with S states, A actions and a crash outcome.

    Attributes:
      initial: [S] initial-state distribution p0(s_0).
      transitions: [S, A, S + 1] P(o|s, a); outcomes 0..S-1 are next states, outcome S
        is a crash that ends the episode.
      rewards: [S, A, S + 1] reward r(s, a, o) received at the step.
      horizon: H, the maximum number of steps.
    """

    initial: np.ndarray
    transitions: np.ndarray
    rewards: np.ndarray
    horizon: int

    @property
    def num_states(self) -> int:
        return self.initial.shape[0]

    @property
    def num_actions(self) -> int:
        return self.transitions.shape[1]


def make_mdp(crash_penalty: float = -1.0, horizon: int = 4) -> EnumerableMDP:
    """The default 3-state, 2-action MDP.

    Rewards are mostly positive (a return-scale offset, which is what baselines remove);
    action 1 pays more in state 1 but crashes more often.

    Args:
      crash_penalty: reward added on the crash outcome.
      horizon: H, the number of steps (>= 1).

    Returns:
      An ``EnumerableMDP``.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}.")
    initial = np.array([0.5, 0.3, 0.2])
    # P(s' = 0, 1, 2, crash | s, a)
    transitions = np.array(
        [
            [[0.6, 0.3, 0.0, 0.1], [0.1, 0.5, 0.2, 0.2]],
            [[0.2, 0.2, 0.4, 0.2], [0.0, 0.3, 0.3, 0.4]],
            [[0.3, 0.3, 0.3, 0.1], [0.5, 0.0, 0.2, 0.3]],
        ]
    )
    base = np.array([[1.0, 0.5], [0.2, 2.0], [0.5, 1.0]])
    crash = np.zeros(4)
    crash[-1] = crash_penalty
    rewards = base[:, :, None] + crash[None, None, :]
    return EnumerableMDP(initial, transitions, rewards, horizon)


DEFAULT_MDP = make_mdp()


def tabular_policy(num_states: int, num_actions: int, value: bool = True) -> Policy:
    """A tabular softmax policy on one-hot observations, in the ``Policy`` contract.

    logits = obs @ params["logits"],  value = obs @ params["value"].

    Args:
      num_states: S, the length of the one-hot observation.
      num_actions: A.
      value: whether params hold a value table ``[S]`` (else value is zeros).

    Returns:
      A ``Policy``. ``init`` ignores its key and observation (they are there for the
      contract) and returns the uniform policy (zero logits) with zero values.
    """

    def init(key: jax.Array, obs: jax.Array) -> Params:
        del key, obs
        params = {"logits": jnp.zeros((num_states, num_actions), jnp.float32)}
        if value:
            params["value"] = jnp.zeros((num_states,), jnp.float32)
        return params

    def apply(params: Params, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        obs = obs.astype(jnp.float32)
        logits = obs @ params["logits"]
        if not value:
            return logits, jnp.zeros(obs.shape[:-1], jnp.float32)
        return logits, obs @ params["value"]

    return policies.Policy(init, apply, has_value=value, num_actions=num_actions)


def mdp_policy(mdp: EnumerableMDP = DEFAULT_MDP, value: bool = True) -> Policy:
    """``tabular_policy`` sized for ``mdp``."""
    return tabular_policy(mdp.num_states, mdp.num_actions, value)


class Enumeration(NamedTuple):
    """Every trajectory of an MDP, padded to the horizon (numpy, N trajectories).

    Attributes:
      states: [N, H] int state at each step (0 after the end).
      actions: [N, H] int action at each step (0 after the end).
      mask: [N, H] float 1 on live steps.
      log_prob_env: [N] log p0(s_0) + sum_t log P(o_t|s_t, a_t).
      returns: [N] R(tau) = sum_t r_t.
      rewards: [N, H] r_t (0 after the end).
    """

    states: np.ndarray
    actions: np.ndarray
    mask: np.ndarray
    log_prob_env: np.ndarray
    returns: np.ndarray
    rewards: np.ndarray


def _key(mdp: EnumerableMDP) -> tuple:
    return (
        mdp.initial.tobytes(),
        mdp.transitions.tobytes(),
        mdp.rewards.tobytes(),
        mdp.transitions.shape,
        mdp.horizon,
    )


def _enumerate(mdp: EnumerableMDP) -> Enumeration:
    num_states, horizon = mdp.num_states, mdp.horizon
    # Partial trajectories: (states, actions, log_prob_env, rewards).
    alive = [
        ([s], [], np.log(mdp.initial[s]), [])
        for s in range(num_states)
        if mdp.initial[s] > 0
    ]
    finished = []
    for t in range(horizon):
        next_alive = []
        for states, actions, logp, rew in alive:
            s = states[-1]
            for a in range(mdp.num_actions):
                for o in range(num_states + 1):
                    p = mdp.transitions[s, a, o]
                    if p == 0:
                        continue
                    entry = (
                        states,
                        [*actions, a],
                        logp + np.log(p),
                        [*rew, mdp.rewards[s, a, o]],
                    )
                    if o == num_states or t == horizon - 1:
                        finished.append(entry)
                    else:
                        next_alive.append(([*states, o], *entry[1:]))
        alive = next_alive
    n = len(finished)
    states = np.zeros((n, horizon), np.int32)
    actions = np.zeros((n, horizon), np.int32)
    mask = np.zeros((n, horizon), np.float32)
    rewards = np.zeros((n, horizon), np.float64)
    for i, (s, a, _, r) in enumerate(finished):
        states[i, : len(a)] = s[: len(a)]
        actions[i, : len(a)] = a
        mask[i, : len(a)] = 1.0
        rewards[i, : len(a)] = r
    log_prob_env = np.array([e[2] for e in finished])
    return Enumeration(
        states, actions, mask, log_prob_env, rewards.sum(1), rewards.astype(np.float32)
    )


_ENUMERATIONS: dict[tuple, Enumeration] = {}


def enumerate_trajectories(mdp: EnumerableMDP = DEFAULT_MDP) -> Enumeration:
    """All trajectories of ``mdp`` with their environment log-probabilities and returns.

    Args:
      mdp: the MDP.

    Returns:
      An ``Enumeration`` (numpy arrays; cached per MDP).
    """
    key = _key(mdp)
    if key not in _ENUMERATIONS:
        _ENUMERATIONS[key] = _enumerate(mdp)
    return _ENUMERATIONS[key]


def exact_objective(params: Params, mdp: EnumerableMDP = DEFAULT_MDP) -> jax.Array:
    """J(theta) = sum_tau p(tau; theta) R(tau) by enumeration.

    Args:
      params: tabular policy params; only ``params["logits"]`` [S, A] matters.
      mdp: the MDP.

    Returns:
      [] float32 expected undiscounted return.
    """
    e = enumerate_trajectories(mdp)
    log_pi = jax.nn.log_softmax(params["logits"], axis=-1)
    log_prob_policy = jnp.sum(e.mask * log_pi[e.states, e.actions], axis=-1)
    probs = jnp.exp(log_prob_policy + jnp.asarray(e.log_prob_env, jnp.float32))
    return jnp.sum(probs * jnp.asarray(e.returns, jnp.float32))


def exact_gradient(params: Params, mdp: EnumerableMDP = DEFAULT_MDP) -> Params:
    """grad_theta J(theta), exact (``jax.grad(exact_objective)``); zero for "value"."""
    return jax.grad(exact_objective)(params, mdp)


class _StepCarry(NamedTuple):
    state: jax.Array  # [n] int32 current state
    alive: jax.Array  # [n] bool episode still running
    score: jax.Array  # [n] int32 steps survived without crashing


def _inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """Index k with P(k) = probs[..., k] for u ~ U[0, 1): #{j < K-1 : cdf_j <= u}.

    Outcomes of probability 0 are never returned (their cdf equals the previous one).
    """
    cdf = jnp.cumsum(probs, axis=-1)[..., :-1]
    return jnp.sum(cdf <= u[..., None], axis=-1).astype(jnp.int32)


def sample_batch(
    key: jax.Array,
    params: Params,
    n: int,
    mdp: EnumerableMDP = DEFAULT_MDP,
    *,
    group_size: int = 1,
) -> Trajectory:
    """Samples n episodes under the tabular policy as an episodic ``Trajectory``.

    Columns are grouped as levels x G: the n // G levels each draw an initial state
    s_0 ~ p0 (the "level", stored in ``level``) shared by G consecutive columns, so
    column b belongs to level b // G. With G = 1 every episode is independent.

    Args:
      key: a PRNG key.
      params: tabular policy params (``mdp_policy``).
      n: B, the number of episodes (a multiple of ``group_size``).
      mdp: the MDP.
      group_size: G, episodes per level.

    Returns:
      A ``Trajectory`` with T = H, B = n, one-hot observations [H, n, S]; steps after
      the end are zero padding with mask 0. ``log_probs`` and ``values`` come from
      ``params`` (so importance ratios are 1 at ``params``).
    """
    if group_size < 1 or n < 1 or n % group_size:
        raise ValueError(
            f"n={n} must be a positive multiple of group_size={group_size}."
        )
    policy = mdp_policy(mdp, value="value" in params)
    num_states = mdp.num_states
    transitions = jnp.asarray(mdp.transitions, jnp.float32)
    rewards_table = jnp.asarray(mdp.rewards, jnp.float32)
    horizon = mdp.horizon

    # Uniforms for the levels and for every action and transition, drawn up front
    # with one PRNG call: sampling is by inverse CDF and the scan body holds no PRNG
    # code (threefry dominates compile time here).
    uniforms = jax.random.uniform(key, (2 * horizon + 1, n))
    initial = jnp.asarray(mdp.initial, jnp.float32)
    levels = _inverse_cdf(initial, uniforms[-1, : n // group_size])
    level = jnp.repeat(levels, group_size)
    step_uniforms = uniforms[:-1].reshape(horizon, 2, n)

    def step(carry: _StepCarry, xs):
        t, u = xs
        obs = jax.nn.one_hot(carry.state, num_states)
        logits, value = policy.apply(params, obs)
        action = _inverse_cdf(jax.nn.softmax(logits), u[0])
        outcome = _inverse_cdf(transitions[carry.state, action], u[1])
        crash = outcome == num_states
        next_state = jnp.where(crash, carry.state, outcome)
        _, next_value = policy.apply(params, jax.nn.one_hot(next_state, num_states))
        ended = jnp.logical_or(crash, t == horizon - 1)
        live = carry.alive
        score = carry.score + jnp.logical_and(live, ~crash).astype(jnp.int32)
        f = live.astype(jnp.float32)
        out = Trajectory(
            observations=obs * f[:, None],
            actions=jnp.where(live, action, 0),
            rewards=rewards_table[carry.state, action, outcome] * f,
            log_probs=policies.log_prob(logits, action) * f,
            values=value * f,
            next_values=jnp.where(crash, 0.0, next_value) * f,
            terminated=jnp.logical_and(live, ended),
            truncated=jnp.zeros_like(live),
            mask=f,
            level=level,
            score=score,
        )
        carry = _StepCarry(next_state, jnp.logical_and(live, ~ended), score)
        return carry, out

    init = _StepCarry(level, jnp.ones((n,), bool), jnp.zeros((n,), jnp.int32))
    _, batch = jax.lax.scan(step, init, (jnp.arange(horizon), step_uniforms))
    return batch


def sample_batches(
    key: jax.Array,
    params: Params,
    num_batches: int,
    n: int,
    mdp: EnumerableMDP = DEFAULT_MDP,
    *,
    group_size: int = 1,
) -> Trajectory:
    """M independent batches of n episodes, stacked on a leading axis.

    Draws one batch of M * n episodes and splits its columns into M consecutive blocks
    (groups stay whole because n is a multiple of G), which compiles faster than
    vmapping ``sample_batch`` over keys.

    Args:
      key: a PRNG key.
      params: tabular policy params.
      num_batches: M.
      n: B, episodes per batch (a multiple of ``group_size``).
      mdp: the MDP.
      group_size: G, episodes per level.

    Returns:
      A ``Trajectory`` whose fields are [M, T, n, ...].
    """
    if group_size < 1 or n < 1 or n % group_size:
        raise ValueError(
            f"n={n} must be a positive multiple of group_size={group_size}."
        )
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be at least 1.")
    big = sample_batch(key, params, num_batches * n, mdp, group_size=group_size)

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], num_batches, n, *x.shape[2:]))
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, big)


def enumerated_batch(
    params: Params, mdp: EnumerableMDP = DEFAULT_MDP
) -> tuple[Trajectory, jax.Array, np.ndarray]:
    """Every trajectory of ``mdp`` as one episodic batch, with its probability.

    Args:
      params: tabular policy params (``mdp_policy``).
      mdp: the MDP.

    Returns:
      ``(batch, probs, initial_states)``: a ``Trajectory`` [H, N] laid out like
      :func:`sample_batch`'s (behaviour log-probs and values from ``params``;
      ``score`` is 0),
      p(tau; theta) [N] (summing to 1) and s_0 [N].
    """
    e = enumerate_trajectories(mdp)
    policy = mdp_policy(mdp, value="value" in params)
    mask = jnp.asarray(e.mask.T)  # [H, N]
    states = jnp.asarray(e.states.T)
    actions = jnp.asarray(e.actions.T)
    obs = jax.nn.one_hot(states, mdp.num_states) * mask[..., None]
    logits, values = policy.apply(params, obs)
    log_probs = policies.log_prob(logits, actions) * mask
    live = mask > 0
    last = jnp.arange(mdp.horizon)[:, None] == (jnp.sum(mask, 0) - 1)[None, :]
    next_values = jnp.concatenate([values[1:], jnp.zeros_like(values[:1])]) * mask
    probs = jnp.exp(jnp.sum(log_probs, 0) + jnp.asarray(e.log_prob_env, jnp.float32))
    batch = Trajectory(
        observations=obs,
        actions=jnp.where(live, actions, 0),
        rewards=jnp.asarray(e.rewards.T),
        log_probs=log_probs,
        values=values * mask,
        next_values=jnp.where(last, 0.0, next_values),
        terminated=live & last,
        truncated=jnp.zeros_like(live),
        mask=mask,
        level=jnp.broadcast_to(states[0], mask.shape),
        score=jnp.zeros(mask.shape, jnp.int32),
    )
    return batch, probs, e.states[:, 0]
