"""The variance study's batch phase, old path against new, and its gradient phase's
FLOP/s against a same-run matmul, at both presets' horizons, in one run.

    python experiments/study_speed.py --out DIR [--presets quick,full] [--batches 2]
        [--gradient-only]

For each preset (its horizon, group size and batch sizes; the ``--stage`` shipped
policy), three measurements of compiled functions, compilation excluded:

* batch phase, seconds per top-level batch (sampling included), with every studied
  estimator's gradient from its own loss on every sub-batch (``fast=False``, one
  forward and backward pass per (estimator, sub-batch)) and with the per-step score
  weights (``fast=True``: one forward pass and one VJP per sampled batch; the
  estimators without weights still take their loss path), and the sampling alone;
* the gradient phase of the reference sample (per-trajectory score and
  reward-to-go gradients, four preset chunks): XLA's FLOP count / seconds, as
  ``performance.json`` reports it, with the chunks on the first CPU device alone
  and dealt to every CPU device (the study's default; like ``rl-pg variance``, the
  script first gives the CPU one device per core);
* the new batch path's own FLOP/s (XLA's count of an unblocked trace of it).

With the ``lag`` preset, also the lag study's batch phase
(:func:`rl_pg.variance.lag_study.lag_estimates`: batches from the policy, every
lag estimator at a target at KL 0.01, weights and one VJP per sub-batch), seconds
per top-level batch (``lag_s_per_batch``).

``--gradient-only`` measures the gradient phase alone (the batch phase's columns
are left empty).

The 1024x1024 float32 matmul is timed before and after (best of 20 each) and
every FLOP/s is quoted as a fraction of the faster. Writes ``DIR/speed.json`` and
``DIR/speed.md``.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import distributed, io, variance
from rl_pg.variance import job, kernels, lag, lag_study, problems, stages
from rl_pg.variance import runners as runners_lib

# the batch phase's columns (nan with --gradient-only)
ROW_KEYS = (
    "sample_s_per_batch",
    "old_s_per_batch",
    "new_s_per_batch",
    "batch_phase_speedup",
    "new_batch_gradient_flops_per_s",
    "lag_s_per_batch",
)


def _best(fn, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _gradient_phase(problem, config, params, key) -> dict:
    """The reference sample's gradient phase as the study measures it (4 chunks),
    on the first CPU device alone and on every one (the default)."""
    chunk, row = config.chunk, {}
    for label, devices in (("_one_device", jax.local_devices()[:1]), ("", None)):
        runners = variance.make_runners(problem, config, concurrent_devices=devices)
        _, perf = variance.trajectory_moments(
            params, runners, key, 4 * chunk, chunk, 4 * chunk // (chunk // 4)
        )
        row[f"gradient_flops_per_s{label}"] = perf["gradient_flops_per_s"]
    return row


def _lag_batch_phase(problem, config, params, key, per_call: int) -> dict:
    """The lag study's batch phase at a target at KL 0.01: s per top-level batch
    (the preset's batches, compiled first)."""
    target = lag.targets_at_kl(key, params, problem.apply_fn, problem.sample, (0.01,))[
        0
    ].params
    args = (params, target, problem, config, key, per_call, 0.0)
    lag_study.lag_estimates(*args)  # compiles
    start = time.perf_counter()
    lag_study.lag_estimates(*args)
    return {"lag_s_per_batch": (time.perf_counter() - start) / config.num_batches}


def measure(preset: str, stage: str, batches: int, gradient_only: bool) -> dict:
    setting = job.PRESETS[preset]
    config, horizon = setting["study"], setting["horizon"]
    found = {
        s.label: s for s in stages.flappy_stages(None, horizon, setting["group_size"])
    }
    params, problem = found[stage].params, found[stage].problem
    largest = max(config.batch_sizes)
    per_call = min(
        config.num_batches, max(1, config.steps_per_call // (largest * horizon))
    )
    calls = max(1, batches // per_call)
    key = jax.random.PRNGKey(0)
    row = {"preset": preset, "horizon": horizon, "top_batch": largest}

    if gradient_only:
        return row | _gradient_phase(problem, config, params, key)

    sample = jax.jit(problem.sample, static_argnums=2)
    jax.block_until_ready(sample(key, params, largest))
    row["sample_s_per_batch"] = _best(lambda: sample(key, params, largest), 3)

    for label, fast in (("old", False), ("new", True)):
        runners = variance.make_runners(problem, config, fast=fast)
        variance.batch_estimates(params, runners, key, per_call, per_call, 0.0)
        start = time.perf_counter()
        variance.batch_estimates(params, runners, key, calls * per_call, per_call, 0.0)
        row[f"{label}_s_per_batch"] = (time.perf_counter() - start) / (calls * per_call)
    row["batch_phase_speedup"] = row["old_s_per_batch"] / row["new_s_per_batch"]
    if preset == "lag":
        row |= _lag_batch_phase(problem, config, params, key, per_call)

    row |= _gradient_phase(problem, config, params, key)

    # the new batch path's gradient computation on one sampled top-level batch
    batch = sample(key, params, largest)
    weight_fns = problems.weight_suite(problem, config.suite, jnp.float32(0.0))
    counts = runners.sub_batches
    blocked = jax.jit(
        kernels.score_weight_estimates(
            problem, weight_fns, counts, runners_lib.CPU_BLOCK_STEPS
        )
    )
    unblocked = jax.jit(kernels.score_weight_estimates(problem, weight_fns, counts))
    flops = runners_lib.xla_flops(unblocked, params, batch)
    compiled = blocked.lower(params, batch).compile()
    row["new_batch_gradient_s"] = _best(lambda: compiled(params, batch), 3)
    row["new_batch_gradient_flops_per_s"] = flops / row["new_batch_gradient_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--presets", default="quick,full")
    parser.add_argument("--stage", default="partial", help="shipped checkpoint")
    parser.add_argument("--batches", type=int, default=2, help="timed top batches")
    parser.add_argument(
        "--gradient-only", action="store_true", help="skip the batch phase"
    )
    args = parser.parse_args()
    presets = args.presets.split(",")
    unknown = [p for p in presets if p not in job.PRESETS]
    if unknown:
        raise SystemExit(f"unknown presets {unknown}")
    devices = distributed.use_cpu_cores()  # as `rl-pg variance` does
    out = io.new_out_dir(args.out)
    io.write_config(out, {"script": "study_speed", **vars(args)})
    load = os.getloadavg()
    matmul = [variance.matmul_flops_per_s.__wrapped__()]
    rows = [measure(p, args.stage, args.batches, args.gradient_only) for p in presets]
    matmul.append(variance.matmul_flops_per_s.__wrapped__())
    ceiling = max(matmul)
    for r in rows:
        r["gradient_fraction_of_matmul"] = r["gradient_flops_per_s"] / ceiling
        r["gradient_fraction_of_matmul_one_device"] = (
            r["gradient_flops_per_s_one_device"] / ceiling
        )
        r["new_batch_fraction_of_matmul"] = (
            r.get("new_batch_gradient_flops_per_s", np.nan) / ceiling
        )
    load_after = os.getloadavg()
    summary = {
        "rows": rows,
        "cpu_devices": devices,
        "matmul_flops_per_s": matmul,
        "load_before": load,
        "load_after": load_after,
    }
    io.write_json(out / "speed.json", summary)
    lines = [
        f"# Variance study speed ({args.stage} policy, {args.batches} timed batches)",
        "",
        "| preset | horizon | top batch | sampling s/batch | old batch phase s/batch "
        "| new s/batch | speed-up | gradient phase, 1 device, GFLOP/s (% matmul) "
        "| gradient phase, every CPU device | new batch gradients "
        "| lag batch phase s/batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        r = {k: r.get(k, np.nan) for k in ROW_KEYS} | r
        lines.append(
            f"| {r['preset']} | {r['horizon']} | {r['top_batch']} "
            f"| {r['sample_s_per_batch']:.2f} | {r['old_s_per_batch']:.2f} "
            f"| {r['new_s_per_batch']:.2f} | {r['batch_phase_speedup']:.1f}x "
            f"| {r['gradient_flops_per_s_one_device'] / 1e9:.1f} "
            f"({r['gradient_fraction_of_matmul_one_device']:.1%}) "
            f"| {r['gradient_flops_per_s'] / 1e9:.1f} "
            f"({r['gradient_fraction_of_matmul']:.1%}) "
            f"| {r['new_batch_gradient_flops_per_s'] / 1e9:.1f} "
            f"({r['new_batch_fraction_of_matmul']:.1%}) "
            f"| {r['lag_s_per_batch']:.2f} |"
        )
    lines += [
        "",
        f"Same-run 1024x1024 float32 matmul: {matmul[0] / 1e9:.0f} GFLOP/s before, "
        f"{matmul[1] / 1e9:.0f} after (fractions use the faster). {devices} CPU "
        "device(s) (`rl_pg.distributed.use_cpu_cores`). Load average "
        f"(1, 5, 15 min) before {tuple(round(x, 2) for x in load)}, after "
        f"{tuple(round(x, 2) for x in load_after)}.",
    ]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
