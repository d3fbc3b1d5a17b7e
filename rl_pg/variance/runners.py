"""The study's jitted functions for one problem and config, and where they run.

``make_runners(..., mesh=...)`` shards the study across devices (and hosts):
the M batches of a batch-size setting and the trajectories of a gradient chunk
are split over the mesh, parameters are replicated, and every result is gathered
to the host. Keys stay per batch / per chunk index, so the numbers are those of a
single-device run. Without a mesh, the reference sample's chunks (and a long
batch phase's calls) go to the local CPU devices in turn and run concurrently
(``concurrent_devices``): XLA runs a
device's gradient loop on about one core, so that is what uses the other cores,
and the numbers are exactly those of one device.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rl_pg import distributed
from rl_pg.variance import kernels
from rl_pg.variance.moments import chunk_sums
from rl_pg.variance.problems import (
    Problem,
    estimator_suite,
    flat_gradient,
    suite_specs,
    weight_suite,
)

if TYPE_CHECKING:
    from rl_pg.variance.study import StudyConfig

CPU_BLOCK_STEPS = 2048  # StudyConfig.block_steps on CPU when not given
# ... and for a dense policy's gradient phase (rl_pg.variance.dense), measured
# 1.2-1.4x faster than 1024-8192 at both presets' horizons
DENSE_CPU_BLOCK_STEPS = 512


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
    # (params, b) -> FLOPs of one top-level batch's estimates (sampling excluded)
    batch_flops: Callable
    # (params, batch [T, B], b) -> [B, E', P]: one-column estimates of the
    # per-trajectory estimators among ``names`` (``column_names``)
    column_grads: Callable
    column_names: tuple[str, ...]
    names: tuple[str, ...]
    specs: dict  # name -> rl_pg.estimators.EstimatorSpec
    sub_batches: dict[int, int]  # n -> sub-batches of size n cut from each batch
    problem: Problem
    mesh: Mesh | None = None  # batches and chunk trajectories split across it
    # without a mesh: devices that take the reference chunks (and batch calls) in
    # turn, concurrently (see :func:`make_runners`); empty: jit's default placement
    concurrent_devices: tuple = ()


def xla_flops(jitted: Callable, *args) -> float:
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
    outputs (about 170 MB per device at the full preset). The batch phase's
    calls are dealt to the same devices when there are enough of them to pay for
    compiling the batch function once more per device
    (:data:`rl_pg.variance.study.MIN_DEALT_CALLS`).
    """
    _check_sizes(problem, config, mesh)
    estimator_suite(problem, config.suite)  # validate the names before compiling
    multiple = mesh.size if mesh is not None else 1
    block_steps, dense_block_steps = _block_steps(config)
    specs = suite_specs(config.suite)
    counts = sub_batch_counts(config)
    shardings = _shardings(mesh)
    gamma = config.suite.gamma
    grads = kernels.score_and_rtg(
        problem, block_steps, multiple, gamma, dense_block_steps
    )
    batch, batch_flops = _batch_runners(  # a mesh splits the batches, not columns
        problem, config, specs, fast, (block_steps, dense_block_steps), 1
    )
    column_names = tuple(e for e in specs if specs[e].per_trajectory)
    return Runners(
        sample=jax.jit(problem.sample, static_argnums=2, **shardings["sample"]),
        trajectory_grads=jax.jit(grads, donate_argnums=2, **shardings["grads"]),
        trajectory_flops=functools.partial(
            xla_flops, jax.jit(kernels.score_and_rtg(problem, gamma=gamma))
        ),
        trajectory_sums=jax.jit(chunk_sums, static_argnums=3, **shardings["sums"]),
        batch=jax.jit(jax.vmap(batch, in_axes=(None, 0, None)), **shardings["batch"]),
        batch_flops=batch_flops,
        column_grads=jax.jit(_column_grads_fn(problem, config, column_names)),
        column_names=column_names,
        names=tuple(specs),
        specs=specs,
        sub_batches=counts,
        problem=problem,
        mesh=mesh,
        concurrent_devices=_concurrent_devices(mesh, concurrent_devices),
    )


def _check_sizes(problem: Problem, config: "StudyConfig", mesh: Mesh | None) -> None:
    """Batch sizes, chunk and reference groups hold whole levels of the problem's
    groups, and the chunk splits over the mesh."""
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


def _block_steps(config: "StudyConfig") -> tuple[int | None, int | None]:
    """(block steps, a dense policy's block steps): the config's, else the CPU
    defaults on the CPU and no blocking on accelerators."""
    if config.block_steps is None and jax.default_backend() == "cpu":
        return CPU_BLOCK_STEPS, DENSE_CPU_BLOCK_STEPS
    return config.block_steps, config.block_steps


def _shardings(mesh: Mesh | None) -> dict[str, dict]:
    """jit's in/out shardings of each runner on ``mesh`` (none without one)."""
    if mesh is None:
        return {"sample": {}, "grads": {}, "sums": {}, "batch": {}}
    whole, rows = distributed.replicated(mesh), distributed.batch_sharding(mesh)
    columns = distributed.batch_sharding(mesh, axis=1)  # Trajectory [T, B]
    return {
        "sample": {"in_shardings": (whole, whole), "out_shardings": columns},
        "grads": {
            "in_shardings": (whole, columns, (rows, rows)),
            "out_shardings": (rows, rows, rows, whole),
        },
        "sums": {"in_shardings": (rows, rows, rows), "out_shardings": whole},
        "batch": {"in_shardings": (whole, rows, whole), "out_shardings": rows},
    }


