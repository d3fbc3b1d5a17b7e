"""The policy-lag study: estimators on data from a behaviour mu, measured against
grad J at a target pi_theta (issue 22; REFERENCE.md section 13).

For each stage (the behaviour mu = the checkpoint) and each target theta
(:func:`rl_pg.variance.lag.targets_at_kl` at the job's KL levels, or checkpoint
t + K of a run with ``lag_checkpoints``):

1. the reference gradient is the on-policy gradient of J at theta: the study's
   moments phase (:func:`rl_pg.variance.study.trajectory_moments`) with
   params = theta, sampled from pi_theta, levels as clusters;
2. M top-level batches are sampled from mu (the same keys at every target:
   common random numbers) and cut into sub-batches of every size as in the
   on-policy study; each estimator is evaluated at theta on each sub-batch
   (:func:`lag_batch_fn`): its declared per-step weights with the ratios
   rho_t = pi_theta / mu computed on that sub-batch (a clipped estimator's
   clipped steps depend on the batch), then one VJP of log pi_theta. Both log mu
   and log pi_theta come from one vmapped forward pass over the stacked params,
   so at theta = mu every ratio is exactly 1 and each importance-weighted row
   equals its on-policy counterpart bit for bit (trajectory_is = reinforce,
   per_decision_is = truncated_is = naive, ppo_dual_clip = ppo_clip, gspo = grpo);
3. rows: the study's statistics against the target's reference, plus the
   diagnostics ``lag_kl`` (mean per-step KL(mu || pi) on the study's batches from
   mu, exact over actions), ``ess`` and ``ess_step`` (Kish ESS of the trajectory
   and per-step weights, mean over the sub-batches of a size), ``max_ratio`` and
   ``clip_fraction`` (clipped or truncated steps; nan for estimators that do not
   clip), and in exact mode ``exact_*`` of every per-trajectory estimator by
   enumerating trajectories under mu (:func:`rl_pg.variance.lag.off_policy_columns`).

The outputs are written by :mod:`rl_pg.variance.lag_report`.
"""

import dataclasses
import functools
import inspect
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rl_pg import estimators as estimators_lib
from rl_pg import io, policies
from rl_pg.variance import exact, kernels, lag, lag_report, runners, stages, study
from rl_pg.variance.moments import reference_gradient
from rl_pg.variance.problems import (
    Problem,
    estimator_suite,
    flat_gradient,
    suite_specs,
)
from rl_pg.variance.problems import _suite_kwargs as suite_kwargs


class LagPoint(NamedTuple):
    """One (behaviour, target) pair of the study."""

    behaviour: stages.Stage  # mu
    target: Any  # pi_theta's params
    target_label: str  # kl_0.01, or the target checkpoint's label
    level: float  # the KL level asked for (nan with lag_checkpoints)
    search: lag.LagTarget | None = None  # how the target was found (--lag-kl)
    lag_checkpoints: int | None = None


class PointResult(NamedTuple):
    """The study of one :class:`LagPoint`."""

    point: LagPoint
    rows: list[dict]  # one per (estimator, batch size)
    staleness: dict  # the point's staleness diagnostics (staleness.csv)


# ------------------------------------------------------------------- targets


def lag_points(job, found: list[stages.Stage]) -> list[LagPoint]:
    """The job's (behaviour, target) pairs: every stage at every KL level
    (``job.lag_kl``), or checkpoint t -> t + K (``job.lag_checkpoints``)."""
    if job.lag_checkpoints is not None:
        k = job.lag_checkpoints
        return [
            LagPoint(
                found[t], found[t + k].params, found[t + k].label, math.nan, None, k
            )  # fmt: skip
            for t in range(len(found) - k)
        ]
    suite = job.study.suite
    config = lag.LagConfig(gamma=suite.gamma, lam=suite.lam)
    key = jax.random.fold_in(jax.random.PRNGKey(job.seed), 2**21)
    points = []
    for i, stage in enumerate(found):
        targets = lag.targets_at_kl(
            jax.random.fold_in(key, i),
            stage.params,
            stage.problem.apply_fn,
            stage.problem.sample,
            job.lag_kl,
            config,
        )
        points += [
            LagPoint(stage, t.params, lag.target_name(t.level), t.level, t)
            for t in targets
        ]
    return points


