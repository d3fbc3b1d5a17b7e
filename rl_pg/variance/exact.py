"""Exact answers for the study on the enumerable MDP: the benchmark's calibration.

``enumerable_problem`` is the study's :class:`~rl_pg.variance.problems.Problem` for
:mod:`rl_pg.enumerable` with G > 1 (a level is an initial state s_0 shared by the
G episodes of a group), plus exact values of the batch statistics:

* the mean of an estimator, E[g_hat] = c g, where its registry entry knows c in
  closed form (``EstimatorSpec.mean_factor``): c = 1 for the unbiased estimators
  (reinforce, reward_to_go, constant_baseline, rloo, optimal_baseline with
  leave-one-out, value_baseline), c = (G-1)/G for the mean baseline (the group mean
  includes the sample itself; E[s_i | s_0] = 0 makes the other members' returns
  uncorrelated with s_i), c = (G-1)/(G T) for Dr. GRPO (the same shrink, and its
  constant 1/(B T) normaliser); or by enumeration for a per-trajectory estimator
  (``EstimatorSpec.per_trajectory``: its batch estimate is the mean over columns of
  a function of that column alone), gae included;
* the batch variance of a per-trajectory estimator with y(tau) its one-column
  estimate: a batch of n = L G columns is the mean of L i.i.d. group terms
  u = (1/G) sum_j y(tau_j), the G episodes i.i.d. given their shared s_0, so

    tr Var(g_hat) = (1/L) [ sum_s0 p0(s0) ||m(s0) - mu||^2
                            + (1/G) sum_s0 p0(s0) tr Var(y | s0) ],  m(s0) = E[y | s0];

* the reference's squared standard error in the same way, for the test of the
  clustered reference error.

Everything else (GRPO's std division, PPO's batch-normalised advantages, the
variance of group estimators) is left nan: unknown, not guessed.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rl_pg import enumerable
from rl_pg.variance import study
from rl_pg.variance.problems import Problem
from rl_pg.variance.runners import make_runners


def _conditional_moments(y: np.ndarray, probs: np.ndarray, s0: np.ndarray):
    """mu, and per initial state: p0, E[y | s0], tr Var(y | s0)."""
    mu = probs @ y
    parts = []
    for s in np.unique(s0):
        sel = s0 == s
        p0 = probs[sel].sum()
        w = probs[sel] / p0
        m = w @ y[sel]
        second = w @ np.sum(y[sel] ** 2, axis=1)
        parts.append((p0, m, second - m @ m))
    return mu, parts


def grouped_batch_variance(
    y: np.ndarray, probs: np.ndarray, s0: np.ndarray, n: int, group_size: int
) -> float:
    """tr Var of the mean of n per-trajectory terms y drawn in levels of G."""
    mu, parts = _conditional_moments(y, probs, s0)
    between = sum(p0 * np.sum((m - mu) ** 2) for p0, m, _ in parts)
    within = sum(p0 * v for p0, _, v in parts)
    return float((between + within / group_size) / (n // group_size))


EXACT_METRICS = ("bias2", "variance", "mse", "snr", "rel_variance", "cos_mean")


def _exact_metrics(mu: np.ndarray | None, g: np.ndarray, variance: float) -> dict:
    """Exact metrics from the exact mean mu (None if unknown) and tr Var."""
    out = dict.fromkeys(EXACT_METRICS, np.nan)
    out["variance"] = variance
    if mu is None:
        return out
    mu2 = float(mu @ mu)
    out["bias2"] = float(np.sum((mu - g) ** 2))
    cos = mu @ g / np.sqrt(mu2 * (g @ g)) if mu2 > 0 else np.nan
    out["cos_mean"] = float(np.clip(cos, -1.0, 1.0))  # rounding: c g may give 1 + 1e-16
    out["mse"] = variance + out["bias2"]
    out["snr"] = float(np.sqrt(mu2 / variance))
    out["rel_variance"] = variance / mu2 if mu2 > 0 else np.inf
    return out


def exact_values(
    params, column_grads, batch_sizes, specs, group_size: int, mdp
) -> dict[int, dict[str, dict[str, float]]]:
    """n -> name -> exact metric -> value (:data:`EXACT_METRICS`; nan where unknown).

    ``column_grads(batch) -> {name: [N, P]}``: the one-column estimates of the
    studied per-trajectory estimators on each column of ``batch`` (here, every
    trajectory).
    """
    batch, probs, s0 = enumerable.enumerated_batch(params, mdp)
    probs = np.asarray(probs, np.float64)
    g = np.asarray(ravel_pytree(enumerable.exact_gradient(params, mdp))[0], np.float64)
    per_column = column_grads(batch)
    out = {int(n): {} for n in batch_sizes}
    for name, spec in specs.items():
        mu, y = None, per_column.get(name)
        if spec.mean_factor is not None:
            mu = spec.mean_factor(group_size, mdp.horizon) * g
        if y is not None:
            mu = probs @ y
        for n in out:
            variance = np.nan
            if y is not None:
                variance = grouped_batch_variance(y, probs, s0, n, group_size)
            out[n][name] = _exact_metrics(mu, g, variance)
    return out


def reference_terms(params, mdp=enumerable.DEFAULT_MDP):
    """Per-trajectory terms of the study's reference, (R - E[R]) s(tau) [N, P], with
    p(tau) [N] and s_0 [N], over every trajectory of ``mdp``."""
    e = enumerable.enumerate_trajectories(mdp)
    _, probs, s0 = enumerable.enumerated_batch(params, mdp)
    probs = np.asarray(probs, np.float64)
    scores = jax.vmap(jax.grad(_log_policy_prob), in_axes=(None, 0, 0, 0))(
        params, jnp.asarray(e.states), jnp.asarray(e.actions), jnp.asarray(e.mask)
    )
    s = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(scores), np.float64)
    return (e.returns - probs @ e.returns)[:, None] * s, probs, s0


def reference_se2(
    params, num_trajectories: int, group_size: int, mdp=enumerable.DEFAULT_MDP
) -> float:
    """Exact E||g_ref - g||^2 of the study's reference (mean-baseline REINFORCE,
    b = E[R]) from ``num_trajectories`` in levels of G (to O(1/N))."""
    y, probs, s0 = reference_terms(params, mdp)
    return grouped_batch_variance(y, probs, s0, num_trajectories, group_size)


def _log_policy_prob(params, states, actions, mask):
    log_pi = jax.nn.log_softmax(params["logits"], axis=-1)
    return jnp.sum(mask * log_pi[states, actions])


def enumerable_problem(
    group_size: int = 4, mdp: enumerable.EnumerableMDP = enumerable.DEFAULT_MDP
) -> Problem:
    """The study's problem on the enumerable MDP, with exact values.

    The same object for the same ``group_size`` and ``mdp`` (by identity), so that
    runners built for it reuse their compiled functions (no recompilation when a
    study of new params or seeds runs again).
    """
    key = (int(group_size), id(mdp))
    if key not in _PROBLEMS or _PROBLEMS[key][0] is not mdp:
        _PROBLEMS[key] = mdp, _enumerable_problem(int(group_size), mdp)
    return _PROBLEMS[key][1]


_PROBLEMS: dict[tuple[int, int], tuple] = {}  # (G, id(mdp)) -> (mdp, Problem)


def _enumerable_problem(group_size: int, mdp: enumerable.EnumerableMDP) -> Problem:
    policy = enumerable.mdp_policy(mdp)

    def sample(key, params, n):
        return enumerable.sample_batch(key, params, n, mdp, group_size=group_size)

    return Problem(
        policy.apply,
        sample,
        group_size,
        exact=functools.partial(exact_values, group_size=group_size, mdp=mdp),
    )


def enumerable_policies(mdp: enumerable.EnumerableMDP = enumerable.DEFAULT_MDP):
    """A few tabular policies ("stages") of the exact mode: label -> params.

    uniform (zero logits), skewed and peaked (larger logits); each with a fixed,
    imperfect value table so that the critic-based estimators have a baseline.
    """
    S, A = mdp.num_states, mdp.num_actions
    ramp = jnp.arange(S * A, dtype=jnp.float32).reshape(S, A)
    value = jnp.asarray(np.linspace(1.5, 0.5, S), jnp.float32)
    return {
        "uniform": {"logits": jnp.zeros((S, A)), "value": value},
        "skewed": {"logits": 0.3 * ramp - 0.6, "value": value},
        "peaked": {"logits": 1.2 * jnp.cos(ramp), "value": value},
    }


def coverage(rows: list[dict], metrics=EXACT_METRICS) -> dict[str, tuple[int, int]]:
    """metric -> (intervals that hold the exact value, intervals with one known).

    ``rows`` are result rows with ``<metric>_lo``, ``<metric>_hi`` and
    ``exact_<metric>``.
    """
    out = {}
    for m in metrics:
        known = [r for r in rows if np.isfinite(r.get(f"exact_{m}", np.nan))]
        hits = sum(r[f"{m}_lo"] <= r[f"exact_{m}"] <= r[f"{m}_hi"] for r in known)
        out[m] = (int(hits), len(known))
    return out


CALIBRATION_SEED = 20_250_101  # base of calibration_keys' fold_in chain


def calibration_seed(seed: int, policy_index: int, size_index: int) -> int:
    """The study seed of one calibration repeat: fold_in(fold_in(fold_in(
    PRNGKey(CALIBRATION_SEED), seed), policy), size), as a non-negative int32.

    Every (seed, policy, batch size) gets its own key, so the repeats are
    independent: no two policies share trajectories, and no batch size reuses
    another's sample."""
    key = jax.random.PRNGKey(CALIBRATION_SEED)
    for i in (seed, policy_index, size_index):
        key = jax.random.fold_in(key, int(i))
    return int(np.asarray(jax.random.key_data(key))[-1]) & 0x7FFFFFFF