def _batch_runners(problem, config, specs, fast, block_steps, multiple):
    """``(params, key, b) -> {n: [sub-batches, E, P]}`` (one top-level batch,
    sampled from ``key``), and ``(params, b) -> FLOPs`` of its estimates from XLA's
    count of an unblocked trace (the rollout's loop would be counted once, so it
    is left out)."""
    largest = max(config.batch_sizes)
    from_batch = _batch_fn(problem, config, specs, fast, block_steps, multiple)
    unblocked = jax.jit(_batch_fn(problem, config, specs, fast, (None, None), 1))

    def one(params, key, b):
        return from_batch(params, problem.sample(key, params, largest), b)

    def flops(params, b):
        key = jax.random.PRNGKey(0)
        batch = jax.eval_shape(lambda k, p: problem.sample(k, p, largest), key, params)
        return xla_flops(unblocked, params, batch, b)

    return one, flops


def _batch_fn(problem, config, specs, fast, block_steps, multiple) -> Callable:
    """``(params, batch [T, n_max], b) -> {n: [sub-batches, E, P]}``: a sampled
    batch's estimates, the weighted estimators' from one backward pass (with ``fast``;
    ``block_steps``: generic and dense-policy block steps), the others' from
    their loss on every sub-batch."""
    names = tuple(specs)
    counts = sub_batch_counts(config)
    declares = [
        specs[e].weights is not None or specs[e].from_scores is not None for e in names
    ]
    weighted = (
        tuple(e for e, d in zip(names, declares, strict=True) if d) if fast else ()
    )
    by_loss = tuple(e for e in names if e not in weighted)

    def from_batch(params, batch, b):
        out = {n: {} for n in counts}
        if weighted:
            weight_fns = weight_suite(problem, config.suite, constant_b=b)
            fast_estimates = kernels.score_weight_estimates(
                problem,
                {e: weight_fns[e] for e in weighted},
                counts,
                block_steps[0],
                multiple,
                block_steps[1],
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
                est = jax.vmap(estimates)(kernels.cut_sub_batches(batch, n, count))
                out[n] |= {e: est[:, i] for i, e in enumerate(by_loss)}
        return {n: jnp.stack([out[n][e] for e in names], 1) for n in counts}

    return from_batch


def _column_grads_fn(problem, config, column_names) -> Callable:
    """``(params, batch [T, B], b) -> [B, E', P]``: one-column estimates of the
    per-trajectory estimators ``column_names``."""

    def column_grads(params, batch, b):
        suite = estimator_suite(problem, config.suite, constant_b=b)

        def one(column):  # leaves [T, ...] -> [E', P]
            column = jax.tree.map(lambda x: x[:, None], column)
            return jnp.stack(
                [flat_gradient(suite[e], params, column) for e in column_names]
            )

        return jax.vmap(one, in_axes=1)(batch)

    return column_grads


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


def placements(runners: Runners) -> list[Callable]:
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


def folded_keys(key: jax.Array, count: int):
    """``fold_in(key, i)`` for i < count, on the host (raw keys): handing a slot its
    keys then waits for nothing queued on the default device, so the slots' calls
    really overlap."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count))
    return (
        keys
        if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
        else np.asarray(keys)
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


def shared_runners(
    problem: Problem, config: "StudyConfig", mesh: Mesh | None = None
) -> Runners:
    """:func:`make_runners`, built once per problem (by identity), sizes and
    estimators (the seed aside), mesh and set of local devices, so that a study
    run again (another seed, other params of the same policy) reuses the
    compiled functions instead of compiling them again."""
    key = (
        problem,
        dataclasses.replace(config, seed=0),
        mesh,
        tuple(jax.local_devices()),
    )
    if key not in _SHARED:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.pop(next(iter(_SHARED)))
        _SHARED[key] = make_runners(problem, config, mesh)
    return _SHARED[key]


_SHARED: dict = {}  # shared_runners' cache, oldest first
_SHARED_MAX = 8


def device_mesh(devices: "int | str | None"):
    """None (no mesh), an int N (the first N local devices) or "all"."""
    if devices is None:
        return None
    local = jax.local_devices()
    if devices == "all":
        count = len(local)
    else:
        try:
            count = int(devices)
        except (TypeError, ValueError):
            raise ValueError(
                f"devices must be a positive int or 'all', got {devices!r}"
            ) from None
        if not 1 <= count <= len(local):
            cpu = jax.default_backend() == "cpu"
            raise ValueError(
                f"devices must be between 1 and {len(local)} (local devices), got "
                f"{count}"
                + (
                    "; on a CPU, JAX_NUM_CPU_DEVICES=N gives the process N devices, "
                    "and without --devices rl-pg variance already uses one per core"
                    if cpu
                    else ""
                )
            )
    return distributed.batch_mesh(local[:count])
