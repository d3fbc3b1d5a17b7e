"""How far is a policy-gradient estimate from the true gradient?

The estimator-variance study after Ilyas et al. 2020 ("A Closer Look at Deep
Policy Gradients", ICLR): for a policy theta,

1. a reference gradient g = grad J(theta) from a large sample of per-trajectory
   REINFORCE estimates with the sample-mean baseline (see
   :func:`reference_gradient`), with its standard error;
2. for every estimator e and batch size n, M independent batches of n
   trajectories and their estimates g_hat_{e,n,m} = -grad loss_e(theta, batch_m).
   Common random numbers: batch m holds the same trajectories for every
   estimator, so differences between estimators are not sampling noise;
3. per (e, n): bias2 = ||mean_m g_hat - g||^2, variance = tr Cov(g_hat) (unbiased
   over the M batches), mse = mean_m ||g_hat - g||^2, cos_true = mean_m cos(g_hat,
   g), cos_pairwise = mean_{m != m'} cos(g_hat_m, g_hat_m'), snr = ||mean g_hat|| /
   sqrt(variance), each with a bootstrap confidence interval over the M batches;
4. per-trajectory statistics, accumulated chunk by chunk (Chan et al. 1979's
   parallel update of mean and sum of squared deviations, in float64 on the host)
   so memory is bounded by the chunk, never by trajectories x parameters: the
   per-trajectory variance of REINFORCE with the constant baselines 0, E[R], the
   scalar optimum E[||s||^2 R] / E[||s||^2] (Greensmith et al. 2004) and the
   per-parameter optimum E[R s_k^2] / E[s_k^2] (Mohamed et al. 2020, s. 7.4), and of
   reward-to-go; an i.i.d. batch of n has variance Var[g] / n.

``bias2`` contains the noise of the mean and of the reference: its expectation for
an unbiased estimator is ``bias2_noise = variance / M + se_ref^2``, reported
beside it.

The study is generic: a :class:`Problem` is a policy ``apply_fn`` and a sampler
``sample(key, params, n) -> Trajectory`` of n episodes in groups of
``group_size`` columns (levels x G). :func:`flappy_problem` samples grouped
Flappy Bird rollouts; the tests use the exactly solvable MDP of
:mod:`rl_pg.enumerable`.

``make_runners(..., mesh=...)`` shards the study across devices (and hosts):
the M batches of a batch-size setting and the trajectories of a gradient chunk
are split over the mesh, parameters are replicated, and every result is gathered
to the host. Keys stay per batch / per chunk index, so the numbers are those of a
single-device run.
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

CPU_BLOCK_STEPS = 2048  # StudyConfig.block_steps on CPU when not given
METRICS = ("bias2", "variance", "mse", "cos_true", "cos_pairwise", "snr")


class Problem(NamedTuple):
    """What the study needs to know about a policy-gradient problem."""

    apply_fn: Callable  # (params, obs) -> (logits, value)
    sample: Callable[[jax.Array, Any, int], Trajectory]  # (key, params, n)
    group_size: int  # consecutive columns sharing a level


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
    """Hyperparameters of the estimators under study (value/entropy terms off)."""

    names: tuple[str, ...] = (
        "reinforce",
        "reward_to_go",
        "constant_baseline",
        "mean_baseline",
        "rloo",
        "optimal_baseline",
        "optimal_baseline_per_parameter",
        "value_baseline",
        "gae",
        "ppo_clip",
        "grpo",
        "dr_grpo",
    )
    gamma: float = 0.99
    lam: float = 0.95


def estimator_suite(
    problem: Problem, config: SuiteConfig, constant_b: float | jax.Array = 0.0
) -> dict[str, Callable]:
    """Name -> ``loss(params, batch) -> (loss, aux)`` for every studied estimator.

    Group-based estimators use the problem's groups; value and entropy
    coefficients are 0 so that each gradient is a pure policy-gradient estimate;
    ``constant_baseline`` uses ``constant_b`` (an estimate of E[R] from the
    reference sample, independent of the batches).
    """
    known = set(estimators_lib.ESTIMATORS) | {"optimal_baseline_per_parameter"}
    unknown = [n for n in config.names if n not in known]
    if unknown:
        raise ValueError(f"Unknown estimators {unknown}; known: {sorted(known)}")
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
    suite = {}
    for label in config.names:
        name, extra = label, {}
        if label == "optimal_baseline_per_parameter":
            name, extra = "optimal_baseline", {"variant": "per_parameter"}
        if name == "optimal_baseline":
            extra["group_size"] = None  # leave-one-out over the whole batch
        if name in ("rloo", "grpo") and G < 2:
            raise ValueError(f"{name} needs group_size >= 2, got {G}")
        accepted = estimators_lib.hyperparameters(name)
        kwargs = {k: v for k, v in options.items() if k in accepted} | extra
        suite[label] = estimators_lib.get_estimator(
            name, apply_fn=problem.apply_fn, **kwargs
        )
    return suite


def flat_gradient(loss_fn: Callable, params: Any, batch: Trajectory) -> jax.Array:
    """The estimate g_hat = -grad loss as one flat vector [P]."""
    grads = jax.grad(lambda p: loss_fn(p, batch)[0])(params)
    return -ravel_pytree(grads)[0]


# ------------------------------------------------------ per-trajectory moments


@dataclasses.dataclass
class TrajectoryMoments:
    """Running float64 moments of per-trajectory quantities (Chan's update).

    ``mean``/``m2`` hold, per estimator, the mean and the sum of squared
    deviations of the per-trajectory estimates; ``sums`` the raw sums needed for
    the constant-baseline analysis (s = per-trajectory score, R = return).
    """

    count: int = 0
    mean: dict = dataclasses.field(default_factory=dict)
    m2: dict = dataclasses.field(default_factory=dict)
    sums: dict = dataclasses.field(default_factory=dict)

    def update(self, chunk: dict[str, np.ndarray], sums: dict[str, np.ndarray]):
        """Merge a chunk: ``chunk[name]`` is [C, P] per-trajectory estimates."""
        n_b = next(iter(chunk.values())).shape[0]
        n_a, n = self.count, self.count + n_b
        for name, values in chunk.items():
            values = np.asarray(values, np.float64)
            mean_b = values.mean(0)
            m2_b = ((values - mean_b) ** 2).sum(0)
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
            ("optimal scalar b*", scalar),
            ("optimal per-parameter b*", per_param),
        ):
            second = e["R2_s2"] - 2 * b * e["R_s2"] + b**2 * e["s2"]
            first = e["R_s"] - b * e["s"]
            out[label] = float(second.sum() - (first**2).sum())
        return out


def _score_and_rtg(problem: Problem, block_steps: int | None = None, multiple: int = 1):
    """Per-trajectory score s_i = grad log p(tau_i), reward-to-go gradient and R_i.

    Both gradients are sum_t w_t grad log pi(a_t|s_t), with w_t = m_t for the score
    and w_t = m_t G_t (G_t = sum_{t' >= t} r_t') for reward-to-go, so one forward
    pass and one VJP with the two weightings stacked as cotangents give both:
    every weight gradient is a single [in, T] x [T, 2 * out] product instead of
    two passes of [in, T] x [T, out]. With ``block_steps`` the VJPs run in
    cache-sized blocks of trajectories (:func:`in_blocks`). Returns ``(params,
    traj [T, C]) -> (score [C, P], rtg [C, P], R [C])``.
    """

    def one(params, observations, actions, weights):  # [T, ...], [T], [T, 2]
        def log_probs(p):  # [T]
            logits, _ = problem.apply_fn(p, observations)
            return policies.log_prob(logits, actions)

        _, vjp = jax.vjp(log_probs, params)
        return jax.vmap(lambda w: ravel_pytree(vjp(w)[0])[0], in_axes=1)(weights)

    def columns_grads(params, columns):  # leaves [T, B, ...] -> [B, 2, P]
        return jax.vmap(one, in_axes=(None, 1, 1, 1))(params, *columns)

    if block_steps is not None:
        columns_grads = in_blocks(columns_grads, block_steps, multiple)

    def grads(params, traj: Trajectory):
        live = traj.mask > 0
        obs_live = live.reshape(live.shape + (1,) * (traj.observations.ndim - 2))
        observations = jnp.where(obs_live, traj.observations, 0)
        actions = jnp.where(live, traj.actions, 0)
        rewards = jnp.where(live, traj.rewards.astype(jnp.float32), 0.0)
        done = traj.terminated | traj.truncated
        to_go = returns_lib.batch_reward_to_go(rewards, traj.mask, done)
        weights = jnp.stack([live, jnp.where(live, to_go, 0.0)], -1)  # [T, C, 2]
        g = columns_grads(params, (observations, actions, weights.astype(jnp.float32)))
        return g[:, 0], g[:, 1], jnp.sum(rewards, 0)

    return grads


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
    trajectory_grads: Callable  # (params, traj) -> (score [C, P], rtg [C, P], R [C])
    trajectory_flops: Callable  # (params, traj) -> FLOPs of trajectory_grads
    batch: dict[int, Callable]  # n -> (params, keys [k], b) -> [k, E, P]
    names: tuple[str, ...]
    mesh: Mesh | None = None  # batches and chunk trajectories split across it


def _flops(jitted: Callable, *args) -> float:
    """XLA's FLOP count of ``jitted(*args)`` (from the lowered HLO: a loop's body
    would be counted once, so count an unblocked version), nan if unknown."""
    analysis = jitted.lower(*args).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"]) if analysis and "flops" in analysis else np.nan


def make_runners(
    problem: Problem, config: "StudyConfig", mesh: Mesh | None = None
) -> Runners:
    """Build (lazily compiled) jitted functions for ``problem`` and ``config``.

    With a ``mesh`` (:func:`rl_pg.distributed.batch_mesh`) the chunk's
    trajectories (``config.chunk`` must be divisible by the device count) and the
    keys of the M batches are split across its devices; params are replicated.
    """
    G = problem.group_size
    bad = [n for n in config.batch_sizes if n % G] + (
        [config.chunk] if config.chunk % G else []
    )
    if bad:
        raise ValueError(
            f"batch sizes and chunk must be multiples of group_size {G}: {bad}"
        )
    distributed.check_divisible(config.chunk, mesh, "chunk")
    estimator_suite(problem, config.suite)  # validate the names before compiling
    multiple = mesh.size if mesh is not None else 1
    block_steps = config.block_steps
    if block_steps is None and jax.default_backend() == "cpu":
        block_steps = CPU_BLOCK_STEPS
    names = tuple(config.suite.names)
    shardings = {"sample": {}, "grads": {}, "batch": {}}
    if mesh is not None:
        whole, rows = distributed.replicated(mesh), distributed.batch_sharding(mesh)
        columns = distributed.batch_sharding(mesh, axis=1)  # Trajectory [T, B]
        shardings = {
            "sample": {"in_shardings": (whole, whole), "out_shardings": columns},
            "grads": {"in_shardings": (whole, columns), "out_shardings": rows},
            "batch": {"in_shardings": (whole, rows, whole), "out_shardings": rows},
        }

    def batch_fn(n):
        def one(params, key, b):
            suite = estimator_suite(problem, config.suite, constant_b=b)
            batch = problem.sample(key, params, n)
            return jnp.stack([flat_gradient(suite[e], params, batch) for e in names])

        return jax.jit(jax.vmap(one, in_axes=(None, 0, None)), **shardings["batch"])

    return Runners(
        sample=jax.jit(problem.sample, static_argnums=2, **shardings["sample"]),
        trajectory_grads=jax.jit(
            _score_and_rtg(problem, block_steps, multiple),
            **shardings["grads"],
        ),
        trajectory_flops=functools.partial(_flops, jax.jit(_score_and_rtg(problem))),
        batch={int(n): batch_fn(int(n)) for n in config.batch_sizes},
        names=names,
        mesh=mesh,
    )


def trajectory_moments(
    params: Any,
    runners: Runners,
    key: jax.Array,
    num_trajectories: int,
    chunk: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[TrajectoryMoments, dict[str, float]]:
    """Accumulate per-trajectory gradient moments over ``num_trajectories``.

    Returns the moments and timing of the gradient phase (rollouts excluded):
    trajectory gradients per second (a score and a reward-to-go gradient per
    trajectory) and FLOP/s (per device on a mesh) from XLA's cost analysis of the gradient computation.
    """
    if num_trajectories % chunk:
        raise ValueError(
            f"chunk ({chunk}) must divide num_trajectories ({num_trajectories})"
        )
    mesh = runners.mesh
    distributed.check_divisible(chunk, mesh, "chunk")
    if mesh is not None:
        params = distributed.replicate(params, mesh)
    moments = TrajectoryMoments()
    grad_seconds, flops = 0.0, float("nan")
    for i in range(num_trajectories // chunk):
        key_chunk = jax.random.fold_in(key, i)
        if mesh is not None:
            key_chunk = distributed.replicate(key_chunk, mesh)
        traj = jax.block_until_ready(runners.sample(key_chunk, params, chunk))
        if i == 0:
            compiled = runners.trajectory_grads.lower(params, traj).compile()
            # FLOPs of the whole (unsharded) computation, per device
            flops = runners.trajectory_flops(params, traj) / (mesh.size if mesh else 1)
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(params, traj))
        grad_seconds += time.perf_counter() - start
        score, rtg_grads, ret = (
            np.asarray(x, np.float64) for x in distributed.gather(out)
        )
        reinforce = ret[:, None] * score
        s2 = score**2
        moments.update(
            {"reinforce": reinforce, "reward_to_go": rtg_grads},
            {
                "R": ret.sum(),
                "s": score.sum(0),
                "s2": s2.sum(0),
                "R_s": reinforce.sum(0),
                "R_s2": (ret[:, None] * s2).sum(0),
                "R2_s2": (ret[:, None] ** 2 * s2).sum(0),
            },
        )
        if progress is not None:
            progress(chunk)
    calls = num_trajectories // chunk
    perf = {
        "trajectory_gradients_per_s": 2 * num_trajectories / grad_seconds,
        "gradient_flops_per_s": flops * calls / grad_seconds,
        "gradient_seconds": grad_seconds,
    }
    return moments, perf


# ------------------------------------------------------------ batch estimates


def batch_estimates(
    params: Any,
    runners: Runners,
    key: jax.Array,
    batch_size: int,
    num_batches: int,
    batches_per_call: int,
    constant_b: float,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """``num_batches`` estimates [M, P] per estimator, common random numbers.

    Batch m of size n is sampled from ``fold_in(key, m)``, so it is the same
    for every estimator (and does not depend on how batches are chunked or
    sharded). With ``runners.mesh`` each call's batches are split across the
    devices; ``batches_per_call`` is rounded up to a multiple of their number.
    """
    run = runners.batch[batch_size]
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
        out.append(distributed.gather(run(params, keys, b))[: len(idx)])
        if progress is not None:
            progress(len(idx))
    stacked = np.concatenate(out)  # [M, E, P]
    return {name: stacked[:, i] for i, name in enumerate(runners.names)}


# ----------------------------------------------------------------- statistics


def _statistics(K: np.ndarray, d: np.ndarray, gg: float, W: np.ndarray) -> dict:
    """Metrics for weightings W [R, M] (bootstrap counts) of M estimates.

    K = E E^T (Gram matrix), d = E g, gg = g.g; each row of W sums to M.
    """
    M = K.shape[0]
    diag = np.diag(K)
    norms = np.sqrt(np.maximum(diag, 1e-300))
    mean_sq = np.einsum("rm,mn,rn->r", W, K, W) / M**2
    mean_g = W @ d / M
    variance = (W @ diag - M * mean_sq) / (M - 1)
    C = K / np.outer(norms, norms)
    return {
        "bias2": mean_sq - 2 * mean_g + gg,
        "variance": variance,
        "mse": W @ (diag - 2 * d + gg) / M,
        "cos_true": W @ (d / (norms * np.sqrt(max(gg, 1e-300)))) / M,
        "cos_pairwise": (np.einsum("rm,mn,rn->r", W, C, W) - W @ np.diag(C))
        / (M * (M - 1)),
        "snr": np.sqrt(np.maximum(mean_sq, 0)) / np.sqrt(np.maximum(variance, 1e-300)),
    }


def summarize(
    estimates: np.ndarray,
    g: np.ndarray,
    num_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Metrics of M estimates [M, P] against g [P], with bootstrap intervals."""
    E = np.asarray(estimates, np.float64)
    g = np.asarray(g, np.float64)
    M = E.shape[0]
    if M < 3:
        raise ValueError(f"need at least 3 batches for the statistics, got {M}")
    K, d, gg = E @ E.T, E @ g, float(g @ g)
    point = {k: float(v[0]) for k, v in _statistics(K, d, gg, np.ones((1, M))).items()}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, M, (num_bootstrap, M))
    W = np.zeros((num_bootstrap, M))
    np.add.at(W, (np.arange(num_bootstrap)[:, None], idx), 1.0)
    boot = _statistics(K, d, gg, W)
    alpha = (1 - level) / 2
    out = dict(point)
    for name, values in boot.items():
        out[f"{name}_lo"] = float(np.quantile(values, alpha))
        out[f"{name}_hi"] = float(np.quantile(values, 1 - alpha))
    return out