def save_targets(out: Path, points: list[LagPoint]) -> None:
    """Each ``--lag-kl`` target as a checkpoint (``lag_targets/<stage>/kl_<level>``,
    :func:`rl_pg.variance.lag.save_target`); a stage without a checkpoint (the
    enumerable MDP, a fresh policy) gets its target's params as ``params.npz``."""
    for p in points:
        if p.search is None:
            continue  # a run's own checkpoint
        directory = out / "lag_targets" / p.behaviour.label / p.target_label
        path = p.behaviour.description.get("path")
        meta = dict(lag_level=p.level, lag_step=p.search.step)
        if path:
            lag.save_target(directory, p.target, path, kl=p.search.kl,
                            max_ratio=p.search.max_ratio, **meta)  # fmt: skip
            continue
        directory.mkdir(parents=True, exist_ok=True)
        flat = {"/".join(map(str, k)): np.asarray(v) for k, v in _leaves(p.target)}
        np.savez(directory / "params.npz", **flat)
        io.write_json(directory / "meta.json", {"lag_kl": p.search.kl, **meta})


def _leaves(tree) -> list:
    return [
        (tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


# ------------------------------------------------------------ batch estimates


def _log_probs(apply_fn: Callable, mu, pi, batch):
    """log mu and log pi of the taken actions [T, B], pi's values [T, B] and the
    per-state KL(mu || pi) [T, B], from one forward pass over the stacked params
    (so equal params give bit-equal log-probs)."""
    obs, actions, mask = lag._clean(batch)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), mu, pi)
    logits, values = jax.vmap(lambda p: apply_fn(p, obs))(both)
    taken = jax.vmap(lambda lg: policies.log_prob(lg, actions))(logits)
    log_all = jax.nn.log_softmax(logits, axis=-1)
    mu_all = jnp.exp(log_all[0])
    kl = jnp.sum(
        jnp.where(mu_all > 0, mu_all * (log_all[0] - log_all[1]), 0.0), axis=-1
    )
    live = mask > 0
    zero = functools.partial(jnp.where, live)
    return zero(taken[0], 0.0), zero(taken[1], 0.0), values[1], zero(kl, 0.0)


def _declarations(problem: Problem, suite, b) -> dict:
    """name -> (declare, its hyperparameters, score_norms, clips) for the
    estimators built by ``surrogate_loss``; name -> None for the others."""
    out = {}
    for name, (spec, kwargs) in suite_kwargs(problem, suite, b).items():
        weighting = getattr(spec.loss, "weighting", None)
        if weighting is None:
            out[name] = None
            continue
        declare, _, score_norms = weighting
        own = [
            p.name
            for p in inspect.signature(declare).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name in kwargs
        ]
        hp = {k: kwargs[k] for k in own}
        out[name] = (declare, hp, score_norms, not spec.unbiased_off_policy)
    return out


def _sub_estimates(problem, declared, losses, pi, sub, log_pi, values):
    """[E, P] estimates at pi on one sub-batch from mu (log_probs = log mu) and
    [E] clip fractions (nan for estimators that do not clip)."""
    mask = sub.mask.astype(jnp.float32)
    norms = jnp.zeros(mask.shape[1:])
    if any(d is not None and d[2] for d in declared.values()):
        scores = estimators_lib.trajectory_scores(pi, sub, problem.apply_fn)
        norms = jnp.sum(jnp.square(scores), axis=1)
    inputs = estimators_lib.WeightInputs(values, norms, log_pi)
    weights, clips = {}, {}
    for name, d in declared.items():
        if d is None:
            continue
        declare, hp, _, clips_ratio = d
        s = declare(sub, inputs, **hp)
        weights[name] = jnp.where(mask > 0, s.weights.dense(), 0.0)
        clipping = clips_ratio and isinstance(s.clip_fraction, jax.Array)
        clips[name] = s.clip_fraction if clipping else jnp.float32(jnp.nan)
    grads = {}
    if weights:
        obs, actions, _ = lag._clean(sub)

        def log_pi_of(p):
            return jnp.where(
                mask > 0, policies.log_prob(problem.apply_fn(p, obs)[0], actions), 0.0
            )

        _, vjp = jax.vjp(log_pi_of, pi)
        stacked = jnp.stack(list(weights.values()))
        # one backward pass per estimator (lax.map: the same computation for each,
        # so equal weights give bit-equal gradients)
        found = jax.lax.map(lambda w: ravel_pytree(vjp(w)[0])[0], stacked)
        grads = dict(zip(weights, found, strict=True))
    for name in declared:
        if name not in grads:  # no declared weights: the loss's own gradient
            grads[name] = flat_gradient(losses[name], pi, sub)
            clips[name] = jnp.float32(jnp.nan)
    names = list(declared)
    return jnp.stack([grads[e] for e in names]), jnp.stack([clips[e] for e in names])


def _diagnostics(sub, log_mu, log_pi) -> jax.Array:
    """[3]: Kish ESS of the trajectory weights, of the per-step weights and the
    largest log ratio of one sub-batch."""
    mask = sub.mask
    log_rho = jnp.where(mask > 0, log_pi - log_mu, 0.0)
    return jnp.stack(
        [
            lag.kish_ess_log(jnp.sum(log_rho, axis=0)),
            lag.kish_ess_log(log_rho, mask),
            jnp.max(jnp.where(mask > 0, log_rho, -jnp.inf)),
        ]
    )


