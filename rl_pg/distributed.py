"""Sharding the batch axis across devices and hosts.

The batch axis (environments, trajectories, the M batches of the variance study,
seeds) is the one axis that grows, so it is the one we shard: a 1-D
:class:`~jax.sharding.Mesh` with the axis ``"batch"`` over every visible device,
arrays with a leading batch axis laid out as ``NamedSharding(mesh, P("batch"))``
and parameters replicated. The functions themselves are unchanged: ``jax.jit``
with input and output shardings lets XLA (GSPMD) split each call along the batch
axis, and with ``jax_threefry_partitionable`` (the default) random bits do not
depend on the layout, so a sharded run gives the single-device results whatever
the device count.

Multi-host (multi-controller) runs start every process with the same program,
call :func:`initialize` first, and then build the same mesh: ``jax.devices()``
lists the devices of all processes. Every process passes the same full host
values (keys, params) to :func:`shard` / :func:`replicate`, which keep only the
local shards, and :func:`gather` brings results back to every process.

    mesh = batch_mesh()
    run = shard_vmap(train, mesh)                  # jit(vmap(train)), seeds sharded
    metrics = gather(run(jax.random.split(key, 8)))
"""

import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.extend import backend as jax_backend
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with the axis ``"batch"`` over ``devices`` (default: all devices).

    After :func:`initialize` the default spans the devices of every process.
    The axis is ``Auto`` so that XLA propagates the sharding through the code.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("batch_mesh needs at least one device")
    return jax.make_mesh(
        (len(devices),), (BATCH,), axis_types=(AxisType.Auto,), devices=devices
    )


def batch_spec(mesh: Mesh, axis: int = 0) -> P:
    """``P(None, ..., "batch")``: dimension ``axis`` split over every mesh axis."""
    names = mesh.axis_names
    return P(*(None,) * axis, names[0] if len(names) == 1 else names)


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Dimension ``axis`` (default the leading one) split across the mesh."""
    return NamedSharding(mesh, batch_spec(mesh, axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh`` (parameters, scalars, single keys)."""
    return NamedSharding(mesh, P())


