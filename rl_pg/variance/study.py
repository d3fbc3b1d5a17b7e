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

Modules: :mod:`~rl_pg.variance.problems` (problems, estimator suites),
:mod:`~rl_pg.variance.moments` (reference sums), :mod:`~rl_pg.variance.kernels`
and :mod:`~rl_pg.variance.runners` (jitted functions, devices); this module holds
the phases (:func:`trajectory_moments`, :func:`batch_estimates`) and
:func:`study_stage`, the study of one policy.
"""

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rl_pg import distributed
from rl_pg.variance import statistics
from rl_pg.variance.moments import (
    TrajectoryMoments,
    critic_calibration,
    reference_gradient,
)
from rl_pg.variance.problems import SuiteConfig
from rl_pg.variance.runners import Runners, folded_keys, placements

METRICS = statistics.METRICS


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
    put = placements(runners)
    on = [p(params) for p in put]  # params where each slot runs
    buffers, compiled = [None] * len(put), [None] * len(put)
    moments = TrajectoryMoments()
    grad_seconds, flops = 0.0, float("nan")
    calls = num_trajectories // chunk
    chunk_keys = folded_keys(key, calls)
    for first in range(0, calls, len(put)):
        wave = range(len(put))[: calls - first]  # chunk first + d in slot d
        keys = [put[d](chunk_keys[first + d]) for d in wave]
        trajs = jax.block_until_ready(
            [runners.sample(keys[d], on[d], chunk) for d in wave]
        )
        for d in wave:
            if compiled[d] is None:  # [chunk, P] outputs, then reused (donated)
                buffers[d] = _output_buffers(put[d], mesh, chunk, params)
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
        for d in wave:
            buffers[d] = outs[d][:2]
        _merge_wave(moments, runners, outs, chunk, group_len, progress)
        del outs
    perf = {
        "trajectory_gradients_per_s": 2 * num_trajectories / grad_seconds,
        "gradient_flops_per_s": flops * calls / grad_seconds,
        "gradient_seconds": grad_seconds,
        # devices at work at once, and whether FLOP/s are per device (a mesh)
        "gradient_devices": mesh.size if mesh is not None else min(len(put), calls),
        "gradient_flops_per_device": mesh is not None,
    }
    return moments, perf


def _output_buffers(put: Callable, mesh, chunk: int, params: Any):
    """Zeroed (score, rtg) [chunk, P] buffers where a slot runs (donated, then
    written over by every call)."""
    zeros = jnp.zeros((chunk, ravel_pytree(params)[0].size), jnp.float32)
    if mesh is None:
        return put((zeros, zeros + 0))
    return distributed.shard((zeros, zeros + 0), mesh)


def _merge_wave(moments, runners, outs, chunk, group_len, progress) -> None:
    """Reduce each slot's gradients to :class:`ChunkSums` (all dispatched first),
    then merge them into ``moments`` in chunk order."""
    found = [
        runners.trajectory_sums(score, rtg_grads, ret, group_len)
        for score, rtg_grads, ret, _ in outs
    ]
    for sums_d, out in zip(found, outs, strict=True):
        sums_d = distributed.gather(sums_d)
        sums, group_R_s, group_s = sums_d.raw_sums()
        sums["critic"] = np.asarray(distributed.gather(out[3]), np.float64)
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
    return timed_batch_estimates(
        params, runners, key, num_batches, batches_per_call, constant_b, progress
    )[0]


# Calls per device below which the batch phase stays on one device: each device
# compiles the batch function again (4-5 s at the quick preset's sizes, which has
# 16 calls per stage and ran slower end to end when dealt; 12-14 s at the full
# preset's, 128 calls per stage).
MIN_DEALT_CALLS = 32


def timed_batch_estimates(
    params, runners, key, num_batches, batches_per_call, constant_b, progress=None
) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, float]]:
    """:func:`batch_estimates` and the timing of its batch calls (compiled first;
    host transfers excluded): ``batch_call_seconds`` and ``batch_flops_per_s``,
    XLA's FLOP count of the estimates (sampling excluded, per device on a mesh)
    x batches / seconds.

    Without a mesh, calls go to ``runners.concurrent_devices`` in turn (call j to
    slot j mod D), a round of D dispatched before any is awaited, as the
    gradient phase's chunks: the same keys per batch index, so the same numbers.
    With fewer than ``MIN_DEALT_CALLS`` calls per device they stay on the first.
    """
    mesh = runners.mesh
    if mesh is not None:
        batches_per_call = -(-batches_per_call // mesh.size) * mesh.size
    starts = range(0, num_batches, batches_per_call)
    put = placements(runners)
    put = put if len(starts) >= MIN_DEALT_CALLS * len(put) else put[:1]
    on = [p((params, jnp.float32(constant_b))) for p in put]
    keys = folded_keys(key, num_batches)
    out, compiled, seconds = [], [None] * len(put), 0.0
    for first in range(0, len(starts), len(put)):
        wave = starts[first : first + len(put)]  # call first + d in slot d
        args = [
            (on[d][0], _call_keys(keys, s, batches_per_call, put[d], mesh), on[d][1])
            for d, s in enumerate(wave)
        ]
        for d in range(len(wave)):
            if compiled[d] is None:
                compiled[d] = runners.batch.lower(*args[d]).compile()
        begin = time.perf_counter()
        results = jax.block_until_ready(
            [compiled[d](*args[d]) for d in range(len(wave))]
        )
        seconds += time.perf_counter() - begin
        for s, result in zip(wave, results, strict=True):
            count = min(batches_per_call, num_batches - s)
            result = distributed.gather(result)
            out.append({n: np.asarray(v)[:count] for n, v in result.items()})
            if progress is not None:
                progress(count)
    flops = runners.batch_flops(*on[0]) / (mesh.size if mesh else 1)
    perf = {
        "batch_call_seconds": seconds,
        "batch_flops_per_s": flops * len(starts) * batches_per_call / seconds,
        "batch_devices": mesh.size if mesh is not None else min(len(put), len(starts)),
    }
    estimates = {}
    for n in runners.sub_batches:
        stacked = np.concatenate([o[n] for o in out])  # [M, S, E, P]
        flat = stacked.reshape(-1, *stacked.shape[2:])  # [M * S, E, P]
        estimates[n] = {name: flat[:, i] for i, name in enumerate(runners.names)}
    return estimates, perf


def _call_keys(keys, start: int, per_call: int, put: Callable, mesh):
    """Keys of the batches ``start, ...`` of one call, the last repeated to
    ``per_call`` (one compiled shape), where the call runs."""
    call = keys[start : start + per_call]
    if len(call) < per_call:
        xp = np if isinstance(call, np.ndarray) else jnp  # raw or typed keys
        call = xp.concatenate([call, xp.repeat(call[-1:], per_call - len(call), 0)])
    return distributed.shard(jnp.asarray(call), mesh) if mesh is not None else put(call)


# ---------------------------------------------------------------- the study


MAX_BATCHES_PER_SIZE = 16_384  # an M x M float64 Gram matrix is 2 GiB (several live)


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
        elif len(set(sizes)) < len(sizes):
            problems.append(f"batch_sizes must differ, got {self.batch_sizes}")
        elif any(max(sizes) % n for n in sizes):
            problems.append(
                f"every batch size must divide the largest, got {self.batch_sizes}"
            )
        if self.num_batches < 4:
            problems.append(f"num_batches must be >= 4, got {self.num_batches}")
        for name in ("num_batches", "max_batches_per_size"):
            if getattr(self, name) > MAX_BATCHES_PER_SIZE:
                problems.append(
                    f"{name} must be <= {MAX_BATCHES_PER_SIZE:,} (the statistics "
                    "keep M x M Gram matrices per estimator and size), got "
                    f"{getattr(self, name):,}"
                )
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


class StageResult(NamedTuple):
    rows: list[dict]  # one per (estimator, batch size)
    per_trajectory: dict[str, float]  # per-trajectory tr Var by estimator/baseline
    slopes: dict[str, tuple[float, float, float]]  # estimator -> slope, lo, hi
    critic: dict[str, float]  # critic calibration (critic_calibration)
    reference_norm: float
    reference_se: float
    mean_return: float
    perf: dict[str, float]


def _rows_for_size(n, estimates, groups, exact, units, keep=None):
    """Result rows of one batch size, and each estimator's variance replicates
    (``keep``: the columns of the estimates and ``groups`` that are not all zero,
    the only ones any dot product, so any statistic, depends on)."""
    rows, replicates = [], {}
    for name, E in estimates.items():
        X = np.asarray(E if keep is None else E[:, keep], np.float64)
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


def _nonzero_columns(estimates: dict, groups: np.ndarray) -> np.ndarray:
    """Indices of the parameter columns that are nonzero in some estimate or
    reference group (a critic's are zero in all: dropping them halves the Gram
    products of a separate-critic policy and changes no dot product)."""
    nonzero = np.any(groups != 0, axis=0)
    for by_name in estimates.values():
        for E in by_name.values():
            nonzero |= np.any(E != 0, axis=0)
    return np.flatnonzero(nonzero)


def _variance_by_unit(gram: np.ndarray, units: np.ndarray) -> np.ndarray:
    """tr S of the rows of E from their Gram matrix E E^T, then with each top-level
    unit's rows deleted (for slopes)."""
    labels = np.unique(units)
    w = np.vstack([np.ones(len(units)), units[None, :] != labels[:, None]])
    n = w.sum(1)
    mean_sq = np.sum((w @ gram) * w, axis=1) / n**2
    return (w @ np.diag(gram) - n * mean_sq) / (n - 1)


