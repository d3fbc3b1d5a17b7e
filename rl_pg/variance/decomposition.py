"""The variance of a policy-gradient estimator decomposed into state, action and rest.

Tucker, Bhupatiraju, Gu, Turner, Ghahramani, Levine 2018 ("The Mirage of
Action-Dependent Baselines in Reinforcement Learning", ICML, section 4): for the
per-step term

    y = A_hat(s, a, tau) grad_theta log pi(a|s)   in R^P,

with s drawn from the on-policy state distribution d, a ~ pi(.|s) and the rest of
the trajectory tau ~ p(.|s, a), the law of total variance (traces for vectors) gives

    tr Var(y) = tr Var_s(E[y|s])              state part
              + E_s[tr Var_a(E[y|s, a])]      action part
              + E_{s,a}[tr Var_tau(y|s, a)]   trajectory part.

**The state distribution.** A "state" is a point of an on-policy episode: the env
state pytree at step t together with t and the reward R_<t collected before it (the
future given (env state, t) does not depend on anything else, and REINFORCE's
weight needs R_<t). d is the law of the point at a step drawn *uniformly among the
live steps* t = 0..L-1 of an on-policy episode (L = its length, at most ``horizon``
counted from the episode start). The action and the continuation are then drawn
afresh: a ~ pi(.|s), then the policy until the episode ends or t reaches
``horizon``. The joint law of (s, a, tau) is d(s) pi(a|s) p(tau|s, a); note that
this is *not* the law of (s_t, a_t, rest) of a uniformly chosen step of one episode
(that one weighs long continuations less), and every number here, estimated or
exact, is about the former.

**Nested sampling** (REFERENCE.md s. 12). States i = 1..I (one per on-policy episode,
picked by reservoir sampling during the rollout), actions j = 1..K at each, K'
continuations k = 1..K' of each (s_i, a_ij) from a copy of the env state. The
method-of-moments estimates of a nested random-effects ANOVA (each unbiased):

    trajectory = mean_{i,j} tr S_k(y_ij.)              (sample variance over k, ddof 1)
    action     = mean_i tr S_j(ybar_ij.) - trajectory / K'
    state      = tr S_i(ybar_i..) - action / K - trajectory / (K K')

**The separately measured total.** Each state also gets one more action (j = K + 1,
independent of the K above) with its own K' continuations; its first continuation
gives one fresh y per state, and ``total`` is the sample trace variance of those I
i.i.d. draws. ``sum`` = state + action + trajectory estimates the same quantity by
another route, so "the parts sum to the total within intervals" is a real check
(``sum_minus_total`` is the paired difference with its own interval).
``total_pooled`` is the plain sample variance of all I K K' nested y's treated as
i.i.d. (biased low by their correlation within a state; for reference only).

**Memory.** y_ijk = A_ijk g_ij with g_ij = grad log pi(a_ij|s_i), so only g [I, K+1, P]
is ever held: tr S_k(y_ij.) = ||g_ij||^2 S_k(A_ij.), ybar_ij. = Abar_ij g_ij, and the
state-level terms use the Gram matrix of the centred ybar_i.. [I, P].

**Intervals.** States are the independent top-level units: delete-one jackknife over
i (Efron & Stein 1981) of every component, and a normal 95% interval theta +- 1.96
se (linear scale: method-of-moments components can be negative).

**Estimators** (A_hat of branch (i, j, k); G = the undiscounted reward-to-go from t,
V = the policy's critic divided by ``value_scale``, i.e. in raw reward units):

* ``reinforce``: R_<t + G (the episode's total return; Williams 1992);
* ``reward_to_go``: G;
* ``value_baseline``: G - V(s_i);
* ``gae``: GAE(gamma, lam) at t on the continuation with the collection-time
  critic, bootstrapped only where the horizon cuts an episode (Schulman et al. 2016);
* ``oracle_value_baseline``: G - V(s_i) and ``oracle_advantage``: Q(s_i, a_ij) -
  V(s_i), with the *true* V and Q (an ideal critic), estimated without bias from
  the branches (see below).

Exact facts: a baseline b(s) changes only the action part (E[y|s] and Var(y|s, a)
do not see it), so ``value_baseline`` and the ideal value baseline share the state
and trajectory parts of ``reward_to_go`` (the estimates share the trajectory part
exactly). The ideal advantage y = (Q - V) g has no trajectory part and the action
part of the ideal value baseline, but it is *not* free of a state part:
E[(Q - V) g | s] = sum_a pi(a|s) Q(s, a) grad log pi(a|s) is the policy gradient
at s, so its state part is that of ``reward_to_go`` too. The oracle rows are built
on these identities: state part = ``value_baseline``'s estimate, trajectory part =
``reward_to_go``'s (value baseline) or 0 (advantage), action part = reward-to-go's
minus an unbiased U-statistic estimate of E_s E_a[(2 Q V - V^2) ||g||^2] (plugging
in V_hat = mean of the branches would include the sample itself and bias the rows
by O(1/K)), and the separately measured total from the fresh draw corrected the
same way (:func:`_oracle_terms`). So the oracle rows show how much variance a
perfect critic leaves, beside the learned one's ``value_baseline`` and ``gae``.

:func:`decompose` runs this on Flappy Bird, :func:`decompose_enumerable` the same
estimator on the MDP of :mod:`rl_pg.enumerable`, and :func:`decompose_exact` gives
that MDP's exact components. :func:`plot_decomposition` draws the rows.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rl_pg import enumerable
from rl_pg import estimators as estimators_lib
from rl_pg import returns as returns_lib

ORACLES = ("oracle_value_baseline", "oracle_advantage")  # ideal critics, not estimators
# the registry's estimators whose per-step advantage the branches give (below)
_STEP_ADVANTAGES = ("reinforce", "reward_to_go", "value_baseline", "gae")


def decomposes(spec: estimators_lib.EstimatorSpec) -> bool:
    """Whether the decomposition covers a registered estimator: a per-step term
    A_hat_t grad log pi(a_t|s_t) whose A_hat depends on its own column alone
    (``per_trajectory``, not ``trajectory_level``: no baseline from other
    trajectories), declared as per-step weights, and given by the branches."""
    return (
        spec.per_trajectory
        and not spec.trajectory_level
        and spec.weights is not None
        and spec.name in _STEP_ADVANTAGES
    )


def decomposed_estimators() -> tuple[str, ...]:
    """The rows' estimators: the registry's that :func:`decomposes` (registry
    order), then the ideal critics :data:`ORACLES`."""
    found = tuple(n for n, s in estimators_lib.REGISTRY.items() if decomposes(s))
    missing = {"reward_to_go", "value_baseline"} - set(found)
    if missing:  # the oracle rows are built from these two
        raise ValueError(f"the decomposition needs registered {sorted(missing)}")
    return found + ORACLES


ESTIMATORS = decomposed_estimators()
# rows that read the policy's learned critic: left out for a policy without one
LEARNED_CRITIC = tuple(
    n
    for n in ESTIMATORS
    if n in estimators_lib.REGISTRY and estimators_lib.REGISTRY[n].needs_critic
)
COMPONENTS = ("state", "action", "trajectory", "total")
CHECKS = ("sum", "sum_minus_total", "total_pooled")
_Z95 = 1.959963984540054

ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


# ------------------------------------------------------------------ sampling


class _Point(NamedTuple):
    """A sampled state: where an on-policy episode was at a uniform live step."""

    obs: jax.Array  # [I, *obs_shape]
    env_state: Any  # env state pytree, leaves [I, ...]
    t: jax.Array  # [I] int32 step index in the episode
    past: jax.Array  # [I] float32 reward collected before t


class _Walk(NamedTuple):
    obs: jax.Array
    env_state: Any
    alive: jax.Array  # [I] bool
    past: jax.Array  # [I] reward so far
    kept: _Point


class _Branch(NamedTuple):
    obs: jax.Array
    env_state: Any
    alive: jax.Array  # [B] bool
    t: jax.Array  # [B] int32 step index in the episode


class _Step(NamedTuple):
    rewards: jax.Array
    values: jax.Array
    next_values: jax.Array
    terminated: jax.Array
    truncated: jax.Array


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    """Per-row ``where`` over pytrees whose leaves lead with pred's axis."""

    def pick(a, b):
        return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def _sample_states(key, params, apply_fn, env, env_params, num_states, horizon):
    """I on-policy episodes; keep one uniformly random live step of each.

    Reservoir sampling: the n-th live step (n = t + 1) replaces the kept point with
    probability 1/n, which leaves each of the L live steps kept with probability
    1/L, in one pass and O(1) memory.
    """
    key_reset, key_walk, key_u = jax.random.split(key, 3)
    obs, env_state = jax.vmap(env.reset_env, in_axes=(0, None))(
        jax.random.split(key_reset, num_states), env_params
    )
    step = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))
    zeros = jnp.zeros(num_states, jnp.float32)
    start = _Point(obs, env_state, jnp.zeros(num_states, jnp.int32), zeros)
    init = _Walk(obs, env_state, jnp.ones(num_states, bool), zeros, start)

    def body(carry: _Walk, xs):
        t, key, u = xs
        key_act, key_env = jax.random.split(key)
        here = _Point(carry.obs, carry.env_state, jnp.full_like(start.t, t), carry.past)
        keep = carry.alive & (u * (t + 1) < 1.0)
        kept = _select(keep, here, carry.kept)
        logits, _ = apply_fn(params, carry.obs)
        action = jax.random.categorical(key_act, logits).astype(jnp.int32)
        obs, env_state, reward, terminated, _ = step(
            jax.random.split(key_env, num_states), carry.env_state, action, env_params
        )
        past = carry.past + jnp.where(carry.alive, reward, 0.0)
        return _Walk(obs, env_state, carry.alive & ~terminated, past, kept), None

    xs = (
        jnp.arange(horizon),
        jax.random.split(key_walk, horizon),
        jax.random.uniform(key_u, (horizon, num_states)),
    )
    walk, _ = jax.lax.scan(body, init, xs)
    return walk.kept