def lag_batch_fn(problem: Problem, config: study.StudyConfig) -> Callable:
    """``(mu, pi, key, b) -> ({n: (estimates [S, E, P], clip [S, E], diagnostics
    [S, 3])}, kl sums [2])``: one batch of max(batch_sizes) sampled from mu with
    ``key``, every estimator of ``config.suite`` at pi on each of its sub-batches."""
    counts = runners.sub_batch_counts(config)
    largest = max(config.batch_sizes)

    def one(mu, pi, key, b):
        batch = problem.sample(key, mu, largest)
        log_mu, log_pi, values, kl = _log_probs(problem.apply_fn, mu, pi, batch)
        batch = batch._replace(log_probs=log_mu)
        declared = _declarations(problem, config.suite, b)
        losses = estimator_suite(problem, config.suite, constant_b=b)
        estimate = functools.partial(_sub_estimates, problem, declared, losses, pi)
        out = {}
        for n, count in counts.items():
            cut = functools.partial(_cut, n=n, count=count)
            subs = kernels.cut_sub_batches(batch, n, count)
            est, clip = jax.vmap(estimate)(subs, cut(log_pi), cut(values))
            diag = jax.vmap(_diagnostics)(subs, cut(log_mu), cut(log_pi))
            out[n] = (est, clip, diag)
        return out, jnp.stack([jnp.sum(kl), jnp.sum(batch.mask)])

    return one


def _cut(x: jax.Array, n: int, count: int) -> jax.Array:
    """[T, B] -> [count, T, n] (``kernels.cut_sub_batches`` of one array)."""
    x = x[:, : count * n].reshape(x.shape[0], count, n)
    return jnp.moveaxis(x, 1, 0)


@functools.cache
def _compiled_batch(problem: Problem, config: study.StudyConfig) -> Callable:
    """The jitted, key-vmapped :func:`lag_batch_fn` (one per problem and sizes)."""
    return jax.jit(
        jax.vmap(lag_batch_fn(problem, config), in_axes=(None, None, 0, None))
    )


def lag_estimates(mu, pi, problem: Problem, config, key, per_call: int, b: float):
    """Estimates, clip fractions and diagnostics of every size (sub-batches in
    top-batch order, as :func:`rl_pg.variance.study.batch_estimates`), and the
    mean per-step KL(mu || pi) over every batch."""
    fn = _compiled_batch(problem, dataclasses.replace(config, seed=0))
    M, parts, kl = config.num_batches, [], np.zeros(2)
    for start in range(0, M, per_call):
        idx = jnp.arange(start, min(start + per_call, M))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
        pad = per_call - len(idx)
        if pad:  # keep one compiled shape
            keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad, axis=0)])
        out, sums = jax.device_get(fn(mu, pi, keys, jnp.float32(b)))
        kl += np.asarray(sums, np.float64)[: len(idx)].sum(0)
        parts.append(
            {n: [np.asarray(a)[: len(idx)] for a in v] for n, v in out.items()}
        )
    names = tuple(suite_specs(config.suite))
    estimates, clips, diags = {}, {}, {}
    for n in parts[0]:
        est, clip, diag = (np.concatenate([p[n][j] for p in parts]) for j in range(3))
        est = est.reshape(-1, *est.shape[2:])
        clip = clip.reshape(-1, clip.shape[-1])
        estimates[n] = {e: est[:, i] for i, e in enumerate(names)}
        clips[n] = {e: clip[:, i] for i, e in enumerate(names)}
        diags[n] = diag.reshape(-1, 3)
    return estimates, clips, diags, float(kl[0] / max(kl[1], 1.0))


# ---------------------------------------------------------------- exact mode


@functools.cache
def _exact_suite(problem: Problem, suite, b: float) -> dict:
    """The per-trajectory estimators' losses (cached: one compile per loss)."""
    specs = suite_specs(suite)
    losses = estimator_suite(problem, suite, constant_b=b)
    return {e: losses[e] for e, s in specs.items() if s.per_trajectory}