def _compile_batch(params, runners: Runners, key, per_call: int) -> None:
    """Compile the first device's batch call (XLA's cache keeps it for
    :func:`timed_batch_estimates`): run beside the gradient phase, the two
    compilations share the cores (the quick preset: 2-3 s less end to end)."""
    if runners.mesh is not None:
        return
    put = placements(runners)[0]
    params, b = put((params, jnp.float32(0.0)))
    keys = _call_keys(folded_keys(key, per_call), 0, per_call, put, None)
    runners.batch.lower(params, keys, b).compile()


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
    largest = max(config.batch_sizes)
    per_call = min(
        config.num_batches, max(1, config.steps_per_call // (largest * horizon))
    )
    pool = ThreadPoolExecutor(1)  # the batch function compiles meanwhile
    warm = pool.submit(_compile_batch, params, runners, key_batches, per_call)
    try:
        moments, perf = trajectory_moments(
            params,
            runners,
            key_ref,
            config.reference_trajectories,
            config.chunk,
            config.reference_groups,
            progress,
        )
        warm.result()
    finally:  # no compilation outlives the stage (the interpreter would wait
        pool.shutdown(cancel_futures=True)  # for it at exit anyway)
    groups, g = reference_gradient(moments)
    mean_return = float(moments.sums["R"] / moments.count)
    start = time.perf_counter()
    estimates, batch_perf = timed_batch_estimates(
        params,
        runners,
        key_batches,
        config.num_batches,
        per_call,
        constant_b=mean_return,
        progress=(lambda m: progress(m * largest)) if progress else None,
    )
    exact = _exact_values(params, runners, config, mean_return)
    rows, slopes = _rows_and_slopes(config, runners, estimates, groups, exact)
    perf["batch_phase_seconds"] = time.perf_counter() - start
    perf |= batch_perf
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


def _exact_values(params, runners: Runners, config: StudyConfig, mean_return: float):
    """The problem's exact values ``{n: {name: {metric: value}}}`` ({} if none)."""
    problem = runners.problem
    if problem.exact is None:
        return {}

    def column_grads(batch):
        if not runners.column_names:  # no per-trajectory estimator: means only
            return {}
        b = jnp.float32(mean_return)
        y = np.asarray(runners.column_grads(params, batch, b), np.float64)
        return {name: y[:, i] for i, name in enumerate(runners.column_names)}

    return problem.exact(params, column_grads, config.batch_sizes, runners.specs)


def _rows_and_slopes(config: StudyConfig, runners: Runners, estimates, groups, exact):
    """Result rows of every (estimator, batch size) and each estimator's slope of
    log variance against log n (with at least two sizes)."""
    rows, replicates = [], {}
    keep = _nonzero_columns(estimates, groups)
    for n in config.batch_sizes:
        units = np.repeat(np.arange(config.num_batches), runners.sub_batches[n])
        size_rows, size_reps = _rows_for_size(
            n, estimates[n], groups[:, keep], exact.get(n, {}), units, keep
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
    return rows, slopes


def total_work(config: StudyConfig, num_stages: int) -> int:
    """Trajectories the study samples (for a progress bar)."""
    per_stage = config.reference_trajectories + config.num_batches * max(
        config.batch_sizes
    )
    return per_stage * num_stages