def _continue(
    key,
    params,
    apply_fn,
    env,
    env_params,
    point,
    first_action,
    horizon,
    value_scale,
    horizon_terminates,
):
    """Step each branch with its first action, then follow the policy.

    Returns ``_Step`` [horizon, B] (mask = alive, folded into rewards and flags); the
    branch ends on termination or when the episode's step index reaches horizon - 1
    (``terminated`` there if ``horizon_terminates`` -- the enumerable MDP's finite
    horizon -- else ``truncated``, bootstrapping GAE).
    """
    num = first_action.shape[0]
    step = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))
    init = _Branch(point.obs, point.env_state, jnp.ones(num, bool), point.t)

    def body(carry: _Branch, xs):
        n, key = xs
        key_act, key_env = jax.random.split(key)
        logits, value = apply_fn(params, carry.obs)
        sampled = jax.random.categorical(key_act, logits).astype(jnp.int32)
        action = jnp.where(n == 0, first_action, sampled)
        obs, env_state, reward, term, _ = step(
            jax.random.split(key_env, num), carry.env_state, action, env_params
        )
        _, next_value = apply_fn(params, obs)
        live = carry.alive
        at_horizon = carry.t >= horizon - 1
        terminated = live & (term | (at_horizon & horizon_terminates))
        truncated = live & at_horizon & ~terminated
        out = _Step(
            rewards=jnp.where(live, reward, 0.0),
            values=value / value_scale,
            next_values=next_value / value_scale,
            terminated=terminated,
            truncated=truncated,
        )
        alive = live & ~term & ~at_horizon
        return _Branch(obs, env_state, alive, carry.t + 1), out

    keys = jax.random.split(key, horizon)
    _, out = jax.lax.scan(body, init, (jnp.arange(horizon), keys))
    return out