def check_divisible(size: int, mesh: Mesh | None, what: str = "batch") -> None:
    """Raise a ValueError unless ``size`` splits evenly over the mesh's devices.

    A no-op when ``mesh`` is None (unsharded).
    """
    if mesh is not None and size % mesh.size:
        raise ValueError(
            f"{what} ({size}) is not divisible by the number of devices "
            f"({mesh.size}): use a multiple of {mesh.size} (or fewer devices)"
        )


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` laid out as ``sharding``; in multi-process runs from the full host value."""
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if not x.is_fully_addressable:  # already global: let XLA reshard it
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = _put(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # Other processes' devices are not addressable from here: every process holds
    # the same full value and hands over only the slices of its own devices.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard(tree: Any, mesh: Mesh, axis: int = 0) -> Any:
    """Every leaf of ``tree`` with dimension ``axis`` split across ``mesh``.

    Raises:
      ValueError: if a leaf's ``axis`` is not divisible by the device count.
    """
    sharding = batch_sharding(mesh, axis)

    def one(x):
        check_divisible(np.shape(x)[axis], mesh)
        return _put(x, sharding)

    return jax.tree.map(one, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` copied to all devices of ``mesh``.

    Python scalars stay as they are: ``jit`` replicates them itself and keeps
    their weak type, as an unsharded call would.
    """
    sharding = replicated(mesh)
    scalar = (bool, int, float, complex)
    return jax.tree.map(
        lambda x: x if isinstance(x, scalar) else _put(x, sharding), tree
    )


def constrain(tree: Any, mesh: Mesh | None, axis: int = 0) -> Any:
    """Inside ``jit``: ask XLA to split dimension ``axis`` of every leaf across ``mesh``.

    A no-op when ``mesh`` is None, so library code can take an optional mesh.
    """
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh, axis))


def gather(tree: Any) -> Any:
    """Every leaf as a full numpy array on this host.

    In a multi-process run a sharded array is all-gathered
    (``multihost_utils.process_allgather``), so every process, process 0 included,
    receives the whole value; every process must call it, in the same order.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def shard_vmap(
    fn: Callable, mesh: Mesh, in_axes: int | None | Sequence[int | None] = 0
) -> Callable:
    """``jit(vmap(fn, in_axes))`` with the mapped axis split across ``mesh``.

    Arguments with ``in_axes`` 0 are sharded along their leading axis (which must
    be divisible by the device count), those with ``None`` are replicated; every
    output is sharded along its leading axis. Element i of the result equals
    ``fn`` applied to element i of the inputs, whatever the device count, e.g.
    training many seeds: ``shard_vmap(train, mesh)(jax.random.split(key, S))``.

    Args:
      fn: a pure function of positional arguments.
      mesh: from :func:`batch_mesh`.
      in_axes: 0 (map) or None (broadcast), one for all arguments or one each.

    Returns:
      A function of the same arguments; its outputs are sharded ``jax.Array``s
      (:func:`gather` brings them to the host).
    """
    axes = (in_axes,) if in_axes is None or isinstance(in_axes, int) else in_axes
    axes = tuple(axes)
    if any(a not in (0, None) for a in axes):
        raise ValueError(f"in_axes entries must be 0 or None, got {in_axes}")
    batched, whole = batch_sharding(mesh), replicated(mesh)
    jitted = {}

    def run(*args):
        per_arg = axes * len(args) if len(axes) == 1 else axes
        if len(per_arg) != len(args):
            raise ValueError(f"in_axes {in_axes} does not match {len(args)} arguments")
        if per_arg not in jitted:
            jitted[per_arg] = jax.jit(
                jax.vmap(fn, in_axes=per_arg),
                in_shardings=tuple(whole if a is None else batched for a in per_arg),
                out_shardings=batched,
            )
        placed = [
            replicate(x, mesh) if a is None else shard(x, mesh)
            for x, a in zip(args, per_arg, strict=True)
        ]
        return jitted[per_arg](*placed)

    return run


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    **kwargs,
) -> None:
    """Join a multi-process run: ``jax.distributed.initialize`` plus CPU collectives.

    Call it before creating arrays of your own; nothing in rl_pg calls it. The
    single-process backend that ``import rl_pg`` has already started (gymnax
    builds an array when imported) is replaced by the distributed one. Arguments
    left None are detected by JAX under Slurm, Open MPI, Cloud TPU and
    Kubernetes; ``JAX_COORDINATOR_ADDRESS`` also sets the address.

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable by all.
      num_processes: the number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: the local accelerators this process drives (default all).
      cpu_collectives: cross-process collectives of the CPU backend ("gloo" or
        "mpi"); the setting only affects CPU devices (GPUs use NCCL), so it is
        set whatever the platform, as the backend is not known before
        initialisation. None leaves JAX's default.
      **kwargs: passed to ``jax.distributed.initialize`` (timeouts, ...).
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    _restart_backend(
        lambda: jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            local_device_ids=local_device_ids,
            **kwargs,
        )
    )


def use_cpu_cores(max_devices: int = 4) -> int:
    """Give the CPU backend one device per core this process may use (at most
    ``max_devices``); returns the number of local CPU devices (0, and nothing
    changed, when the default backend is not the CPU).

    XLA runs one device's program on about one core when its operations are small,
    and separate devices run at once: ``rl_pg.variance.make_runners`` deals the
    reference chunks to every CPU device in turn (2.0x faster on 2 cores, the same
    numbers), and the ``rl-pg variance`` command calls this first. Computations
    without a placement still run on the first device, but ``jax.devices()`` (and
    so ``batch_mesh()``) then lists them all, and each function is compiled once
    per device it runs on (2.7 s more per device for the quick preset's gradient
    phase; hence the cap of 4, which wins only where there are chunks enough).
    Leaves the backend alone when the CPU device count was
    set (``JAX_NUM_CPU_DEVICES``, ``jax_num_cpu_devices``,
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``), when the
    default backend is not the CPU, or in a multi-process run. Like
    :func:`initialize`, it replaces an already started backend (``import rl_pg``
    starts one; module-level arrays are moved over): call it before creating
    arrays of your own.
    """
    if max_devices < 1:
        raise ValueError(f"max_devices must be >= 1, got {max_devices}")
    if jax.default_backend() != "cpu":
        return 0
    configured = jax.config.jax_num_cpu_devices > 0 or (
        "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    )
    wanted = min(usable_cores(), max_devices)
    if not configured and jax.process_count() == 1 and jax.device_count() != wanted:
        _restart_backend(lambda: jax.config.update("jax_num_cpu_devices", wanted))
    return jax.local_device_count()


def usable_cores() -> int:
    """The CPU cores this process may use: its affinity mask (where the OS has
    one), capped by a cgroup CPU quota (containers), at least 1."""
    cores = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1
    )
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, int(quota)) if quota is not None else cores)


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time per period a cgroup (v2 ``cpu.max``, or v1 CFS) allows."""
    v1 = Path("/sys/fs/cgroup/cpu")
    for read in (
        lambda: Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2],
        lambda: [(v1 / f"cpu.cfs_{f}_us").read_text() for f in ("quota", "period")],
    ):
        try:
            quota, period = (x.strip() for x in read())
            if quota not in ("max", "-1"):
                return int(quota) / int(period)
        except (OSError, ValueError):
            continue
    return None


def _restart_backend(start: Callable[[], None]) -> None:
    """Run ``start`` (which configures or initialises the backend) on a fresh one."""
    moved = []
    if _backend_started():
        # `import rl_pg` imports gymnax, whose frozen_lake module (and our
        # envs.levels) builds a jax array at import time; that starts a
        # backend, which jax.distributed.initialize and the CPU device count
        # refuse to change. Move such module-level arrays to the host, drop the
        # backend, and rebuild them on the new one.
        moved = _module_arrays_to_host()
        jax_backend.clear_backends()
        gc.collect()  # free the old clients (and their GPU memory pools)
    start()
    for module, name in moved:
        setattr(module, name, jnp.asarray(getattr(module, name)))


def _backend_started() -> bool:
    """What ``jax.distributed.initialize`` checks (no public API for it in jax 0.10)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def _module_arrays_to_host() -> list[tuple[Any, str]]:
    """Replace every module-level ``jax.Array`` by a numpy copy; return where."""
    moved = []
    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if isinstance(value, jax.Array) and not jax.dtypes.issubdtype(
                value.dtype, jax.dtypes.prng_key
            ):
                setattr(module, name, np.asarray(value))
                moved.append((module, name))
    return moved
