"""Sharded runs equal single-device runs: rollouts, the variance study, vmapped seeds.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before JAX
starts, so the sharded side runs in subprocesses of this file (run as a script,
see :func:`main`): one process with 4 CPU devices, and 2 processes x 2 devices
joined by ``jax.distributed`` (gloo collectives). Each writes :func:`compute`'s
arrays to an ``.npz`` that the tests compare with :func:`compute` run here, on one
device, with the unsharded functions.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rl_pg
from rl_pg import distributed, enumerable, variance
from rl_pg.policies import mlp_policy
from rl_pg.rollout import (
    episodic_rollout,
    grouped_rollout,
    stream_init,
    streaming_rollout,
)

# One worker shares the expensive fixture under `pytest -n N --dist loadgroup`.
pytestmark = [pytest.mark.xdist_group("distributed"), pytest.mark.slow]

NUM_DEVICES = 4
HORIZON = 64
TIMEOUT_S = 240  # generous: the CI machine is shared; the runs take ~10-20 s


# --------------------------------------------------------------- the workload


def _noisy_affine(key, scale):
    """A small pure function to vmap over seeds (a stand-in for ``train``)."""
    x = jax.random.normal(key, (3,))
    return {"y": scale * x + jnp.cumsum(x), "norm": jnp.linalg.norm(x)}


def _flappy(key):
    env, env_params = rl_pg.make("FlappyBird-v0")
    policy = mlp_policy(2, hidden=(8,))
    return env, env_params, policy, policy.init(key, jnp.zeros(12))


def _variance_setup(mesh):
    policy = enumerable.mdp_policy()
    params = policy.init(jax.random.PRNGKey(1), jnp.zeros(3))
    params = jax.tree.map(
        lambda x: x + 0.1 * jnp.arange(x.size).reshape(x.shape), params
    )
    problem = variance.Problem(
        policy.apply,
        lambda key, p, n: enumerable.sample_batch(key, p, n, group_size=2),
        group_size=2,
    )
    config = variance.StudyConfig(
        batch_sizes=(2,),  # < the 4 devices: a mesh splits batches, not columns
        num_batches=6,
        reference_trajectories=16,
        reference_groups=4,
        chunk=8,
        block_steps=4,  # one trajectory per block, or one per device and block
        suite=variance.SuiteConfig(names=("reinforce", "rloo")),
    )
    return params, variance.make_runners(problem, config, mesh=mesh)


def _put(mesh, tree):
    """Replicate full host inputs over ``mesh`` (global arrays across processes)."""
    return tree if mesh is None else distributed.replicate(tree, mesh)


def _seeds(mesh) -> dict:
    """``jit(vmap(fn))`` over 8 seeds, the seed axis sharded."""
    seeds = jax.random.split(jax.random.PRNGKey(0), 8)
    if mesh is None:
        res = jax.jit(jax.vmap(_noisy_affine, in_axes=(0, None)))(seeds, 2.0)
        return {f"seeds_{k}": v for k, v in distributed.gather(res).items()}
    res = distributed.shard_vmap(_noisy_affine, mesh, in_axes=(0, None))(seeds, 2.0)
    out = {f"seeds_{k}": v for k, v in distributed.gather(res).items()}
    return out | {"seeds_devices": np.array(len(res["y"].sharding.device_set))}


def _grouped(mesh) -> dict:
    """4 levels x 2 rollouts, levels sharded; records the shard shape and the
    collectives in the compiled program."""
    env, env_params, policy, params = _flappy(jax.random.PRNGKey(0))

    def grouped(key, params, level_keys):
        return grouped_rollout(
            key, params, policy.apply, env, env_params, level_keys, 2, HORIZON, mesh
        )

    level_keys = jax.random.split(jax.random.PRNGKey(3), 4)
    args = _put(mesh, (jax.random.PRNGKey(1), params, level_keys))
    compiled = jax.jit(grouped).lower(*args).compile()
    traj = compiled(*args)
    out = {f"grouped_{k}": v for k, v in distributed.gather(traj._asdict()).items()}
    if mesh is not None:
        pattern = r"all-gather|all-reduce|all-to-all|collective-permute"
        out["grouped_collectives"] = np.array(
            len(re.findall(pattern, compiled.as_text()))
        )
        shard = traj.actions.addressable_shards[0].data
        out["grouped_shard_shape"] = np.array(shard.shape)
    return out


def _streaming(mesh) -> dict:
    """8 auto-resetting streams, sharded, from ``stream_init`` on."""
    env, env_params, policy, params = _flappy(jax.random.PRNGKey(0))

    def streaming(key, params):
        key_init, key_run = jax.random.split(key)
        stream = stream_init(key_init, env, env_params, 8, mesh)
        stream, traj = streaming_rollout(
            key_run, params, policy.apply, env, env_params, stream, HORIZON, mesh
        )
        return stream.episode, traj.rewards, traj.observations

    res = jax.jit(streaming)(*_put(mesh, (jax.random.PRNGKey(2), params)))
    episode, rewards, obs = distributed.gather(res)
    return {"stream_episode": episode, "stream_rewards": rewards, "stream_obs": obs}


def _seed_rollouts(mesh) -> dict:
    """A rollout vmapped over 8 action-sampling seeds (the many-seeds pattern)."""
    env, env_params, policy, params = _flappy(jax.random.PRNGKey(0))
    reset_keys = jax.random.split(jax.random.PRNGKey(4), 2)

    def one_seed(key, params):
        traj = episodic_rollout(
            key, params, policy.apply, env, env_params, reset_keys, HORIZON
        )
        return traj.rewards, traj.log_probs

    seeds = jax.random.split(jax.random.PRNGKey(0), 8)
    if mesh is None:
        res = jax.jit(jax.vmap(one_seed, in_axes=(0, None)))(seeds, params)
    else:
        res = distributed.shard_vmap(one_seed, mesh, in_axes=(0, None))(seeds, params)
    rewards, log_probs = distributed.gather(res)
    return {"seed_rollout_rewards": rewards, "seed_rollout_log_probs": log_probs}


def _batch_estimates(mesh) -> dict:
    """6 batches of 2 (1 level x G=2), in calls of 3 (rounded up to 4 sharded)."""
    params, runners = _variance_setup(mesh)
    estimates = variance.batch_estimates(
        params, runners, jax.random.PRNGKey(5), 6, 3, constant_b=0.5
    )
    return {f"batch_{k}": v for k, v in estimates[2].items()}


def _moments(mesh) -> dict:
    """Per-trajectory gradient moments over 2 chunks of 8 trajectories."""
    params, runners = _variance_setup(mesh)
    moments, _ = variance.trajectory_moments(
        params, runners, jax.random.PRNGKey(6), 16, 8, num_groups=4
    )
    out = {f"moments_mean_{k}": v for k, v in moments.mean.items()}
    out |= {f"moments_m2_{k}": v for k, v in moments.m2.items()}
    out |= {f"moments_sum_{k}": np.asarray(v) for k, v in moments.sums.items()}
    return out | {"moments_groups": np.stack(moments.group_R_s)}


def _concurrent(mesh) -> dict:
    """The study without a mesh: in the 4-device worker, the reference chunks are
    dealt to the devices in turn (``concurrent_devices``); the same bits as one."""
    del mesh
    _, runners = _variance_setup(None)
    found = _moments(None)
    out = {f"concurrent_{k}": v for k, v in found.items()}
    return out | {"concurrent_devices": np.array(len(runners.concurrent_devices))}


def _zero_estimates(mesh) -> dict:
    """dr_grpo on groups of G = 4 where every return of a group is often equal: its
    batch estimate is then 0 up to float32 rounding (the group mean of four equal
    returns need not be exactly the return), a rounding whose direction depends on
    the reduction order, so on the device count; its metrics must not."""
    base = enumerable.DEFAULT_MDP
    transitions, rewards = base.transitions.copy(), base.rewards.copy()
    transitions[2] = [0.0, 0.0, 1.0, 0.0]  # state 2: absorbing, 0.7 per step
    rewards[2] = 0.7
    mdp = base._replace(transitions=transitions, rewards=rewards)
    policy = enumerable.mdp_policy()
    params = policy.init(jax.random.PRNGKey(1), jnp.zeros(3))
    problem = variance.Problem(
        policy.apply,
        lambda key, p, n: enumerable.sample_batch(key, p, n, mdp, group_size=4),
        group_size=4,
    )
    config = variance.StudyConfig(
        batch_sizes=(4,),
        num_batches=16,
        reference_trajectories=32,
        reference_groups=4,
        chunk=16,
        block_steps=4,
        suite=variance.SuiteConfig(names=("dr_grpo",)),
    )
    runners = variance.make_runners(problem, config, mesh=mesh)
    rows = variance.study_stage(params, runners, config, 4).rows
    (row,) = [r for r in rows if r["estimator"] == "dr_grpo"]
    names = ("cos_true", "cos_pairwise", "snr", "rel_variance")
    out = {f"zero_{m}": np.array(row[m]) for m in names}
    estimates = variance.batch_estimates(
        params, runners, jax.random.PRNGKey(2), 16, 4, 0.0
    )
    norms = np.linalg.norm(estimates[4]["dr_grpo"], axis=-1)
    return out | {"zero_tiny_estimates": np.array(np.sum(norms < 1e-5))}


PARTS = {
    "seeds": _seeds,
    "grouped": _grouped,
    "streaming": _streaming,
    "seed_rollouts": _seed_rollouts,
    "batch_estimates": _batch_estimates,
    "moments": _moments,
    "concurrent": _concurrent,
    "zero_estimates": _zero_estimates,
}
# The 2-process run repeats the parts that use every placement helper across
# processes (shard, replicate, gather via process_allgather) and stays quick;
# `--parts` runs the others by hand (they pass too, see docs/distributed.md).
MULTI_PARTS = ("seeds", "batch_estimates")


def compute(mesh, parts=tuple(PARTS)) -> dict[str, np.ndarray]:
    """What the tests compare; ``mesh=None`` is the unsharded reference.

    Inputs are the same full host values on every process (keys from fixed
    seeds); outputs come back through :func:`distributed.gather`.
    """
    out = {}
    for part in parts:
        out |= PARTS[part](mesh)
    return out


def errors(mesh) -> dict[str, np.ndarray]:
    """The messages of the divisibility checks on a 4-device mesh."""
    env, env_params, policy, params = _flappy(jax.random.PRNGKey(0))
    attempts = {
        "error_shard": lambda: distributed.shard(np.zeros((6, 2)), mesh),
        "error_levels": lambda: grouped_rollout(
            jax.random.PRNGKey(0),
            params,
            policy.apply,
            env,
            env_params,
            jax.random.split(jax.random.PRNGKey(1), 3),
            2,
            HORIZON,
            mesh,
        ),
        "error_chunk": lambda: variance.make_runners(
            variance.Problem(policy.apply, None, 1),
            variance.StudyConfig(
                batch_sizes=(4,),
                reference_trajectories=12,
                reference_groups=6,
                chunk=6,
                suite=variance.SuiteConfig(names=("reinforce",)),
            ),
            mesh,
        ),
    }
    found = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            found[name] = np.array("no error")
        except ValueError as e:
            found[name] = np.array(str(e))
    return found


# ----------------------------------------------------------- the subprocesses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, name: str, devices: int, processes: int) -> list:
    env = os.environ | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    command = [sys.executable, __file__, "--out", str(tmp / f"{name}.npz")]
    if processes > 1:
        address = f"127.0.0.1:{_free_port()}"
        command += ["--coordinator", address, "--num-processes", str(processes)]
        return [
            subprocess.Popen(
                [*command, "--process-id", str(i)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(processes)
        ]
    return [
        subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    ]


def _wait(procs: list, path: Path) -> dict[str, np.ndarray]:
    """Wait for every worker; if one fails, stop the others (which would hang in
    a collective) and show its output."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll()]
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            log = (failed or procs)[0].communicate()[0]
            reason = "failed" if failed else f"timed out after {TIMEOUT_S} s"
            pytest.fail(f"{path.name}: worker {reason}:\n{log[-4000:]}")
        time.sleep(0.2)
    for p in procs:
        if p.returncode:
            pytest.fail(f"{path.name}: worker failed:\n{p.communicate()[0][-4000:]}")
    with np.load(path) as data:
        return dict(data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start both sharded runs, then compute the reference while they work."""
    tmp = tmp_path_factory.mktemp("distributed")
    single = _launch(tmp, "single", NUM_DEVICES, 1)
    multi = _launch(tmp, "multi", NUM_DEVICES // 2, 2)
    reference = compute(None)
    return reference, _wait(single, tmp / "single.npz"), _wait(multi, tmp / "multi.npz")


# docs/distributed.md: what a rollout produces (actions, observations, rewards,
# episode ends and counters) is bit-identical; floating-point reductions
# (log-probabilities, values, gradient estimates, moments, the seeds' toy function)
# may differ by a float32 rounding, because XLA orders the sums per batch shape.
ROUNDED = ("log_probs", "values", "seeds_", "batch_", "moments_")


def _compare(reference, sharded, prefix):
    keys = [k for k in reference if k.startswith(prefix)]
    assert keys
    for k in keys:
        if any(name in k for name in ROUNDED):
            np.testing.assert_allclose(
                sharded[k], reference[k], rtol=1e-6, atol=1e-6, err_msg=k
            )
        else:
            np.testing.assert_array_equal(sharded[k], reference[k], err_msg=k)


@pytest.mark.slow
def test_vmapped_seeds_equal_single_device(runs):
    reference, single, _ = runs
    assert single["num_devices"] == NUM_DEVICES
    assert single["seeds_devices"] == NUM_DEVICES  # really spread, not replicated
    _compare(reference, single, "seeds_")
    _compare(reference, single, "seed_rollout_")
    assert not np.allclose(reference["seeds_y"][0], reference["seeds_y"][1])


def test_rollouts_equal_single_device(runs):
    reference, single, _ = runs
    # whole levels per device: 4 levels x G=2 over 4 devices -> [T, 2] each
    np.testing.assert_array_equal(single["grouped_shard_shape"], [HORIZON, 2])
    # pure data parallelism: no communication inside the sharded rollout
    assert single["grouped_collectives"] == 0
    _compare(reference, single, "grouped_")
    _compare(reference, single, "stream_")
    assert reference["grouped_terminated"].any()  # the comparison sees episode ends
    assert (reference["stream_episode"] > 0).any()  # ... and auto-resets


def test_variance_study_equal_single_device(runs):
    reference, single, _ = runs
    _compare(reference, single, "batch_")
    _compare(reference, single, "moments_")
    assert reference["batch_rloo"].shape[0] == 6
    # distinct batches: keys per batch index, not per device
    assert np.linalg.matrix_rank(reference["batch_reinforce"]) > 1


def test_a_zero_estimate_has_the_same_metrics_on_any_device_count(runs):
    reference, single, _ = runs
    assert reference["zero_tiny_estimates"] > 0  # the case is exercised
    for m in ("cos_true", "cos_pairwise", "snr", "rel_variance"):
        np.testing.assert_allclose(
            single[f"zero_{m}"], reference[f"zero_{m}"], rtol=1e-6, atol=1e-6, err_msg=m
        )


def test_two_processes_equal_single_device(runs):
    """2 processes x 2 CPU devices under jax.distributed (gloo), one global mesh."""
    reference, _, multi = runs
    assert multi["num_devices"] == NUM_DEVICES
    assert multi["seeds_devices"] == NUM_DEVICES
    for prefix in ("seeds_", "batch_"):
        _compare(reference, multi, prefix)


def test_concurrent_devices_give_the_one_device_bits(runs):
    reference, single, _ = runs
    assert reference["concurrent_devices"] == 0  # one device here: jit's placement
    assert single["concurrent_devices"] == NUM_DEVICES
    keys = [k for k in reference if k.startswith("concurrent_") and "devices" not in k]
    assert any("moments_groups" in k for k in keys)
    for k in keys:
        np.testing.assert_array_equal(single[k], reference[k], err_msg=k)


@pytest.mark.slow
def test_use_cpu_cores_restarts_the_backend_with_one_device_per_core():
    """Unset device count: the backend restarts with min(cores, max_devices) CPU
    devices, module-level arrays move over, and later calls leave it be."""
    script = """
import jax, rl_pg
from gymnax.environments.misc import frozen_lake
from rl_pg import distributed
assert jax.device_count() == 1
n = distributed.use_cpu_cores(max_devices=2)
assert n == jax.device_count() == min(distributed.usable_cores(), 2), n
assert isinstance(frozen_lake._DIRECTIONS, jax.Array)
env, env_params = rl_pg.make("FlappyBird-v0")
obs, state = env.reset(jax.random.PRNGKey(0), env_params)
assert distributed.use_cpu_cores(max_devices=1) == n  # now set: left be
print("devices", n)
"""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env | {"JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"devices {min(distributed.usable_cores(), 2)}" in done.stdout


def test_use_cpu_cores_leaves_a_set_device_count_and_multiple_processes(runs):
    _, single, multi = runs
    assert single["use_cpu_cores"] == NUM_DEVICES
    assert multi["use_cpu_cores"] == NUM_DEVICES // 2
    with pytest.raises(ValueError, match="max_devices"):
        distributed.use_cpu_cores(max_devices=0)


def test_indivisible_batches_raise_clear_errors(runs):
    _, single, _ = runs
    assert str(single["error_shard"]) == (
        "batch (6) is not divisible by the number of devices (4): "
        "use a multiple of 4 (or fewer devices)"
    )
    assert "number of levels (3) is not divisible" in str(single["error_levels"])
    assert "chunk (6) is not divisible" in str(single["error_chunk"])


def test_one_device_mesh_round_trip():
    mesh = distributed.batch_mesh(jax.devices()[:1])
    assert mesh.axis_names == ("batch",) and mesh.size == 1
    x = np.arange(12.0).reshape(4, 3)
    sharded = distributed.shard(x, mesh)
    assert sharded.sharding.spec == jax.sharding.PartitionSpec("batch")
    np.testing.assert_array_equal(distributed.gather(sharded), x)
    columns = distributed.shard({"a": x.T}, mesh, axis=1)["a"]
    assert columns.sharding.spec == jax.sharding.PartitionSpec(None, "batch")
    keys = distributed.shard(jax.random.split(jax.random.key(0), 4), mesh)
    np.testing.assert_array_equal(
        jax.random.key_data(keys),
        jax.random.key_data(jax.random.split(jax.random.key(0), 4)),
    )
    double = distributed.shard_vmap(lambda a, s: a * s, mesh, in_axes=(0, None))
    np.testing.assert_array_equal(distributed.gather(double(x, 2.0)), 2 * x)
    with pytest.raises(ValueError, match="in_axes"):
        distributed.shard_vmap(lambda a: a, mesh, in_axes=1)


# ------------------------------------------------------------------ the worker


def main(argv=None):
    """``python tests/test_distributed.py --out F.npz [--coordinator H:P ...]``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS))
    args = parser.parse_args(argv)
    if args.coordinator:
        distributed.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            initialization_timeout=TIMEOUT_S,
        )
    # the CPU device count is set (XLA_FLAGS), or the run is multi-process: left be
    out_cores = {"use_cpu_cores": np.array(distributed.use_cpu_cores())}
    mesh = distributed.batch_mesh()
    if args.num_processes == 1:
        out = compute(mesh, args.parts or tuple(PARTS)) | errors(mesh)
    else:
        out = compute(mesh, args.parts or MULTI_PARTS)
    out["num_devices"] = np.array(mesh.size)
    out |= out_cores
    if jax.process_index() == 0:
        np.savez(args.out, **out)


if __name__ == "__main__":
    main()