def _score_jacobian(params, apply_fn, obs):
    """grad_theta log pi(a|obs_i) for every action: [I, A, P] (flattened params)."""
    flat, unravel = ravel_pytree(params)

    def log_pi(flat_params, o):
        logits, _ = apply_fn(unravel(flat_params), o[None])
        return jax.nn.log_softmax(logits[0])

    return jax.vmap(jax.jacrev(log_pi), in_axes=(None, 0))(flat, obs)


class _Moments(NamedTuple):
    """Per-state pieces from which every component is an additive function."""

    traj: jax.Array  # [I] mean_j ||g_ij||^2 S_k(A_ij.)
    action: jax.Array  # [I] tr S_j(ybar_ij.)
    pooled: jax.Array  # [I] sum_jk ||y_ijk - c||^2, c = mean of all y
    gram: jax.Array  # [I, I] Gram of ybar_i.. - mean_i ybar_i..
    gram_fresh: jax.Array  # [I, I] Gram of the centred fresh draws


def _moments(adv: jax.Array, g: jax.Array) -> _Moments:
    """Moments of y = adv * g for one estimator.

    Args:
      adv: [I, K+1, K'] A_hat per branch; j = K is the fresh action.
      g: [I, K+1, P] grad log pi(a_ij|s_i).
    """
    hp = jax.lax.Precision.HIGHEST
    k = adv.shape[1] - 1
    a, gn = adv[:, :k], g[:, :k]
    abar = a.mean(-1)  # [I, K]
    gg = jnp.sum(gn * gn, -1)  # [I, K]
    traj = jnp.mean(gg * a.var(-1, ddof=1), -1)
    ybar_ij = abar[..., None] * gn  # [I, K, P]
    m = ybar_ij.mean(1)  # [I, P]
    action = jnp.sum((ybar_ij - m[:, None]) ** 2, (1, 2)) / (k - 1)
    c = m.mean(0)
    mc = m - c
    gram = jnp.matmul(mc, mc.T, precision=hp)
    gc = jnp.einsum("ijp,p->ij", gn, c, precision=hp)
    num_k = a.shape[-1]
    pooled = (
        jnp.sum(gg * jnp.sum(a * a, -1), -1)
        - 2.0 * jnp.sum(a.sum(-1) * gc, -1)
        + k * num_k * jnp.sum(c * c)
    )
    fresh = adv[:, k, :1] * g[:, k]  # [I, P]
    fresh = fresh - fresh.mean(0)
    gram_fresh = jnp.matmul(fresh, fresh.T, precision=hp)
    return _Moments(traj, action, pooled, gram, gram_fresh)


