"""How far is a policy-gradient estimate from the true gradient?

The estimator-variance study after Ilyas et al. 2020 ("A Closer Look at Deep
Policy Gradients", ICLR): for a policy theta,

1. a reference gradient g = grad J(theta) from a large sample of per-trajectory
   REINFORCE estimates with the sample-mean baseline (see
   :func:`reference_gradient`), kept as K group means of whole levels so that its
   standard error treats the G rollouts of a level as one cluster;
2. M independent top-level batches of n_max = max(batch sizes) trajectories. Each
   is cut into disjoint sub-batches of every studied size n (whole groups of G),
   so a size gets up to M n_max / n i.i.d. batches from the same trajectories
   (nested common random numbers: estimates at every n, and of every estimator,
   see the same trajectories, so comparisons across estimators and the slope of
   variance against n are not blurred by sampling noise). Estimators that declare
   per-step score weights (``EstimatorSpec.weights``, or ``from_scores``) get
   every sub-batch's estimate from one forward pass and one VJP per top-level
   batch (:func:`score_weight_estimates`); the others from their own loss's
   gradient on each sub-batch;
3. per (estimator, n): the calibrated statistics of :mod:`rl_pg.variance.statistics`
   (noise-corrected bias2, variance, mse, cosines, SNR, the scale-free cos_mean
   and rel_variance, jackknife intervals) and, on a problem that knows them,
   the exact values ``exact_bias2`` and ``exact_variance``;
4. per-trajectory statistics, accumulated chunk by chunk (each chunk reduced to
   O(P) sums where its gradients are, :func:`chunk_sums`, then merged in float64
   on the host with Chan et al. 1979's parallel update of mean and sum of squared
   deviations) so memory is bounded by the chunk, never by trajectories x
   parameters: the per-trajectory variance of REINFORCE with the constant
   baselines 0, E[R], and the oracle scalar optimum E[||s||^2 R] / E[||s||^2] (Greensmith et al. 2004) and
   per-parameter optimum E[R s_k^2] / E[s_k^2] (Mohamed et al. 2020, s. 7.4) --
   oracle because b* comes from the large sample, unlike the batch estimators,
   which estimate b from the other trajectories of their batch -- and of
   reward-to-go. Also the critic's calibration: mean V(s_t) against the mean
   discounted return-to-go over live steps, and their correlation.

The study is generic: a :class:`Problem` is a policy ``apply_fn`` and a sampler
``sample(key, params, n) -> Trajectory`` of n episodes in groups of
``group_size`` columns (levels x G), optionally with ``exact`` values.
:func:`flappy_problem` samples grouped Flappy Bird rollouts;
:func:`rl_pg.variance.exact.enumerable_problem` the exactly solvable MDP of
:mod:`rl_pg.enumerable`.

``make_runners(..., mesh=...)`` shards the study across devices (and hosts):
the M batches of a batch-size setting and the trajectories of a gradient chunk
are split over the mesh, parameters are replicated, and every result is gathered
to the host. Keys stay per batch / per chunk index, so the numbers are those of a
single-device run. Without a mesh, the reference sample's chunks go to the local
CPU devices in turn and run concurrently (``concurrent_devices``): XLA runs a
device's gradient loop on about one core, so that is what uses the other cores,
and the numbers are exactly those of one device.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from rl_pg import distributed, policies
from rl_pg import estimators as estimators_lib
from rl_pg import returns as returns_lib
from rl_pg.rollout import grouped_rollout
from rl_pg.trajectory import Trajectory
from rl_pg.variance import dense, statistics

CPU_BLOCK_STEPS = 2048  # StudyConfig.block_steps on CPU when not given
# ... and for a dense policy's gradient phase (rl_pg.variance.dense), measured
# 1.2-1.4x faster than 1024-8192 at both presets' horizons
DENSE_CPU_BLOCK_STEPS = 512
METRICS = statistics.METRICS


class Problem(NamedTuple):
    """What the study needs to know about a policy-gradient problem.

    ``exact(params, column_grads, batch_sizes, specs) -> {n: {name: {metric:
    value}}}`` (optional) gives exact values (nan where unknown) of the metrics
    ``bias2``, ``variance``, ``mse``, ``snr``, ``rel_variance``, ``cos_mean``;
    ``column_grads(batch) -> {name: [B, P]}`` are their one-column estimates.
    """

    apply_fn: Callable  # (params, obs) -> (logits, value)
    sample: Callable[[jax.Array, Any, int], Trajectory]  # (key, params, n)
    group_size: int  # consecutive columns sharing a level
    exact: Callable | None = None


def critic_in_reward_units(apply_fn: Callable, reward_scale: float) -> Callable:
    """``apply_fn`` whose values are divided by ``reward_scale``.

    A critic trained on rewards x c (PPO's ``reward_scale``) predicts c times the
    return; the study rolls out with raw rewards, so value-based estimators must
    see V / c.
    """
    if reward_scale == 1.0:
        return apply_fn

    def apply(params, obs):
        logits, values = apply_fn(params, obs)
        return logits, values / reward_scale

    return apply


def flappy_problem(apply_fn, env, env_params, horizon: int, group_size: int) -> Problem:
    """Grouped Flappy Bird rollouts: n // G levels x G episodes of ``horizon``."""

    def sample(key, params, n):
        key_levels, key_actions = jax.random.split(key)
        level_keys = jax.random.split(key_levels, n // group_size)
        return grouped_rollout(
            key_actions,
            params,
            apply_fn,
            env,
            env_params,
            level_keys,
            group_size,
            horizon,
        )

    return Problem(apply_fn, sample, group_size)


# ------------------------------------------------------------------ estimators


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """The estimators under study and their shared hyperparameters.

    ``names`` are registered estimator names (:mod:`rl_pg.estimators`) and/or
    ``module:function`` references to loss functions; default: every registered
    estimator marked ``in_study``. Value and entropy terms are off.
    """

    names: tuple[str, ...] = tuple(
        name for name, s in estimators_lib.REGISTRY.items() if s.in_study
    )
    gamma: float = 0.99
    lam: float = 0.95


def suite_specs(config: SuiteConfig) -> dict[str, estimators_lib.EstimatorSpec]:
    """Output name -> spec of every studied estimator (validated, unique names)."""
    specs = {}
    for ref in config.names:
        spec = estimators_lib.resolve(ref)
        if spec.name in specs:
            raise ValueError(f"two studied estimators are named {spec.name!r}")
        specs[spec.name] = spec
    if not specs:
        raise ValueError("no estimators to study")
    return specs


def _suite_kwargs(
    problem: Problem, config: SuiteConfig, constant_b: float | jax.Array
) -> dict[str, tuple[estimators_lib.EstimatorSpec, dict]]:
    """Name -> (spec, the study's hyperparameters for it); see estimator_suite."""
    G = problem.group_size
    options = {
        "group_size": G,
        "vf_coef": 0.0,
        "ent_coef": 0.0,
        "gamma": config.gamma,
        "lam": config.lam,
        "b": constant_b,
        "beta": 0.0,
    }
    out = {}
    for name, spec in suite_specs(config).items():
        if spec.min_group_size > G:
            raise ValueError(
                f"{name} needs group_size >= {spec.min_group_size}, got {G}"
            )
        accepted = estimators_lib.hyperparameters(spec.loss)
        kwargs = {k: v for k, v in options.items() if k in accepted}
        out[name] = spec, kwargs | spec.study_kwargs
    return out


def estimator_suite(
    problem: Problem, config: SuiteConfig, constant_b: float | jax.Array = 0.0
) -> dict[str, Callable]:
    """Name -> ``loss(params, batch) -> (loss, aux)`` for every studied estimator.

    Each estimator gets the study's options it accepts (the problem's groups,
    ``b`` = ``constant_b`` (an estimate of E[R] from the reference sample,
    independent of the batches), gamma, lam; value, entropy and KL coefficients
    0, so each gradient is a pure policy-gradient estimate), then its registry
    entry's ``study_kwargs``.
    """
    suite = {}
    for name, (spec, kwargs) in _suite_kwargs(problem, config, constant_b).items():
        if spec is estimators_lib.REGISTRY.get(name):
            suite[name] = estimators_lib.get_estimator(
                name, apply_fn=problem.apply_fn, **kwargs
            )
        else:
            suite[name] = functools.partial(
                spec.loss, apply_fn=problem.apply_fn, **kwargs
            )
    return suite


def weight_suite(
    problem: Problem, config: SuiteConfig, constant_b: float | jax.Array = 0.0
) -> dict[str, Callable]:
    """Name -> ``weights(batch, inputs) -> StepWeights`` or ``from_scores(batch,
    scores) -> [P]`` (wrapped in :class:`FromScores`) for the studied estimators
    that declare either, with ``estimator_suite``'s hyperparameters."""
    suite = {}
    for name, (spec, kwargs) in _suite_kwargs(problem, config, constant_b).items():
        if spec.weights is not None:
            suite[name] = functools.partial(spec.weights, **kwargs)
        elif spec.from_scores is not None:
            suite[name] = FromScores(functools.partial(spec.from_scores, **kwargs))
    return suite


class FromScores(NamedTuple):
    """An estimator given as ``fn(batch, scores [B, P]) -> [P]`` (not weights)."""

    fn: Callable


def flat_gradient(loss_fn: Callable, params: Any, batch: Trajectory) -> jax.Array:
    """The estimate g_hat = -grad loss as one flat vector [P]."""
    grads = jax.grad(lambda p: loss_fn(p, batch)[0])(params)
    return -ravel_pytree(grads)[0]


# ------------------------------------------------------ per-trajectory moments


ORACLE_SCALAR = "oracle optimal scalar b* (from the reference sample)"
ORACLE_PER_PARAMETER = "oracle optimal per-parameter b* (from the reference sample)"


@dataclasses.dataclass
class TrajectoryMoments:
    """Running float64 moments of per-trajectory quantities (Chan's update).

    ``mean``/``m2`` hold, per estimator (the study keeps reward-to-go's), the mean
    and the sum of squared deviations of the per-trajectory estimates; ``sums``
    the raw sums needed for the constant-baseline analysis (s = per-trajectory
    score, R = return).
    """

    count: int = 0
    mean: dict = dataclasses.field(default_factory=dict)
    m2: dict = dataclasses.field(default_factory=dict)
    sums: dict = dataclasses.field(default_factory=dict)
    # per reference group k (whole levels): sum_i R_i s_i and sum_i s_i, [P] each
    group_R_s: list = dataclasses.field(default_factory=list)
    group_s: list = dataclasses.field(default_factory=list)
    group_count: list = dataclasses.field(default_factory=list)

    def update(self, chunk: dict[str, np.ndarray], sums: dict[str, np.ndarray]):
        """Merge a chunk: ``chunk[name]`` is [C, P] per-trajectory estimates."""
        n_b = next(iter(chunk.values())).shape[0]
        means, m2s = {}, {}
        for name, values in chunk.items():
            values = np.asarray(values, np.float64)
            means[name] = values.mean(0)
            m2s[name] = ((values - means[name]) ** 2).sum(0)
        self.merge(n_b, means, m2s, sums)

    def merge(
        self,
        n_b: int,
        means: dict[str, np.ndarray],
        m2s: dict[str, np.ndarray],
        sums: dict[str, np.ndarray],
    ):
        """Merge a chunk of ``n_b`` trajectories given by its per-estimator means
        and sums of squared deviations [P] (Chan et al.'s pairwise update)."""
        n_a, n = self.count, self.count + n_b
        for name, mean_b in means.items():
            mean_b = np.asarray(mean_b, np.float64)
            m2_b = np.asarray(m2s[name], np.float64)
            if n_a == 0:
                self.mean[name], self.m2[name] = mean_b, m2_b
            else:
                delta = mean_b - self.mean[name]
                self.mean[name] = self.mean[name] + delta * n_b / n
                self.m2[name] = self.m2[name] + m2_b + delta**2 * n_a * n_b / n
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + np.asarray(value, np.float64)
        self.count = n

    def trace_variance(self, name: str) -> float:
        """tr Cov of one per-trajectory estimate (unbiased)."""
        return float(self.m2[name].sum() / max(self.count - 1, 1))

    def baseline_variances(self) -> dict[str, float]:
        """Per-trajectory tr Var[(R - b) s] for the constant baselines b.

        tr Var = sum_k E[(R - b_k)^2 s_k^2] - ||E[(R - b) s]||^2, from raw moments.
        """
        e = {k: v / self.count for k, v in self.sums.items()}
        mean_r = float(e["R"])
        scalar = float(e["R_s2"].sum() / max(e["s2"].sum(), 1e-300))
        per_param = np.where(e["s2"] > 0, e["R_s2"] / np.maximum(e["s2"], 1e-300), 0.0)
        out = {}
        for label, b in (
            ("reinforce (b = 0)", 0.0),
            ("constant b = E[R]", mean_r),
            (ORACLE_SCALAR, scalar),
            (ORACLE_PER_PARAMETER, per_param),
        ):
            second = e["R2_s2"] - 2 * b * e["R_s2"] + b**2 * e["s2"]
            first = e["R_s"] - b * e["s"]
            out[label] = float(second.sum() - (first**2).sum())
        return out


class ChunkSums(NamedTuple):
    """One chunk's reductions of its per-trajectory gradients (see :func:`chunk_sums`).

    Products with the return are taken about the chunk's mean return c
    (d_i = R_i - c): when returns hardly vary (a policy that always survives the
    horizon), float32 sums of R s would lose the small differences that the
    constant baselines' variances and the reference's mean-return baseline are
    made of; the host adds c back in float64 (:meth:`raw_sums`).
    """

    returns: jax.Array  # [C] R_i
    shift: jax.Array  # [] c, the chunk's mean return
    s: jax.Array  # [P] sum_i s_i
    d_s: jax.Array  # [P] sum_i d_i s_i
    group_s: jax.Array  # [groups, P] sum_i s_i per reference group
    group_d_s: jax.Array  # [groups, P] sum_i d_i s_i per reference group
    s2: jax.Array  # [P] sum_i s_i^2
    d_s2: jax.Array  # [P] sum_i d_i s_i^2
    d2_s2: jax.Array  # [P] sum_i d_i^2 s_i^2
    rtg_mean: jax.Array  # [P] mean of the reward-to-go gradients
    rtg_m2: jax.Array  # [P] their sum of squared deviations from it

    def raw_sums(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Host float64: the sums of :class:`TrajectoryMoments` (R, R^2, s, s^2,
        R s, R s^2, R^2 s^2), and per group sum R s [groups, P] and sum s."""
        c = np.float64(self.shift)
        f = {k: np.asarray(v, np.float64) for k, v in self._asdict().items()}
        sums = {
            "R": f["returns"].sum(),
            "R2": (f["returns"] ** 2).sum(),
            "s": f["s"],
            "s2": f["s2"],
            "R_s": f["d_s"] + c * f["s"],
            "R_s2": f["d_s2"] + c * f["s2"],
            "R2_s2": f["d2_s2"] + 2 * c * f["d_s2"] + c**2 * f["s2"],
        }
        return sums, f["group_d_s"] + c * f["group_s"], f["group_s"]


def chunk_sums(
    score: jax.Array, rtg: jax.Array, returns: jax.Array, group_len: int
) -> ChunkSums:
    """A chunk's per-trajectory moments, reduced where the gradients are.

    Every sum over trajectories is a product [k, C] x [C, P] with a few per-row
    weights (1, d_i, d_i^2, group indicators), one pass over each [C, P] array,
    and the reward-to-go gradients' deviations are taken from their mean (two
    passes), so the host accumulates O(P) float64 values per chunk instead of two
    [C, P] arrays.

    Args:
      score: [C, P] per-trajectory scores s_i.
      rtg: [C, P] per-trajectory reward-to-go gradients.
      returns: [C] R_i.
      group_len: trajectories per reference group (divides C; whole levels).

    Returns:
      :class:`ChunkSums`.
    """
    num = returns.shape[0]
    if group_len < 1 or num % group_len:
        raise ValueError(f"group_len ({group_len}) must divide the chunk ({num})")
    groups = num // group_len
    # full float32 products (accelerators default to TF32 / bfloat16 passes)
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    shift = jnp.mean(returns)
    d = returns - shift
    ones = jnp.ones_like(d)
    in_group = (jnp.arange(num) // group_len == jnp.arange(groups)[:, None]).astype(
        score.dtype
    )  # [groups, C]
    linear = dot(
        jnp.concatenate([ones[None], d[None], in_group, in_group * d], 0), score
    )
    square = dot(jnp.stack([ones, d, jnp.square(d)]), jnp.square(score))
    rtg_mean = jnp.mean(rtg, 0)
    return ChunkSums(
        returns=returns,
        shift=shift,
        s=linear[0],
        d_s=linear[1],
        group_s=linear[2 : 2 + groups],
        group_d_s=linear[2 + groups :],
        s2=square[0],
        d_s2=square[1],
        d2_s2=square[2],
        rtg_mean=rtg_mean,
        rtg_m2=dot(ones, jnp.square(rtg - rtg_mean)),
    )


def _score_and_rtg(
    problem: Problem,
    block_steps: int | None = None,
    multiple: int = 1,
    gamma: float = 0.99,
    dense_block_steps: int | None = None,
):
    """Per-trajectory score s_i = grad log p(tau_i), reward-to-go gradient and R_i.

    Both gradients are sum_t w_t grad log pi(a_t|s_t), with w_t = m_t for the score
    and w_t = m_t G_t (G_t = sum_{t' >= t} r_t') for reward-to-go, so one forward
    pass and one VJP with the two weightings stacked as cotangents give both:
    every weight gradient is a single [in, T] x [T, 2 * out] product instead of
    two passes of [in, T] x [T, out]. A policy whose logits are a chain of dense
    layers takes :func:`rl_pg.variance.dense.dense_column_grads` instead (the
    backward pass once for both weightings, no transposes on the CPU). With
    ``block_steps`` (``dense_block_steps`` on the dense path, if given) the
    gradients run in cache-sized blocks of trajectories (:func:`in_blocks`). Returns ``(params, traj [T, C], out=None) -> (score [C, P],
    rtg [C, P], R [C], critic [6])``, ``critic`` the sums over live steps of 1, V,
    G, V^2, G^2 and V G, with V(s_t) the collection-time value and G the discounted
    (``gamma``) return-to-go, bootstrapped where the horizon cuts an episode (the
    critic's own target). ``out``, the (score, rtg) of an earlier call, is written
    over (the runner donates it): on the CPU, writing [C, P] outputs into fresh
    memory took as long as computing them (0.85 s against 0.45 s per full-preset
    chunk).
    """

    columns_grads = weighted_column_grads(problem.apply_fn, block_steps, multiple)

    def grads(params, traj: Trajectory, out=None):
        observations, actions, live = _clean(traj)
        rewards = jnp.where(live, traj.rewards.astype(jnp.float32), 0.0)
        done = traj.terminated | traj.truncated
        to_go = returns_lib.batch_reward_to_go(rewards, traj.mask, done)
        weights = jnp.stack([live, jnp.where(live, to_go, 0.0)], -1)  # [T, C, 2]
        columns = (observations, actions, weights.astype(jnp.float32))
        horizon, num = live.shape
        steps = block_steps if dense_block_steps is None else dense_block_steps
        size = None if steps is None else block_size(num, horizon, steps, multiple)
        found = dense.dense_column_grads(
            problem.apply_fn, params, columns, size, multiple, out
        )
        if found is None:  # not a chain of dense layers: vmap of a VJP per column
            g = columns_grads(params, columns)
            found = g[:, 0], g[:, 1]
            if out is not None:  # into the donated buffers
                found = tuple(
                    jax.lax.dynamic_update_slice(o, x, (0, 0))
                    for o, x in zip(out, found, strict=True)
                )
        score, rtg = found
        return score, rtg, jnp.sum(rewards, 0), _critic_sums(traj, gamma)

    return grads


def weighted_column_grads(
    apply_fn: Callable, block_steps: int | None = None, multiple: int = 1
) -> Callable:
    """``(params, (observations, actions, weights)) -> [C, F, P]``: per column c
    and weighting f, sum_t weights[t, c, f] grad log pi(a_t|s_t) as a flat vector.

    One forward pass and one VJP per column, with the F weightings stacked as
    cotangents (``vmap`` of the VJP), so every weight gradient is a single
    [in, T] x [T, F * out] product. Inputs are [T, C, ...], [T, C], [T, C, F];
    padding must already be zeroed (observations, actions and weights). With
    ``block_steps`` the columns run in cache-sized blocks (:func:`in_blocks`).
    """

    def one(params, observations, actions, weights):  # [T, ...], [T], [T, F]
        def log_probs(p):  # [T]
            logits, _ = apply_fn(p, observations)
            return policies.log_prob(logits, actions)

        _, vjp = jax.vjp(log_probs, params)
        return jax.vmap(lambda w: ravel_pytree(vjp(w)[0])[0], in_axes=1)(weights)

    def columns_grads(params, columns):  # leaves [T, C, ...] -> [C, F, P]
        return jax.vmap(one, in_axes=(None, 1, 1, 1))(params, *columns)

    if block_steps is not None:
        columns_grads = in_blocks(columns_grads, block_steps, multiple)
    return columns_grads


def _clean(traj: Trajectory) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(observations, actions, live) with padding observations and actions zeroed."""
    live = traj.mask > 0
    obs_live = live.reshape(live.shape + (1,) * (traj.observations.ndim - 2))
    observations = jnp.where(obs_live, traj.observations, 0)
    return observations, jnp.where(live, traj.actions, 0), live


def _policy_leaves(apply_fn: Callable, params: Any, observations: jax.Array):
    """Which leaves of ``params`` the logits depend on (a critic's do not), from
    the jaxpr's dead-code analysis; every leaf if that is unavailable."""
    leaves, treedef = jax.tree.flatten(params)

    def logits(leaves, obs):
        return apply_fn(jax.tree.unflatten(treedef, leaves), obs)[0]

    try:
        from jax._src.interpreters import partial_eval as pe  # no public API

        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        obs = jax.ShapeDtypeStruct(observations.shape, observations.dtype)
        closed = jax.make_jaxpr(logits)(shapes, obs)
        _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
        return [bool(u) for u in used[: len(leaves)]]
    except Exception:  # pragma: no cover - a JAX without this internal
        return [True] * len(leaves)


def _split_params(params: Any, used: list[bool]):
    """(the used leaves, a function of them back to the whole params (the others
    without gradient), a function [..., P_used] -> [..., P] with zeros for the
    unused leaves in ``ravel_pytree`` order)."""
    leaves, treedef = jax.tree.flatten(params)
    kept = [x for x, u in zip(leaves, used, strict=True) if u]

    def merge(kept_leaves):
        it = iter(kept_leaves)
        full = [
            next(it) if u else jax.lax.stop_gradient(x)
            for x, u in zip(leaves, used, strict=True)
        ]
        return jax.tree.unflatten(treedef, full)

    def expand(flat):
        if all(used):
            return flat
        parts, start = [], 0
        for x, u in zip(leaves, used, strict=True):
            if u:
                parts.append(flat[..., start : start + x.size])
                start += x.size
            else:
                parts.append(jnp.zeros(flat.shape[:-1] + (x.size,), flat.dtype))
        return jnp.concatenate(parts, -1)

    return kept, merge, expand


def score_weight_estimates(
    problem: Problem,
    weight_fns: dict[str, Callable],
    sub_batches: dict[int, int],
    block_steps: int | None = None,
    multiple: int = 1,
) -> Callable:
    """``(params, batch [T, N]) -> {n: [count, E, P]}``: the batch estimates of
    every estimator in ``weight_fns`` (name -> ``weights(batch, inputs)``, see
    :class:`rl_pg.estimators.StepWeights`) on the first ``count`` disjoint
    sub-batches of n columns, for each ``n: count`` of ``sub_batches``.

    At the on-policy point each estimate is sum_f sum_i c_f[i] g_f[i] with
    g_f[i] = sum_t f[t, i] grad log pi(a_t|s_t) the gradient of feature f on
    column i. Features depend on their column alone, so one forward pass for the
    values, one VJP per column with every distinct feature stacked as a cotangent
    (:func:`weighted_column_grads`), then, per sub-batch, the coefficients
    (elementwise work) and one [E, n F] x [n F, P] product give all of them.
    Estimators given as :class:`FromScores` get the sub-batch's per-trajectory
    scores (the feature m_t's gradients) instead. Returned estimators are in the
    order of ``weight_fns``.
    """
    score = estimators_lib.SCORE

    weighted = {e: fn for e, fn in weight_fns.items() if not isinstance(fn, FromScores)}
    names = tuple(weight_fns)

    def estimates(params, batch):
        observations, actions, live = _clean(batch)
        _, values = problem.apply_fn(params, observations)
        values = jax.lax.stop_gradient(values)
        num_columns = live.shape[1]
        inputs = estimators_lib.WeightInputs(values, jnp.zeros(num_columns))
        features = {score: live.astype(jnp.float32)}
        for fn in weighted.values():
            for k, f in fn(batch, inputs).features.items():
                features.setdefault(k, f)
        keys = tuple(features)
        weights = jnp.stack([features[k] for k in keys], -1)  # [T, N, F]
        # only the policy's leaves: the critic's gradients are 0 (P' <= P)
        used = _policy_leaves(problem.apply_fn, params, observations[:, :1])
        kept, merge, expand = _split_params(params, used)
        columns_grads = weighted_column_grads(
            lambda p, obs: problem.apply_fn(merge(p), obs), block_steps, multiple
        )
        basis = columns_grads(kept, (observations, actions, weights))  # [N, F, P']
        scores = basis[:, keys.index(score)]  # [N, P]
        sq_norms = jnp.sum(jnp.square(scores), -1)  # [N]

        def coefficients(sub, sub_values, sub_norms):  # one sub-batch -> [E, n, F]
            sub_inputs = estimators_lib.WeightInputs(sub_values, sub_norms)
            rows = []
            for fn in weighted.values():
                c = fn(sub, sub_inputs).coefficients
                zero = jnp.zeros(sub_norms.shape)
                rows.append(jnp.stack([c.get(k, zero) for k in keys], -1))
            return jnp.stack(rows)

        out = {}
        for n, count in sub_batches.items():
            sub = _sub_batches(batch, n, count)  # leaves [count, T, n]
            found = {}
            if weighted:
                sub_values = _sub_batches(values, n, count)
                sub_norms = sq_norms[: count * n].reshape(count, n)
                coefs = jax.vmap(coefficients)(sub, sub_values, sub_norms)
                sub_basis = basis[: count * n].reshape(count, n * len(keys), -1)
                coefs = coefs.reshape(count, len(weighted), n * len(keys))
                est = jnp.einsum("cek,ckp->cep", coefs, sub_basis)
                found = {e: est[:, i] for i, e in enumerate(weighted)}
            sub_scores = scores[: count * n].reshape(count, n, -1)
            for e, fn in weight_fns.items():
                if isinstance(fn, FromScores):
                    found[e] = jax.vmap(fn.fn)(sub, sub_scores)
            out[n] = expand(jnp.stack([found[e] for e in names], 1))
        return out

    return estimates


def _critic_sums(traj: Trajectory, gamma: float) -> jax.Array:
    """Sums over live steps of 1, V, G, V^2, G^2, V G (see :func:`_score_and_rtg`)."""
    live = traj.mask > 0
    values = jnp.where(live, traj.values, 0.0)
    targets = returns_lib.batch_discounted_returns(
        jnp.where(live, traj.rewards, 0.0),
        traj.terminated,
        traj.truncated,
        jnp.where(live, traj.next_values, 0.0),
        gamma,
    )
    targets = jnp.where(live, targets, 0.0)
    f = live.astype(jnp.float32)
    return jnp.stack(
        [
            jnp.sum(f),
            jnp.sum(values),
            jnp.sum(targets),
            jnp.sum(values**2),
            jnp.sum(targets**2),
            jnp.sum(values * targets),
        ]
    )


def critic_calibration(sums: np.ndarray) -> dict[str, float]:
    """Mean V, mean discounted return-to-go and their correlation over live steps."""
    n, v, g, vv, gg, vg = (float(x) for x in sums)
    mean_v, mean_g = v / n, g / n
    var_v, var_g = vv / n - mean_v**2, gg / n - mean_g**2
    cov = vg / n - mean_v * mean_g
    corr = cov / np.sqrt(var_v * var_g) if var_v > 0 and var_g > 0 else float("nan")
    return {"mean_value": mean_v, "mean_return_to_go": mean_g, "correlation": corr}


def block_size(num_trajectories: int, horizon: int, block_steps: int, multiple: int):
    """Trajectories per block: the largest divisor of ``num_trajectories`` that is a
    multiple of ``multiple`` (the device count) with at most ``block_steps`` steps
    (at least ``multiple`` trajectories)."""
    target = max(multiple, block_steps // max(horizon, 1))
    fits = [
        b
        for b in range(multiple, num_trajectories + 1, multiple)
        if num_trajectories % b == 0 and b <= target
    ]
    return max(fits) if fits else num_trajectories


def in_blocks(fn: Callable, block_steps: int, multiple: int = 1) -> Callable:
    """``fn(params, columns) -> leaves [C, ...]`` computed block by block.

    ``columns`` is a pytree of [T, C, ...] leaves. A ``lax.map`` over blocks of
    :func:`block_size` columns keeps each block's activations (``block x T x
    width`` floats per layer) in cache: the layers of a small policy network are
    memory-bound when a whole chunk's activations stream through memory. Column
    c = s * num_blocks + b is row s of block b, so a batch-sharded C (contiguous
    per device) stays sharded inside every block. Results are in column order.
    """

    def blocked(params, columns):
        horizon, num = jax.tree.leaves(columns)[0].shape[:2]
        size = block_size(num, horizon, block_steps, multiple)
        blocks = num // size

        def split(x):  # [T, C, ...] -> [blocks, T, size, ...]
            return jnp.moveaxis(x.reshape(horizon, size, blocks, *x.shape[2:]), 2, 0)

        out = jax.lax.map(lambda c: fn(params, c), jax.tree.map(split, columns))
        return jax.tree.map(
            lambda x: jnp.swapaxes(x, 0, 1).reshape(num, *x.shape[2:]), out
        )

    return blocked


class Runners(NamedTuple):
    """Jitted functions of a study, compiled once and reused for every policy."""

    sample: Callable  # (key, params, n) -> Trajectory, n static
    # (params, traj, out=None) -> (score [C, P], rtg [C, P], R [C], critic sums [6]);
    # out: an earlier call's (score, rtg), donated and written over (required on a
    # mesh, where it is sharded by rows: pass zeros the first time)
    trajectory_grads: Callable
    trajectory_flops: Callable  # (params, traj) -> FLOPs of trajectory_grads
    # (score, rtg, R, group_len) -> ChunkSums, group_len static
    trajectory_sums: Callable
    batch: Callable  # (params, keys [k], b) -> {n: [k, sub-batches, E, P]}
    # (params, batch [T, B], b) -> [B, E', P]: one-column estimates of the
    # per-trajectory estimators among ``names`` (``column_names``)
    column_grads: Callable
    column_names: tuple[str, ...]
    names: tuple[str, ...]
    specs: dict  # name -> rl_pg.estimators.EstimatorSpec
    sub_batches: dict[int, int]  # n -> sub-batches of size n cut from each batch
    problem: Problem
    mesh: Mesh | None = None  # batches and chunk trajectories split across it
    # without a mesh: devices that take the reference chunks in turn, concurrently
    # (see :func:`make_runners`); empty: jit's default placement
    concurrent_devices: tuple = ()


def _flops(jitted: Callable, *args) -> float:
    """XLA's FLOP count of ``jitted(*args)`` (from the lowered HLO: a loop's body
    would be counted once, so count an unblocked version), nan if unknown."""
    analysis = jitted.lower(*args).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"]) if analysis and "flops" in analysis else np.nan


def sub_batch_counts(config: "StudyConfig") -> dict[int, int]:
    """n -> how many disjoint sub-batches of n each top-level batch is cut into:
    all n_max / n of them, capped so that a size has at most
    ``config.max_batches_per_size`` batches (and at least one per top batch)."""
    largest = max(config.batch_sizes)
    cap = max(1, config.max_batches_per_size // config.num_batches)
    return {int(n): min(largest // int(n), cap) for n in config.batch_sizes}


def _sub_batches(batch: Trajectory, n: int, count: int) -> Trajectory:
    """The first ``count`` disjoint column blocks of size n: leaves [count, T, n]."""

    def cut(x):
        x = x[:, : count * n].reshape(x.shape[0], count, n, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(cut, batch)


def make_runners(
    problem: Problem,
    config: "StudyConfig",
    mesh: Mesh | None = None,
    *,
    fast: bool = True,
    concurrent_devices: Sequence[jax.Device] | None = None,
) -> Runners:
    """Build (lazily compiled) jitted functions for ``problem`` and ``config``.

    Batch estimates of the estimators that declare per-step weights
    (``EstimatorSpec.weights``) come from one forward pass and one VJP per sampled
    batch (:func:`score_weight_estimates`); the others (and all of them with
    ``fast=False``) from the gradient of their own loss on every sub-batch, one
    forward and backward pass per (estimator, sub-batch).

    With a ``mesh`` (:func:`rl_pg.distributed.batch_mesh`) the chunk's
    trajectories (``config.chunk`` must be divisible by the device count) and the
    keys of the M batches are split across its devices; params are replicated.

    Without a mesh, the reference sample's chunks go to ``concurrent_devices`` in
    turn: chunk i to device i mod D, D chunks at a time, each sampled and
    differentiated on its device and all dispatched before any is awaited, so
    they run concurrently; their sums are merged on the host in chunk order, so
    the numbers do not depend on D. None: every local CPU device when the CPU
    backend has several (XLA runs one device's gradient loop on about one core;
    the ``rl-pg`` command starts one CPU device per core, see
    :func:`rl_pg.distributed.use_cpu_cores`), else jit's default placement. Each
    device compiles the chunk functions and holds its own chunk and [chunk, P]
    outputs (about 170 MB per device at the full preset). The batch phase stays
    on the default device: its larger products already use
    several cores, and a second device would compile it again (measured: the
    quick preset ran slower).
    """
    G = problem.group_size
    group_len = config.reference_trajectories // config.reference_groups
    bad = [n for n in config.batch_sizes if n % G] + (
        [config.chunk] if config.chunk % G else []
    )
    if bad:
        raise ValueError(
            f"batch sizes and chunk must be multiples of group_size {G}: {bad}"
        )
    if group_len % G or config.chunk % group_len:
        raise ValueError(
            f"a reference group ({config.reference_trajectories} / "
            f"{config.reference_groups} = {group_len} trajectories) must hold whole "
            f"levels of group_size {G} and divide chunk ({config.chunk})"
        )
    distributed.check_divisible(config.chunk, mesh, "chunk")
    estimator_suite(problem, config.suite)  # validate the names before compiling
    multiple = mesh.size if mesh is not None else 1
    block_steps = dense_block_steps = config.block_steps
    if block_steps is None and jax.default_backend() == "cpu":
        block_steps, dense_block_steps = CPU_BLOCK_STEPS, DENSE_CPU_BLOCK_STEPS
    specs = suite_specs(config.suite)
    names = tuple(specs)
    counts = sub_batch_counts(config)
    largest = max(config.batch_sizes)
    shardings = {"sample": {}, "grads": {}, "sums": {}, "batch": {}}
    if mesh is not None:
        whole, rows = distributed.replicated(mesh), distributed.batch_sharding(mesh)
        columns = distributed.batch_sharding(mesh, axis=1)  # Trajectory [T, B]
        shardings = {
            "sample": {"in_shardings": (whole, whole), "out_shardings": columns},
            "grads": {
                "in_shardings": (whole, columns, (rows, rows)),
                "out_shardings": (rows, rows, rows, whole),
            },
            "sums": {"in_shardings": (rows, rows, rows), "out_shardings": whole},
            "batch": {"in_shardings": (whole, rows, whole), "out_shardings": rows},
        }

    weighted = (
        tuple(
            e
            for e in names
            if specs[e].weights is not None or specs[e].from_scores is not None
        )
        if fast
        else ()
    )
    by_loss = tuple(e for e in names if e not in weighted)

    def one(params, key, b):
        batch = problem.sample(key, params, largest)
        out = {n: {} for n in counts}
        if weighted:
            weight_fns = weight_suite(problem, config.suite, constant_b=b)
            fast_estimates = score_weight_estimates(
                problem,
                {e: weight_fns[e] for e in weighted},
                counts,
                block_steps,
                multiple,
            )(params, batch)
            for n, est in fast_estimates.items():
                out[n] |= {e: est[:, i] for i, e in enumerate(weighted)}
        if by_loss:
            suite = estimator_suite(problem, config.suite, constant_b=b)

            def estimates(sub):  # the loss-path estimators on one sub-batch
                return jnp.stack(
                    [flat_gradient(suite[e], params, sub) for e in by_loss]
                )

            for n, count in counts.items():
                est = jax.vmap(estimates)(_sub_batches(batch, n, count))
                out[n] |= {e: est[:, i] for i, e in enumerate(by_loss)}
        return {n: jnp.stack([out[n][e] for e in names], 1) for n in counts}

    column_names = tuple(e for e in names if specs[e].per_trajectory)

    def column_grads(params, batch, b):
        suite = estimator_suite(problem, config.suite, constant_b=b)

        def one(column):  # leaves [T, ...] -> [E', P]
            column = jax.tree.map(lambda x: x[:, None], column)
            return jnp.stack(
                [flat_gradient(suite[e], params, column) for e in column_names]
            )

        return jax.vmap(one, in_axes=1)(batch)

    gamma = config.suite.gamma
    return Runners(
        sample=jax.jit(problem.sample, static_argnums=2, **shardings["sample"]),
        trajectory_grads=jax.jit(
            _score_and_rtg(problem, block_steps, multiple, gamma, dense_block_steps),
            donate_argnums=2,
            **shardings["grads"],
        ),
        trajectory_flops=functools.partial(
            _flops, jax.jit(_score_and_rtg(problem, gamma=gamma))
        ),
        trajectory_sums=jax.jit(chunk_sums, static_argnums=3, **shardings["sums"]),
        batch=jax.jit(jax.vmap(one, in_axes=(None, 0, None)), **shardings["batch"]),
        column_grads=jax.jit(column_grads),
        column_names=column_names,
        names=names,
        specs=specs,
        sub_batches=counts,
        problem=problem,
        mesh=mesh,
        concurrent_devices=_concurrent_devices(mesh, concurrent_devices),
    )


def _concurrent_devices(mesh: Mesh | None, devices: Sequence | None) -> tuple:
    if mesh is not None:
        if devices is not None:
            raise ValueError("concurrent_devices cannot be combined with a mesh")
        return ()
    if devices is None:  # every CPU device if there are several; else as jit places
        cpu = jax.default_backend() == "cpu" and jax.local_device_count() > 1
        return tuple(jax.local_devices()) if cpu else ()
    if not tuple(devices):
        raise ValueError("concurrent_devices must name at least one device")
    return tuple(devices)


def _placements(runners: Runners) -> list[Callable]:
    """One function per concurrent slot putting a pytree where that slot runs: on
    every device of the mesh (replicated), on one of ``concurrent_devices``, or left
    where it is (one slot, jit's default placement)."""
    if runners.mesh is not None:
        return [functools.partial(distributed.replicate, mesh=runners.mesh)]
    if runners.concurrent_devices:
        return [
            functools.partial(jax.device_put, device=d)
            for d in runners.concurrent_devices
        ]
    return [lambda tree: tree]


def _folded_keys(key: jax.Array, count: int):
    """``fold_in(key, i)`` for i < count, on the host (raw keys): handing a slot its
    keys then waits for nothing queued on the default device, so the slots' calls
    really overlap."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count))
    return (
        keys
        if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
        else np.asarray(keys)
    )


def trajectory_moments(
    params: Any,
    runners: Runners,
    key: jax.Array,
    num_trajectories: int,
    chunk: int,
    num_groups: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[TrajectoryMoments, dict[str, float]]:
    """Accumulate per-trajectory gradient moments over ``num_trajectories``.

    Also keeps, per reference group of ``num_trajectories / num_groups``
    consecutive trajectories (whole levels), sum R s and sum s, and the critic's
    calibration sums (``moments.sums["critic"]``). Chunk i is sampled from
    ``fold_in(key, i)``; without a mesh, ``runners.concurrent_devices`` take the
    chunks in turn and run concurrently (the same numbers for any number of them).

    Returns the moments and timing of the gradient phase (rollouts excluded):
    trajectory gradients per second (a score and a reward-to-go gradient per
    trajectory) and FLOP/s from XLA's cost analysis of the gradient computation
    (of the whole machine with ``concurrent_devices``; per device on a mesh).
    """
    if num_trajectories % chunk:
        raise ValueError(
            f"chunk ({chunk}) must divide num_trajectories ({num_trajectories})"
        )
    group_len = num_trajectories // num_groups
    mesh = runners.mesh
    distributed.check_divisible(chunk, mesh, "chunk")
    put = _placements(runners)
    on = [p(params) for p in put]  # params where each slot runs
    buffers, compiled = [None] * len(put), [None] * len(put)
    moments = TrajectoryMoments()
    grad_seconds, flops = 0.0, float("nan")
    calls = num_trajectories // chunk
    chunk_keys = _folded_keys(key, calls)
    for first in range(0, calls, len(put)):
        wave = range(len(put))[: calls - first]  # chunk first + d in slot d
        keys = [put[d](chunk_keys[first + d]) for d in wave]
        trajs = jax.block_until_ready(
            [runners.sample(keys[d], on[d], chunk) for d in wave]
        )
        for d in wave:
            if compiled[d] is None:  # [chunk, P] outputs, then reused (donated)
                zeros = jnp.zeros((chunk, ravel_pytree(params)[0].size), jnp.float32)
                buffers[d] = (
                    put[d]((zeros, zeros + 0))
                    if mesh is None
                    else distributed.shard((zeros, zeros + 0), mesh)
                )
                compiled[d] = runners.trajectory_grads.lower(
                    on[d], trajs[d], buffers[d]
                ).compile()
        if first == 0:  # FLOPs of the whole (unsharded) computation, per device
            flops = runners.trajectory_flops(on[0], trajs[0])
            flops /= mesh.size if mesh else 1
        start = time.perf_counter()
        outs = jax.block_until_ready(
            [compiled[d](on[d], trajs[d], buffers[d]) for d in wave]
        )
        grad_seconds += time.perf_counter() - start
        del trajs
        found = []
        for d in wave:
            buffers[d] = outs[d][:2]
            score, rtg_grads, ret, _ = outs[d]
            found.append(runners.trajectory_sums(score, rtg_grads, ret, group_len))
        for d in wave:  # merged in chunk order
            sums_d = distributed.gather(found[d])
            sums, group_R_s, group_s = sums_d.raw_sums()
            sums["critic"] = np.asarray(distributed.gather(outs[d][3]), np.float64)
            moments.merge(
                chunk,
                {"reward_to_go": sums_d.rtg_mean},
                {"reward_to_go": sums_d.rtg_m2},
                sums,
            )
            moments.group_R_s += list(group_R_s)
            moments.group_s += list(group_s)
            moments.group_count += [group_len] * len(group_s)
            if progress is not None:
                progress(chunk)
        del outs, found
    perf = {
        "trajectory_gradients_per_s": 2 * num_trajectories / grad_seconds,
        "gradient_flops_per_s": flops * calls / grad_seconds,
        "gradient_seconds": grad_seconds,
        # devices at work at once, and whether FLOP/s are per device (a mesh)
        "gradient_devices": mesh.size if mesh is not None else min(len(put), calls),
        "gradient_flops_per_device": mesh is not None,
    }
    return moments, perf


# ------------------------------------------------------------ batch estimates


def batch_estimates(
    params: Any,
    runners: Runners,
    key: jax.Array,
    num_batches: int,
    batches_per_call: int,
    constant_b: float,
    progress: Callable[[int], None] | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    """Estimates per batch size and estimator, common random numbers.

    Top-level batch m (of the largest size) is sampled from ``fold_in(key, m)``,
    so it is the same for every estimator and batch size (and does not depend
    on how batches are chunked or sharded); size n's estimates are those of its
    sub-batches, ordered by top batch: ``{n: {name: [M * sub_batches[n], P]}}``.
    With ``runners.mesh`` each call's batches are split across the devices;
    ``batches_per_call`` is rounded up to a multiple of their number.
    """
    b = jnp.float32(constant_b)
    mesh = runners.mesh
    if mesh is not None:
        batches_per_call = -(-batches_per_call // mesh.size) * mesh.size
        params, b = distributed.replicate((params, b), mesh)
    out = []
    for start in range(0, num_batches, batches_per_call):
        idx = jnp.arange(start, min(start + batches_per_call, num_batches))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
        if len(idx) < batches_per_call:  # keep one compiled shape
            pad = batches_per_call - len(idx)
            keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad, axis=0)])
        if mesh is not None:
            keys = distributed.shard(keys, mesh)
        result = distributed.gather(runners.batch(params, keys, b))
        out.append({n: np.asarray(v)[: len(idx)] for n, v in result.items()})
        if progress is not None:
            progress(len(idx))
    estimates = {}
    for n in runners.sub_batches:
        stacked = np.concatenate([o[n] for o in out])  # [M, S, E, P]
        flat = stacked.reshape(-1, *stacked.shape[2:])  # [M * S, E, P]
        estimates[n] = {name: flat[:, i] for i, name in enumerate(runners.names)}
    return estimates


# ---------------------------------------------------------------- the study


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Sizes of one study (see the presets in :mod:`rl_pg.variance.report`).

    ``num_batches`` top-level batches of the largest size; each smaller size n
    gets up to ``num_batches * max(batch_sizes) / n`` sub-batches, capped at
    ``max_batches_per_size``. The reference is kept as ``reference_groups``
    group means of whole levels.
    """

    batch_sizes: tuple[int, ...] = (4, 16, 64, 256, 1024)
    num_batches: int = 128
    max_batches_per_size: int = 1024
    reference_trajectories: int = 131_072
    reference_groups: int = 128
    chunk: int = 2048
    steps_per_call: int = 2**14  # trajectory steps per vmapped batch call (cache-sized)
    # Trajectory steps per cache-sized gradient block; None: 2048 on CPU (where
    # blocking made the gradient phase 3-4x faster; 512 for a dense policy's
    # gradient phase), no blocking on accelerators.
    block_steps: int | None = None
    seed: int = 0
    suite: SuiteConfig = SuiteConfig()

    def __post_init__(self):
        problems = []
        sizes = tuple(int(n) for n in self.batch_sizes)
        if not sizes or any(n < 1 for n in sizes):
            problems.append(f"batch_sizes must be positive, got {self.batch_sizes}")
        elif any(max(sizes) % n for n in sizes):
            problems.append(
                f"every batch size must divide the largest, got {self.batch_sizes}"
            )
        if self.num_batches < 4:
            problems.append(f"num_batches must be >= 4, got {self.num_batches}")
        if self.max_batches_per_size < self.num_batches:
            problems.append(
                f"max_batches_per_size ({self.max_batches_per_size}) must be >= "
                f"num_batches ({self.num_batches})"
            )
        if self.reference_groups < 4:
            problems.append(
                f"reference_groups must be >= 4, got {self.reference_groups}"
            )
        if self.reference_trajectories < 2 or self.chunk < 1:
            problems.append("reference_trajectories >= 2 and chunk >= 1 required")
        elif self.reference_trajectories % self.chunk:
            problems.append(
                f"chunk ({self.chunk}) must divide reference_trajectories "
                f"({self.reference_trajectories})"
            )
        elif self.reference_trajectories % self.reference_groups:
            problems.append(
                f"reference_groups ({self.reference_groups}) must divide "
                f"reference_trajectories ({self.reference_trajectories})"
            )
        if self.block_steps is not None and self.block_steps < 1:
            problems.append(f"block_steps must be >= 1, got {self.block_steps}")
        if problems:
            raise ValueError("Invalid StudyConfig: " + "; ".join(problems))


def reference_gradient(moments: TrajectoryMoments) -> tuple[np.ndarray, np.ndarray]:
    """The "true" gradient as K group means Y_k [K, P] (g_ref = their mean) and
    g_ref itself.

    Y_k = (1/n_k) sum_{i in k} (R_i - b) s_i with b = the whole sample's mean
    return: REINFORCE with the mean-return baseline, whose per-trajectory variance
    is a few percent of plain REINFORCE's on Flappy Bird, so the reference is
    several times more precise for the same N. Using the sample's own mean adds a
    bias of order 1/N (-Cov(R, s) / N), far below the standard error. Groups hold
    whole levels, so the G correlated rollouts of a level stay in one group and
    se_ref^2 = tr S_Y / K (see :mod:`rl_pg.variance.statistics`) treats levels as
    clusters; treating trajectories as independent would understate it by the
    factor 1 + (G - 1) rho.
    """
    b = moments.sums["R"] / moments.count
    count = np.asarray(moments.group_count, np.float64)[:, None]
    groups = (np.stack(moments.group_R_s) - b * np.stack(moments.group_s)) / count
    return groups, groups.mean(0)


class StageResult(NamedTuple):
    rows: list[dict]  # one per (estimator, batch size)
    per_trajectory: dict[str, float]  # per-trajectory tr Var by estimator/baseline
    slopes: dict[str, tuple[float, float, float]]  # estimator -> slope, lo, hi
    critic: dict[str, float]  # critic calibration (critic_calibration)
    reference_norm: float
    reference_se: float
    mean_return: float
    perf: dict[str, float]


def _rows_for_size(n, estimates, groups, exact, units):
    """Result rows of one batch size, and each estimator's variance replicates."""
    rows, replicates = [], {}
    for name, E in estimates.items():
        X = np.asarray(E, np.float64)
        gram = X @ X.T
        stats = statistics.summarize(X, groups, gram=gram)
        replicates[name] = _variance_by_unit(gram, units)
        rows.append(
            {
                "estimator": name,
                "batch_size": n,
                "num_batches": E.shape[0],
                **{k: v for k, v in stats.items() if k != "mean_norm2"},
                **{f"exact_{k}": v for k, v in exact.get(name, {}).items()},
            }
        )
    return rows, replicates


def _variance_by_unit(gram: np.ndarray, units: np.ndarray) -> np.ndarray:
    """tr S of the rows of E from their Gram matrix E E^T, then with each top-level
    unit's rows deleted (for slopes)."""
    labels = np.unique(units)
    w = np.vstack([np.ones(len(units)), units[None, :] != labels[:, None]])
    n = w.sum(1)
    mean_sq = np.sum((w @ gram) * w, axis=1) / n**2
    return (w @ np.diag(gram) - n * mean_sq) / (n - 1)


def study_stage(
    params: Any,
    runners: Runners,
    config: StudyConfig,
    horizon: int,
    progress: Callable[[int], None] | None = None,
) -> StageResult:
    """The whole study for one policy (``runners`` from :func:`make_runners`)."""
    key = jax.random.PRNGKey(config.seed)
    key_ref, key_batches = jax.random.split(key)
    moments, perf = trajectory_moments(
        params,
        runners,
        key_ref,
        config.reference_trajectories,
        config.chunk,
        config.reference_groups,
        progress,
    )
    groups, g = reference_gradient(moments)
    mean_return = float(moments.sums["R"] / moments.count)
    largest = max(config.batch_sizes)
    per_call = min(
        config.num_batches, max(1, config.steps_per_call // (largest * horizon))
    )
    start = time.perf_counter()
    estimates = batch_estimates(
        params,
        runners,
        key_batches,
        config.num_batches,
        per_call,
        constant_b=mean_return,
        progress=(lambda m: progress(m * largest)) if progress else None,
    )
    problem = runners.problem
    exact = {}
    if problem.exact is not None:

        def column_grads(batch):
            b = jnp.float32(mean_return)
            y = np.asarray(runners.column_grads(params, batch, b), np.float64)
            return {name: y[:, i] for i, name in enumerate(runners.column_names)}

        exact = problem.exact(params, column_grads, config.batch_sizes, runners.specs)
    rows, replicates = [], {}
    for n in config.batch_sizes:
        units = np.repeat(np.arange(config.num_batches), runners.sub_batches[n])
        size_rows, size_reps = _rows_for_size(
            n, estimates[n], groups, exact.get(n, {}), units
        )
        rows += size_rows
        for name, reps in size_reps.items():
            replicates.setdefault(name, []).append(reps)
    slopes = {}
    if len(config.batch_sizes) >= 2:
        for name, reps in replicates.items():
            slopes[name] = statistics.log_slope(
                config.batch_sizes, np.stack(reps, axis=1)
            )
    perf["batch_phase_seconds"] = time.perf_counter() - start
    per_traj = moments.baseline_variances()
    per_traj["reward_to_go"] = moments.trace_variance("reward_to_go")
    se = float(rows[0]["se_ref"]) if rows else float("nan")
    return StageResult(
        rows,
        per_traj,
        slopes,
        critic_calibration(moments.sums["critic"]),
        float(np.linalg.norm(g)),
        se,
        mean_return,
        perf,
    )


@functools.cache
def matmul_flops_per_s(size: int = 1024, repeats: int = 20) -> float:
    """The same-run compute ceiling: FLOP/s of a float32 ``size``^2 matmul."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def total_work(config: StudyConfig, num_stages: int) -> int:
    """Trajectories the study samples (for a progress bar)."""
    per_stage = config.reference_trajectories + config.num_batches * max(
        config.batch_sizes
    )
    return per_stage * num_stages


def sequence_arg(values: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)
