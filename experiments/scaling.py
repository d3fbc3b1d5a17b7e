"""Throughput of the sharded batch axis against the device count and num_envs.

Two numbers per (devices, num_envs), each measured with the batch axis split
across the devices by ``rl_pg.distributed`` (the library code is unchanged):

* env steps/s of a sharded streaming rollout (``streaming_rollout(..., mesh)``,
  FlappyBird-v0, an MLP policy (64, 64), ``--horizon`` steps per call, best of
  ``--repeats`` calls after compilation);
* trajectory gradients/s of the variance study (``make_runners(..., mesh)`` and
  ``trajectory_moments``: a score and a reward-to-go gradient per trajectory,
  ``num_envs`` trajectories per chunk split across the devices, gradient phase
  only).

    python experiments/scaling.py --out runs/scaling

Each device count runs in its own subprocess (``--worker``). On CPU the devices
are forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count``):
they share the machine's cores, so they show the sharding overhead, not
multi-device scaling. On GPUs the first d devices are used (d up to the device count).

Writes into --out (which must not exist, or be empty):

    scaling.json    device kind, platform, cores, every measurement, the note
    scaling.md      the same as a markdown table, with speed-ups over 1 device
    config.json     arguments and library versions
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FORCED_NOTE = (
    "CPU devices here are forced host devices "
    "(--xla_force_host_platform_device_count) sharing the same {cores} cores, and "
    "a 1-device program can already use several cores (XLA's intra-op threads): "
    "the ratios show the cost of sharding on one machine and scheduling noise, not "
    "multi-device scaling. Run on several GPUs for that."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--devices",
        type=int,
        nargs="+",
        help="device counts (default CPU: 1 2 4; GPU: 1 2 4 ... up to all)",
    )
    parser.add_argument("--num-envs", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--horizon", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and not args.probe and args.out is None:
        parser.error("--out is required")
    return args


# ---------------------------------------------------------------- the worker


def measure(args: argparse.Namespace) -> list[dict]:
    """Both throughputs for every num_envs on the first ``args.worker`` devices."""
    import jax
    import jax.numpy as jnp

    import rl_pg
    from rl_pg import distributed, variance
    from rl_pg.policies import mlp_policy
    from rl_pg.rollout import stream_init, streaming_rollout

    mesh = distributed.batch_mesh(jax.devices()[: args.worker])
    env, env_params = rl_pg.make("FlappyBird-v0")
    policy = mlp_policy(2, hidden=(64, 64))
    key = jax.random.PRNGKey(args.seed)
    params = distributed.replicate(policy.init(key, jnp.zeros(12)), mesh)
    problem = variance.flappy_problem(
        policy.apply, env, env_params, args.horizon, args.group_size
    )
    rows = []
    for n in args.num_envs:
        init = jax.jit(lambda k, n=n: stream_init(k, env, env_params, n, mesh))
        run = jax.jit(
            lambda k, p, s: streaming_rollout(
                k, p, policy.apply, env, env_params, s, args.horizon, mesh
            )
        )
        stream = init(distributed.replicate(key, mesh))
        keys = [
            distributed.replicate(jax.random.fold_in(key, i), mesh)
            for i in range(args.repeats + 1)
        ]
        jax.block_until_ready(run(keys[0], params, stream))  # compile
        best = float("inf")
        for k in keys[1:]:
            start = time.perf_counter()
            jax.block_until_ready(run(k, params, stream))
            best = min(best, time.perf_counter() - start)

        study = variance.StudyConfig(
            batch_sizes=(args.group_size,),
            reference_trajectories=args.repeats * n,
            reference_groups=args.repeats,  # one group per chunk (>= 4 repeats)
            chunk=n,
            suite=variance.SuiteConfig(names=("reinforce",)),
        )
        runners = variance.make_runners(problem, study, mesh=mesh)
        _, perf = variance.trajectory_moments(
            params, runners, key, args.repeats * n, n, study.reference_groups
        )
        rows.append(
            {
                "devices": mesh.size,
                "num_envs": n,
                "env_steps_per_s": n * args.horizon / best,
                "trajectory_gradients_per_s": perf["trajectory_gradients_per_s"],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def probe() -> dict:
    import jax

    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
    }


# ---------------------------------------------------------------- the driver


def _subprocess(argv: list[str], env: dict) -> dict | list:
    done = subprocess.run(
        [sys.executable, __file__, *argv],
        env=os.environ | env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"{argv} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    rows = results["results"]
    base = {r["num_envs"]: r for r in rows if r["devices"] == 1}
    lines = [
        f"Sharded throughput on {results['device_kind']} ({results['platform']}, "
        f"{results['cpu_count']} CPU cores), jax {results['jax_version']}; "
        f"horizon {results['config']['horizon']}.",
        "",
    ]
    if results["note"]:
        lines += [results["note"], ""]
    lines += [
        "| devices | num_envs | env steps/s | vs 1 device "
        "| trajectory gradients/s | vs 1 device |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        one = base.get(r["num_envs"])
        steps_x = f"{r['env_steps_per_s'] / one['env_steps_per_s']:.2f}x" if one else ""
        grads_x = (
            f"{r['trajectory_gradients_per_s'] / one['trajectory_gradients_per_s']:.2f}x"
            if one
            else ""
        )
        lines.append(
            f"| {r['devices']} | {r['num_envs']} | {r['env_steps_per_s']:,.0f} "
            f"| {steps_x} | {r['trajectory_gradients_per_s']:,.0f} | {grads_x} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return
    if args.worker is not None:
        print(json.dumps(measure(args)))
        return

    from rl_pg import io

    out = io.new_out_dir(args.out)
    # Probe in a subprocess: this process never starts a backend, so it holds no
    # accelerator memory while the workers run.
    info = _subprocess(["--probe"], {})
    forced = info["platform"] == "cpu"
    if args.devices:
        counts = sorted(set(args.devices))
    elif forced:
        counts = [1, 2, 4]
    else:
        counts = [d for d in (1, 2, 4, 8, 16, 32) if d <= info["device_count"]]
        counts += [] if info["device_count"] in counts else [info["device_count"]]
    if not forced and max(counts) > info["device_count"]:
        raise SystemExit(f"only {info['device_count']} {info['platform']} devices")
    bad = [(n, d) for n in args.num_envs for d in counts if n % (d * args.group_size)]
    if bad:
        raise SystemExit(
            f"num_envs must be divisible by devices x group_size: (num_envs, devices) "
            f"{bad}"
        )
    io.write_config(out, {"command": "experiments/scaling.py", **vars(args)})
    shared = [
        *("--num-envs", *map(str, args.num_envs)),
        *("--horizon", str(args.horizon), "--group-size", str(args.group_size)),
        *("--repeats", str(args.repeats), "--seed", str(args.seed)),
    ]
    rows = []
    for d in counts:
        env = (
            {"XLA_FLAGS": f"--xla_force_host_platform_device_count={d}"}
            if forced
            else {}
        )
        print(f"{d} device(s) ...", file=sys.stderr, flush=True)
        rows += _subprocess(["--worker", str(d), *shared], env)
    results = {
        **info,
        "forced_host_devices": forced,
        "note": FORCED_NOTE.format(cores=info["cpu_count"]) if forced else "",
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "probe")},
        "results": rows,
    }
    io.write_json(out / "scaling.json", results)
    (out / "scaling.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