def _branch_advantages(
    key,
    params,
    apply_fn,
    env,
    env_params,
    *,
    num_states,
    num_actions,
    num_continuations,
    horizon,
    gamma,
    lam,
    value_scale,
    horizon_terminates,
):
    """The nested sample: A_hat per estimator [I, K+1, K'] and g [I, K+1, P]."""
    i, k1, kp = num_states, num_actions + 1, num_continuations
    key_states, key_actions, key_cont = jax.random.split(key, 3)
    point = _sample_states(
        key_states, params, apply_fn, env, env_params, num_states, horizon
    )
    logits, value = apply_fn(params, point.obs)
    value = value / value_scale
    actions = jax.random.categorical(key_actions, logits[:, None], shape=(i, k1))
    actions = actions.astype(jnp.int32)  # j = K: the fresh action
    jac = _score_jacobian(params, apply_fn, point.obs)  # [I, A, P]
    g = jnp.take_along_axis(jac, actions[..., None], axis=1)  # [I, K+1, P]

    copies = jax.tree.map(lambda x: jnp.repeat(x, k1 * kp, axis=0), point)
    steps = _continue(
        key_cont,
        params,
        apply_fn,
        env,
        env_params,
        copies,
        jnp.repeat(actions.reshape(-1), kp),
        horizon,
        value_scale,
        horizon_terminates,
    )
    to_go = steps.rewards.sum(0).reshape(i, k1, kp)
    adv_gae = returns_lib.batch_gae(
        steps.rewards,
        steps.values,
        steps.next_values,
        steps.terminated,
        steps.truncated,
        gamma,
        lam,
    )[0].reshape(i, k1, kp)
    adv = _step_advantages(
        point.past[:, None, None], to_go, value[:, None, None], adv_gae
    )
    probs = jax.nn.softmax(logits)
    mean_sq_score = jnp.sum(probs * jnp.sum(jac * jac, -1), -1)  # E_a ||g(s, a)||^2
    return adv, g, _oracle_terms(to_go, g, mean_sq_score)


def _step_advantages(past, to_go, value, gae) -> dict:
    """A_hat of each of :func:`decomposed_estimators` (the oracles aside) from a
    branch's past reward R_<t, reward-to-go G, critic V(s) and GAE."""
    adv = {
        "reinforce": past + to_go,
        "reward_to_go": to_go,
        "value_baseline": to_go - value,
        "gae": gae,
    }
    names = decomposed_estimators()
    return {name: a for name, a in adv.items() if name in names}


class _Oracle(NamedTuple):
    """Per-state corrections from reward-to-go to the ideal critic (see
    :func:`_oracle_terms`)."""

    action: jax.Array  # [I] subtracted from reward-to-go's action part
    total_value: jax.Array  # [I] added to its total: oracle value baseline
    total_advantage: jax.Array  # [I] added to its total: oracle advantage


def _oracle_terms(to_go: jax.Array, g: jax.Array, mean_sq_score: jax.Array):
    """Unbiased per-state pieces of the ideal critic's decomposition.

    With the true V(s) and Q(s, a), y_V = (G - V) g and y_A = (Q - V) g have the
    state part of reward-to-go (E[g|s] = 0), y_V its trajectory part, y_A none, and
    both the action part

        E_s Var_a((Q - V) g) = action(G g) - E_s E_a[(2 Q V - V^2) ||g||^2].

    Given s, Gbar_ij = mean_k G_ijk is unbiased for Q(s, a_ij) and independent over j,
    so U-statistics over distinct actions are unbiased: V^2 ~ U2 = sum_{j != j'}
    Gbar_ij Gbar_ij' / (K (K-1)), E_a[Q ||g||^2] V ~ U1 = sum_{j != j'} Gbar_ij
    ||g_ij||^2 Gbar_ij' / (K (K-1)), and E_a ||g||^2 = sum_a pi(a|s) ||g(s, a)||^2 is
    exact. The fresh draw (action f, continuations G_f1..G_fK', independent of the
    nested ones given s) gives the totals: E||y_V||^2 - E||G g||^2 = E[||g||^2 (V^2 -
    2 G V)] and E||y_A||^2 - E||G g||^2 = E[||g||^2 (Q^2 - 2 Q V + V^2 - G^2)], with
    V ~ mean_j Gbar_ij, V^2 ~ U2 and Q(s, f)^2 ~ sum_{k != k'} G_fk G_fk' / (K'(K'-1)).
    """
    k, kp = to_go.shape[1] - 1, to_go.shape[2]
    gbar = to_go[:, :k].mean(-1)  # [I, K]
    gg = jnp.sum(g * g, -1)  # [I, K+1]
    total = gbar.sum(-1)
    pairs = k * (k - 1)
    u2 = (total**2 - jnp.sum(gbar**2, -1)) / pairs
    u1 = jnp.sum(gbar * gg[:, :k] * (total[:, None] - gbar), -1) / pairs
    v_hat = total / k
    fresh = to_go[:, k]  # [I, K']
    g0 = fresh[:, 0]
    q2 = (fresh.sum(-1) ** 2 - jnp.sum(fresh**2, -1)) / (kp * (kp - 1))
    gg_f = gg[:, k]
    return _Oracle(
        action=2.0 * u1 - mean_sq_score * u2,
        total_value=gg_f * (u2 - 2.0 * g0 * v_hat),
        total_advantage=gg_f * (q2 - 2.0 * fresh.mean(-1) * v_hat + u2 - g0**2),
    )