def exact_lag_values(point: LagPoint, suite, batch_sizes, b: float) -> dict:
    """n -> name -> exact metric (``exact.EXACT_METRICS``) of every per-trajectory
    estimator on mu's data at the target, by enumeration: mean = sum_tau p_mu(tau)
    y(tau), the grouped batch variance of y, bias2 = ||mean - grad J(theta)||^2
    with grad J(theta) the exact gradient at the target (nan for the others)."""
    problem = point.behaviour.problem
    g = lag.exact_gradient(point.target)
    out = {int(n): {} for n in batch_sizes}
    takes_b = any(
        "b" in estimators_lib.hyperparameters(s.loss)
        for s in suite_specs(suite).values()
    )  # only then do the losses depend on b (else: one compile for every target)
    for name, loss in _exact_suite(
        problem, suite, float(b) if takes_b else 0.0
    ).items():
        y, probs, s0 = lag.off_policy_columns(
            point.behaviour.params, point.target, loss
        )
        mean = probs @ y
        for n in out:
            var = exact.grouped_batch_variance(y, probs, s0, n, problem.group_size)
            out[n][name] = exact._exact_metrics(mean, g, var)
    for name in suite_specs(suite):
        for n in out:
            out[n].setdefault(name, dict.fromkeys(exact.EXACT_METRICS, np.nan))
    return out


# ------------------------------------------------------------------- a point


def study_point(point: LagPoint, built: runners.Runners, job) -> PointResult:
    """The study of one (behaviour, target) pair: reference at the target, batch
    estimates from mu at the target, rows with diagnostics."""
    config, stage = job.study, point.behaviour
    key_ref, key_batches = jax.random.split(jax.random.PRNGKey(config.seed))
    moments, _ = study.trajectory_moments(
        point.target, built, key_ref, config.reference_trajectories,
        config.chunk, config.reference_groups,
    )  # fmt: skip
    groups, g = reference_gradient(moments)
    b = float(moments.sums["R"] / moments.count)
    largest = max(config.batch_sizes)
    per_call = min(
        config.num_batches, max(1, config.steps_per_call // (largest * stage.horizon))
    )
    estimates, clips, diags, kl = lag_estimates(
        stage.params, point.target, stage.problem, config, key_batches, per_call, b
    )
    exact_ = {}
    if job.problem == "enumerable":
        exact_ = exact_lag_values(point, config.suite, config.batch_sizes, b)
    rows, _ = study._rows_and_slopes(config, built, estimates, groups, exact_)
    norm2 = float(g @ g)
    max_ratio = float(np.exp(max(np.max(d[:, 2]) for d in diags.values())))
    for r in rows:
        n, name = r["batch_size"], r["estimator"]
        r |= {
            "target": point.target_label,
            "lag_level": point.level,
            "lag_kl": kl,
            "ess": float(np.mean(diags[n][:, 0])),
            "ess_step": float(np.mean(diags[n][:, 1])),
            "max_ratio": max_ratio,
            "clip_fraction": float(np.mean(clips[n][name])),
            "reference_norm2": norm2,
        }
        if point.lag_checkpoints is not None:
            r["lag_checkpoints"] = point.lag_checkpoints
    d = diags[largest]
    staleness = {
        "checkpoint": stage.label,
        "target": point.target_label,
        "lag_level": point.level,
        "lag_kl": kl,
        "search_kl": point.search.kl if point.search else np.nan,
        "step": point.search.step if point.search else np.nan,
        "max_ratio": max_ratio,
        "ess": float(np.mean(d[:, 0])),
        "ess_step": float(np.mean(d[:, 1])),
        "batch_size": largest,
        "reference_norm": math.sqrt(norm2),
        "mean_return": b,
    }
    return PointResult(point, rows, staleness)


def run(job, found: list[stages.Stage], out_dir, progress: bool = True) -> Path:
    """The lag study of ``job`` (``job.lag_kl`` or ``job.lag_checkpoints``) on the
    stages ``found``, written into the new directory ``out_dir``."""
    if job.devices is not None:
        raise ValueError("the lag study runs on one device; drop --devices")
    if job.decompose is not None:
        raise ValueError("--decompose is not part of the lag study; drop it")
    built = {}
    for s in found:  # stages of one key share runners, problem and apply_fn
        if s.key not in built:
            built[s.key] = runners.shared_runners(s.problem, job.study)
    found = [s._replace(problem=built[s.key].problem) for s in found]
    start = time.perf_counter()
    points = lag_points(job, found)
    search_seconds = time.perf_counter() - start
    with io.owned_output(out_dir, "rl-pg variance") as out:  # removed if it dies
        io.write_config(out, job.to_dict({s.label: s.description for s in found}))
        save_targets(out, points)
        results = [
            _study_point_logged(i, point, built, job, len(points), progress)
            for i, point in enumerate(points)
        ]
        wall = time.perf_counter() - start
        lag_report.write(out, results, job, wall, search_seconds)
    return out


def _study_point_logged(i, point, built, job, total: int, progress: bool):
    if progress:
        print(
            f"lag study {i + 1}/{total}: {point.behaviour.label} -> "
            f"{point.target_label}",
            flush=True,
        )
    return study_point(point, built[point.behaviour.key], job)