def calibration_rows(
    seeds, config: "study.StudyConfig", group_size: int = 4, progress=None
) -> list[dict]:
    """Result rows of the exact-mode study for every seed, policy and batch size
    (with ``seed`` and ``checkpoint`` keys), to measure the intervals' coverage.

    Each (seed, policy, batch size) is its own study (``config`` with that one
    batch size, ``config.num_batches`` batches of it, and the key of
    :func:`calibration_seed`): every row is an independent repeat."""
    problem = enumerable_problem(group_size)
    sizes = [int(n) for n in config.batch_sizes]
    runners = {}
    for n in sizes:
        one = dataclasses.replace(
            config, batch_sizes=(n,), max_batches_per_size=config.num_batches
        )
        runners[n] = (one, make_runners(problem, one))
    rows = []
    for seed in seeds:
        for p, (label, params) in enumerate(enumerable_policies().items()):
            for i, n in enumerate(sizes):
                one, runner = runners[n]
                seeded = dataclasses.replace(one, seed=calibration_seed(seed, p, i))
                result = study.study_stage(
                    params, runner, seeded, enumerable.DEFAULT_MDP.horizon
                )
                rows += [{"seed": seed, "checkpoint": label, **r} for r in result.rows]
        if progress is not None:
            progress(seed)
    return rows