def _nested(key, params, apply_fn, env, env_params, **kwargs):
    adv, g, oracle = _branch_advantages(
        key, params, apply_fn, env, env_params, **kwargs
    )
    return {name: _moments(a, g) for name, a in adv.items()}, oracle


# one compilation per policy, env and sizes (gamma, lam and value_scale are traced)
_nested_jit = jax.jit(
    _nested,
    static_argnames=(
        "apply_fn",
        "env",
        "num_states",
        "num_actions",
        "num_continuations",
        "horizon",
        "horizon_terminates",
    ),
)


# ------------------------------------------------------------------ statistics


def _trace_var(n, trace, total):
    """Sample trace variance from the Gram's trace and sum over n units."""
    return (trace - total / n) / (n - 1)


def _components(k, kp, n, s_traj, s_action, s_pooled, tr_m, s_m, tr_f, s_f):
    """Every component from the additive pieces over n states (scalars or arrays)."""
    traj = s_traj / n
    action = s_action / n - traj / kp
    state = _trace_var(n, tr_m, s_m) - action / k - traj / (k * kp)
    total = _trace_var(n, tr_f, s_f)
    big_n = n * k * kp
    pooled = (s_pooled - (k * kp) ** 2 * s_m / big_n) / (big_n - 1)
    parts = state + action + traj
    return {
        "state": state,
        "action": action,
        "trajectory": traj,
        "total": total,
        "sum": parts,
        "sum_minus_total": parts - total,
        "total_pooled": pooled,
    }


def _interval(value: float, loo: np.ndarray) -> tuple[float, float, float]:
    """value with its delete-one jackknife normal 95% interval."""
    n = loo.shape[0]
    se = np.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2))
    return float(value), float(value - _Z95 * se), float(value + _Z95 * se)


def _full_and_deleted(mo: _Moments, oracle: _Oracle):
    """The additive pieces of every component, over all states and each deleted."""
    mo = _Moments(*(np.asarray(x, np.float64) for x in mo))
    extra = [np.asarray(x, np.float64) for x in oracle]
    n = mo.traj.shape[0]
    dg_m, dg_f = np.diag(mo.gram), np.diag(mo.gram_fresh)
    row_m, row_f = mo.gram.sum(1), mo.gram_fresh.sum(1)
    sums = [mo.traj, mo.action, mo.pooled, dg_m]
    full = [n, *(x.sum() for x in sums), mo.gram.sum(), dg_f.sum()]
    full += [mo.gram_fresh.sum(), *(x.mean() for x in extra)]
    deleted = [n - 1, *(f - x for f, x in zip(full[1:5], sums, strict=True))]
    deleted += [full[5] - 2 * row_m + dg_m, full[6] - dg_f, full[7] - 2 * row_f + dg_f]
    deleted += [(n * x.mean() - x) / (n - 1) for x in extra]
    return full, deleted


def _oracle_components(base: dict, state, d_action, d_value, d_advantage):
    """Ideal-critic components from reward-to-go's (see :func:`_oracle_terms`).

    ``state`` is the value baseline's state part: any baseline b(s) leaves the state
    part unchanged, and the learned one usually estimates it with less noise.
    """
    action = base["action"] - d_action
    out = {}
    for name, traj, d_total in (
        ("oracle_value_baseline", base["trajectory"], d_value),
        ("oracle_advantage", 0.0 * base["trajectory"], d_advantage),
    ):
        total = base["total"] + d_total
        parts = state + action + traj
        out[name] = {
            "state": state,
            "action": action,
            "trajectory": traj,
            "total": total,
            "sum": parts,
            "sum_minus_total": parts - total,
            "total_pooled": np.nan * parts,
        }
    return out


def _all_components(moments: dict[str, _Moments], oracle: _Oracle, k, kp):
    """{estimator: {component: (value, lo, hi)}} for every estimator."""
    comps = {}
    for name, mo in moments.items():
        full, deleted = _full_and_deleted(mo, oracle)
        comps[name] = (_components(k, kp, *full[:8]), _components(k, kp, *deleted[:8]))
    (rtg, rtg_loo), (vb, vb_loo) = comps["reward_to_go"], comps["value_baseline"]
    values = _oracle_components(rtg, vb["state"], *full[8:])
    loo = _oracle_components(rtg_loo, vb_loo["state"], *deleted[8:])
    comps.update({name: (values[name], loo[name]) for name in values})
    return {est: {c: _interval(v[c], d[c]) for c in v} for est, (v, d) in comps.items()}