# ---------------------------------------------------------------- the study


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Sizes of one study (see the presets in :data:`PRESETS`)."""

    batch_sizes: tuple[int, ...] = (4, 16, 64, 256, 1024)
    num_batches: int = 128
    reference_trajectories: int = 100_000
    chunk: int = 1024
    steps_per_call: int = 2**14  # trajectory steps per vmapped batch call (cache-sized)
    # Trajectory steps per cache-sized gradient block; None: 2048 on CPU (where
    # blocking made the gradient phase 3-4x faster), no blocking on accelerators.
    block_steps: int | None = None
    num_bootstrap: int = 1000
    seed: int = 0
    suite: SuiteConfig = SuiteConfig()

    def __post_init__(self):
        problems = []
        if not self.batch_sizes or any(int(n) < 1 for n in self.batch_sizes):
            problems.append(f"batch_sizes must be positive, got {self.batch_sizes}")
        if self.num_batches < 3:
            problems.append(f"num_batches must be >= 3, got {self.num_batches}")
        if self.reference_trajectories < 2 or self.chunk < 1:
            problems.append("reference_trajectories >= 2 and chunk >= 1 required")
        elif self.reference_trajectories % self.chunk:
            problems.append(
                f"chunk ({self.chunk}) must divide reference_trajectories "
                f"({self.reference_trajectories})"
            )
        if self.block_steps is not None and self.block_steps < 1:
            problems.append(f"block_steps must be >= 1, got {self.block_steps}")
        if self.num_bootstrap < 10:
            problems.append(f"num_bootstrap must be >= 10, got {self.num_bootstrap}")
        if problems:
            raise ValueError("Invalid StudyConfig: " + "; ".join(problems))


def reference_gradient(moments: TrajectoryMoments) -> tuple[np.ndarray, float]:
    """The "true" gradient and its squared standard error (trace).

    g = (1/N) sum_i (R_i - b) s_i with b = the sample's mean return: REINFORCE
    with the mean-return baseline, whose per-trajectory variance is a few percent
    of plain REINFORCE's or reward-to-go's on Flappy Bird, so the reference is
    several times more precise for the same N. Using the sample's own mean adds
    a bias of order 1/N (-Cov(R, s) / N), far below the standard error.
    """
    n = moments.count
    e = {k: v / n for k, v in moments.sums.items()}
    g = e["R_s"] - e["R"] * e["s"]
    se2 = moments.baseline_variances()["constant b = E[R]"] / n
    return g, float(se2)


class StageResult(NamedTuple):
    rows: list[dict]  # one per (estimator, batch size)
    per_trajectory: dict[str, float]  # per-trajectory tr Var by estimator/baseline
    reference_norm: float
    reference_se: float
    mean_return: float
    perf: dict[str, float]


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
        params, runners, key_ref, config.reference_trajectories, config.chunk, progress
    )
    g, se2 = reference_gradient(moments)
    mean_return = float(moments.sums["R"] / moments.count)
    rows = []
    start = time.perf_counter()
    for n in config.batch_sizes:
        per_call = min(
            config.num_batches, max(1, config.steps_per_call // (n * horizon))
        )
        estimates = batch_estimates(
            params,
            runners,
            jax.random.fold_in(key_batches, n),
            n,
            config.num_batches,
            per_call,
            constant_b=mean_return,
            progress=(lambda m, n=n: progress(m * n)) if progress else None,
        )
        for name, E in estimates.items():
            stats = summarize(E, g, config.num_bootstrap, seed=config.seed)
            noise = stats["variance"] / config.num_batches + se2
            rows.append(
                {
                    "estimator": name,
                    "batch_size": n,
                    "num_batches": config.num_batches,
                    **{m: stats[m] for m in METRICS},
                    **{
                        f"{m}_{s}": stats[f"{m}_{s}"]
                        for m in METRICS
                        for s in ("lo", "hi")
                    },
                    "bias2_noise": noise,
                }
            )
    perf["batch_phase_seconds"] = time.perf_counter() - start
    per_traj = moments.baseline_variances()
    per_traj["reward_to_go"] = moments.trace_variance("reward_to_go")
    return StageResult(
        rows, per_traj, float(np.linalg.norm(g)), float(np.sqrt(se2)), mean_return, perf
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
    per_stage = config.reference_trajectories + config.num_batches * sum(
        config.batch_sizes
    )
    return per_stage * num_stages


def sequence_arg(values: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)