def _rows(moments: dict[str, _Moments], oracle: _Oracle, k: int, kp: int):
    comps = _all_components(moments, oracle, k, kp)
    rows = []
    for name in decomposed_estimators():
        for comp in COMPONENTS + CHECKS:
            value, lo, hi = comps[name][comp]
            rows.append(
                dict(
                    checkpoint="",
                    estimator=name,
                    component=comp,
                    variance=value,
                    variance_lo=lo,
                    variance_hi=hi,
                )
            )
    return rows


def _check_sizes(
    num_states: int, num_actions: int, num_continuations: int, horizon: int
) -> None:
    if num_states < 3:
        raise ValueError(f"num_states must be >= 3 (jackknife), got {num_states}.")
    if num_actions < 2 or num_continuations < 2:
        raise ValueError(
            "num_actions and num_continuations must be >= 2 (sample variances), got "
            f"{num_actions} and {num_continuations}."
        )
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}.")


def _run(
    key,
    params,
    apply_fn,
    env,
    env_params,
    *,
    num_states,
    num_actions,
    num_continuations,
    horizon,
    gamma,
    lam,
    value_scale,
    horizon_terminates,
):
    _check_sizes(num_states, num_actions, num_continuations, horizon)
    out = _nested_jit(
        key,
        params,
        apply_fn=apply_fn,
        env=env,
        env_params=env_params,
        num_states=num_states,
        num_actions=num_actions,
        num_continuations=num_continuations,
        horizon=horizon,
        gamma=gamma,
        lam=lam,
        value_scale=value_scale,
        horizon_terminates=horizon_terminates,
    )
    moments, oracle = jax.device_get(out)
    return _rows(moments, oracle, num_actions, num_continuations)


def decompose(
    key: jax.Array,
    params: Any,
    apply_fn: ApplyFn,
    env,
    env_params,
    *,
    num_states: int,
    num_actions: int,
    num_continuations: int,
    horizon: int,
    gamma: float = 0.99,
    lam: float = 0.95,
    value_scale: float = 1.0,
) -> list[dict]:
    """Estimates the state/action/trajectory variance parts on a gymnax env.

    See the module docstring for the state distribution, the nested estimator, the
    estimators and the intervals. One jitted call: a ``lax.scan`` over ``horizon``
    steps of I episodes picks the states, a second scans I (K + 1) K' branches
    (``env.step_env``, no auto-reset: a branch stops at its episode's end).

    Args:
      key: PRNG key (levels, states, actions and continuations).
      params: policy params.
      apply_fn: ``(params, obs[..., *obs_shape]) -> (logits [..., A], values [...])``.
      env, env_params: a gymnax environment with ``reset_env`` / ``step_env`` (e.g.
        ``rl_pg.make("FlappyBird-v0")``); each state's episode starts from its own
        reset key (level).
      num_states: I (>= 3), states, one per on-policy episode.
      num_actions: K (>= 2), actions resampled at each state (one more is drawn for
        the separately measured total).
      num_continuations: K' (>= 2), continuations of each (state, action).
      horizon: episode length cap T, counted from the episode start.
      gamma, lam: GAE's discount and lambda (only the ``gae`` row).
      value_scale: the reward scale the critic was trained on; V = values / scale.

    Returns:
      Rows ``{checkpoint: "", estimator, component, variance, variance_lo,
      variance_hi}`` for every estimator of :func:`decomposed_estimators` and component in
      ``COMPONENTS + CHECKS`` (``total`` is the separately measured one).
    """
    return _run(
        key,
        params,
        apply_fn,
        env,
        env_params,
        num_states=num_states,
        num_actions=num_actions,
        num_continuations=num_continuations,
        horizon=horizon,
        gamma=gamma,
        lam=lam,
        value_scale=value_scale,
        horizon_terminates=False,
    )


# ------------------------------------------------------------------ enumerable MDP


class _MDPEnv:
    """The enumerable MDP behind ``reset_env`` / ``step_env`` (state = int s).

    ``step_env`` draws the outcome o ~ P(.|s, a); o = S is the crash, which ends
    the episode (``terminated``) and leaves s in place; the finite horizon is left to
    the caller (``horizon_terminates``), as in :func:`rl_pg.enumerable.sample_batch`.
    """

    def __init__(self, mdp: enumerable.EnumerableMDP):
        self.num_states = mdp.num_states
        self.initial = jnp.asarray(mdp.initial, jnp.float32)
        self.transitions = jnp.asarray(mdp.transitions, jnp.float32)
        self.rewards = jnp.asarray(mdp.rewards, jnp.float32)

    def reset_env(self, key, params):
        del params
        s = jax.random.categorical(key, jnp.log(self.initial)).astype(jnp.int32)
        return jax.nn.one_hot(s, self.num_states), s

    def step_env(self, key, s, action, params):
        del params
        probs = self.transitions[s, action]
        o = jax.random.categorical(key, jnp.log(probs)).astype(jnp.int32)
        crash = o == self.num_states
        reward = self.rewards[s, action, o]
        s_next = jnp.where(crash, s, o)
        return jax.nn.one_hot(s_next, self.num_states), s_next, reward, crash, {}


def _mdp_parts(mdp: enumerable.EnumerableMDP, value: bool):
    """(the tabular policy's apply_fn, the :class:`_MDPEnv`), the same objects for
    the same ``mdp`` (by identity) and ``value``: they are static arguments of the
    jitted sampler, so new ones would compile it again on every call."""
    key = (id(mdp), bool(value))
    if key not in _MDP_PARTS or _MDP_PARTS[key][0] is not mdp:
        apply_fn = enumerable.mdp_policy(mdp, value=value).apply
        _MDP_PARTS[key] = mdp, apply_fn, _MDPEnv(mdp)
    return _MDP_PARTS[key][1:]


_MDP_PARTS: dict[tuple[int, bool], tuple] = {}  # (id(mdp), value) -> (mdp, apply, env)


def decompose_enumerable(
    key: jax.Array,
    params: enumerable.Params,
    *,
    num_states: int,
    num_actions: int,
    num_continuations: int,
    mdp: enumerable.EnumerableMDP = enumerable.DEFAULT_MDP,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> list[dict]:
    """:func:`decompose`'s nested estimator on the enumerable MDP (tabular policy).

    A state is (s_t, t, R_<t) at a uniform live step of an on-policy episode; a
    continuation samples the MDP forward from (s_t, a) with the tabular policy
    until the crash or t = H - 1 (terminated, no bootstrap). Compare with
    :func:`decompose_exact`.

    Args:
      key: PRNG key.
      params: tabular params ``{"logits": [S, A], "value": [S]}`` (value optional).
      num_states, num_actions, num_continuations: I, K, K' as in ``decompose``.
      mdp: the MDP.
      gamma, lam: GAE's discount and lambda.

    Returns:
      Rows as :func:`decompose`'s.
    """
    apply_fn, env = _mdp_parts(mdp, "value" in params)
    return _run(
        key,
        params,
        apply_fn,
        env,
        None,
        num_states=num_states,
        num_actions=num_actions,
        num_continuations=num_continuations,
        horizon=mdp.horizon,
        gamma=gamma,
        lam=lam,
        value_scale=1.0,
        horizon_terminates=True,
    )


def _group_means(ids: np.ndarray, w: np.ndarray, x: np.ndarray):
    """Per group (ids): total weight [G] and weighted mean of x [G, ...]."""
    num = ids.max() + 1
    weight = np.bincount(ids, weights=w, minlength=num)
    flat = x.reshape(x.shape[0], -1)
    sums = np.stack(
        [np.bincount(ids, weights=w * c, minlength=num) for c in flat.T], -1
    )
    return weight, (sums / weight[:, None]).reshape((num,) + x.shape[1:])


def decompose_exact(
    params: enumerable.Params,
    mdp: enumerable.EnumerableMDP = enumerable.DEFAULT_MDP,
    *,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> list[dict]:
    """The exact state/action/trajectory parts on the enumerable MDP, by enumeration.

    A state is the history h_t = (s_0, a_0, ..., s_t) of a live step (equivalent to
    conditioning on (s_t, t, R_<t): the future depends on h_t only through (s_t, t)).
    With p(tau) the probability of a complete trajectory and L(tau) its length, the
    state law is d(h) = sum_{tau through h} p(tau) / L(tau), and each (tau, t) gets
    the joint weight of (h_t, a_t, rest) under d(h) pi(a|h) p(rest|h, a):

        w(tau, t) = d(h_t) p(tau) / p(h_t) = p(tau) E[1/L | h_t(tau)],

    from which, with y = A_hat(tau, t) grad log pi(a_t|s_t), m(h, a) = E_w[y|h, a]
    and m(h) = E_w[y|h]:

        state = sum_h d(h) ||m(h)||^2 - ||E y||^2
        action = sum_{h,a} w(h, a) ||m(h, a)||^2 - sum_h d(h) ||m(h)||^2
        trajectory = E ||y||^2 - sum_{h,a} w(h, a) ||m(h, a)||^2

    (float64). The oracle rows use the true V(h) = E[G|h] and Q(h, a) = E[G|h, a].

    Args:
      params: tabular params ``{"logits": [S, A], "value": [S]}`` (value optional).
      mdp: the MDP.
      gamma, lam: GAE's discount and lambda.

    Returns:
      Rows ``{checkpoint: "", estimator, component, variance}`` with
      variance_lo = variance_hi = variance, components ``COMPONENTS`` and ``sum``.
    """
    e = enumerable.enumerate_trajectories(mdp)
    batch, probs, _ = enumerable.enumerated_batch(params, mdp)
    p = np.asarray(probs, np.float64)
    p = p / p.sum()
    n_idx, t_idx = np.nonzero(e.mask > 0)  # the live (tau, t) pairs
    h_id, ha_id, w = _history_weights(e, p, n_idx, t_idx, mdp.horizon)
    policy = enumerable.mdp_policy(mdp, value="value" in params)
    g = _exact_scores(params, policy, mdp, e, n_idx, t_idx)

    rewards = np.asarray(e.rewards, np.float64) * e.mask
    to_go = np.cumsum(rewards[:, ::-1], 1)[:, ::-1]
    _, values = policy.apply(params, jnp.asarray(np.eye(mdp.num_states)))
    values = np.asarray(values, np.float64)
    adv_gae = returns_lib.trajectory_gae(batch, gamma, lam)
    G = to_go[n_idx, t_idx]
    _, v_true = _group_means(h_id, w, G)
    _, q_true = _group_means(ha_id, w, G)
    adv = {
        "reinforce": e.returns[n_idx],
        "reward_to_go": G,
        "value_baseline": G - values[e.states[n_idx, t_idx]],
        "gae": np.asarray(adv_gae, np.float64).T[n_idx, t_idx],
        "oracle_value_baseline": G - v_true[h_id],
        "oracle_advantage": q_true[ha_id] - v_true[h_id],
    }
    rows = []
    for name, a in adv.items():
        if name not in decomposed_estimators():
            continue
        for comp, value in _exact_components(a[:, None] * g, w, h_id, ha_id).items():
            rows.append(
                dict(
                    checkpoint="",
                    estimator=name,
                    component=comp,
                    variance=float(value),
                    variance_lo=float(value),
                    variance_hi=float(value),
                )
            )
    return rows


def _history_weights(e, p, n_idx, t_idx, horizon: int):
    """Group ids of the history h_t and of (h_t, a_t) of every live (tau, t), and
    the joint weight w(tau, t) = p(tau) E[1/L | h_t] (see :func:`decompose_exact`)."""
    pad = -np.ones((len(n_idx), 2 * horizon + 1), np.int64)
    for c in range(horizon):
        pad[:, 1 + c] = np.where(c <= t_idx, e.states[n_idx, c], -1)
        pad[:, 1 + horizon + c] = np.where(c < t_idx, e.actions[n_idx, c], -1)
    pad[:, 0] = t_idx
    _, h_id = np.unique(pad, axis=0, return_inverse=True)
    with_a = np.concatenate([pad, e.actions[n_idx, t_idx][:, None]], 1)
    _, ha_id = np.unique(with_a, axis=0, return_inverse=True)
    h_id, ha_id = h_id.reshape(-1), ha_id.reshape(-1)
    length = (e.mask > 0).sum(1)
    _, inv_len = _group_means(h_id, p[n_idx], 1.0 / length[n_idx])
    return h_id, ha_id, p[n_idx] * inv_len[h_id]


def _exact_scores(params, policy, mdp, e, n_idx, t_idx) -> np.ndarray:
    """grad log pi(a_t|s_t) [live steps, P] in float64."""
    flat, unravel = ravel_pytree(params)
    eye = jnp.eye(mdp.num_states)
    jac = jax.vmap(
        jax.jacrev(
            lambda f, o: jax.nn.log_softmax(policy.apply(unravel(f), o[None])[0][0])
        ),
        in_axes=(None, 0),
    )(flat, eye)  # [S, A, P]
    return np.asarray(jac, np.float64)[e.states[n_idx, t_idx], e.actions[n_idx, t_idx]]


def _exact_components(y, w, h_id, ha_id) -> dict[str, float]:
    """The law-of-total-variance parts of y [live steps, P] under weights w."""
    mu = w @ y
    second = w @ np.sum(y * y, 1)
    w_h, m_h = _group_means(h_id, w, y)
    w_ha, m_ha = _group_means(ha_id, w, y)
    between_h = w_h @ np.sum(m_h * m_h, 1)
    between_ha = w_ha @ np.sum(m_ha * m_ha, 1)
    comps = {
        "state": between_h - mu @ mu,
        "action": between_ha - between_h,
        "trajectory": second - between_ha,
        "total": second - mu @ mu,
    }
    comps["sum"] = comps["state"] + comps["action"] + comps["trajectory"]
    return comps


# ------------------------------------------------------------------ plot


def plot_decomposition(rows: Sequence[dict], path, formats: Sequence[str] = ()) -> list:
    """Stacked bars (state, action, trajectory) per estimator, one panel per
    checkpoint, with the separately measured total and its interval as a marker
    (:func:`rl_pg.figures.decomposition_figure`).

    Args:
      rows: rows of :func:`decompose` (several checkpoints allowed).
      path: the figure to write (its suffix picks the format), atomically.
      formats: also write it beside ``path`` in these formats (png, pdf, svg).

    Returns:
      The files written.
    """
    from rl_pg import figures

    fig = figures.decomposition_figure(rows)
    written = figures.save(fig, path, formats)
    figures.pyplot().close(fig)
    return written
