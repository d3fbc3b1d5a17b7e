"""How the variance study's wall-clock grows with the number of trajectories.

    python experiments/variance_scaling.py --out DIR [--fractions 1/64,1/32,1/16,1/8]

The full preset's study (horizon 256, G = 4, batch sizes 4 to 1024, chunk 2048) on
one shipped policy (``--stage``), with the reference sample (131,072 trajectories)
and the number of batches (256) scaled by each fraction; fraction 1 is the full
preset. Each fraction runs twice: the first run compiles (its shapes depend on the
number of batches), the second is timed. A least-squares line t = a + b N over the
timed runs (N = trajectories sampled) says whether the growth is linear (a small
intercept, residuals within noise) and predicts the full preset's wall-clock per
stage. The gradient phase's FLOP/s is reported against a same-run matmul's.

Writes ``DIR/results.csv``, ``DIR/summary.json``, ``DIR/summary.md`` and
``DIR/scaling.png``.
"""

import argparse
import csv
import dataclasses
import time
from fractions import Fraction

import numpy as np

from rl_pg import distributed, io, variance
from rl_pg.variance import job
from rl_pg.variance import stages as stages_lib


def scaled(study: variance.StudyConfig, f: Fraction) -> variance.StudyConfig:
    reference = int(study.reference_trajectories * f)
    if reference < study.chunk or reference % study.chunk:
        raise ValueError(f"fraction {f} gives {reference} reference trajectories")
    num_batches = max(4, int(study.num_batches * f))
    return dataclasses.replace(
        study,
        reference_trajectories=reference,
        num_batches=num_batches,
        max_batches_per_size=max(num_batches, int(study.max_batches_per_size * f)),
    )


def plot(path, rows, fit, full_n):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["trajectories"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(n, [r["seconds"] for r in rows], "o", label="timed run (compiled)")
    ax.loglog(n, [r["first_run_seconds"] for r in rows], "x", label="first run")
    grid = np.geomspace(n.min(), full_n, 50)
    ax.loglog(grid, fit[0] + fit[1] * grid, "k--", lw=1, label="fit t = a + b N")
    ax.loglog([full_n], [fit[0] + fit[1] * full_n], "k*", ms=10, label="full preset")
    ax.set_xlabel("trajectories sampled per stage N")
    ax.set_ylabel("wall-clock per stage (s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--fractions", default="1/64,1/32,1/16,1/8")
    parser.add_argument("--stage", default="partial", help="shipped checkpoint")
    args = parser.parse_args()
    fractions = [Fraction(f) for f in args.fractions.split(",")]
    setting = job.PRESETS["full"]
    studies = [scaled(setting["study"], f) for f in fractions]  # validate first
    horizon = setting["horizon"]
    stages = {
        s.label: s
        for s in stages_lib.flappy_stages(None, horizon, setting["group_size"])
    }
    if args.stage not in stages:
        raise SystemExit(f"--stage must be one of {sorted(stages)}")
    devices = distributed.use_cpu_cores()  # as `rl-pg variance` does
    out = io.new_out_dir(args.out)
    io.write_config(
        out, {"script": "variance_scaling", "cpu_devices": devices, **vars(args)}
    )
    params, problem = stages[args.stage].params, stages[args.stage].problem

    rows = []
    for f, study in zip(fractions, studies, strict=True):
        runners = variance.make_runners(problem, study)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            result = variance.study_stage(params, runners, study, horizon)
            times.append(time.perf_counter() - start)
        trajectories = variance.total_work(study, 1)
        rows.append(
            dict(
                fraction=str(f),
                reference_trajectories=study.reference_trajectories,
                num_batches=study.num_batches,
                trajectories=trajectories,
                first_run_seconds=times[0],
                seconds=times[1],
                gradient_seconds=result.perf["gradient_seconds"],
                batch_phase_seconds=result.perf["batch_phase_seconds"],
                us_per_trajectory_step=1e6 * times[1] / (trajectories * horizon),
                gradient_flops_per_s=result.perf["gradient_flops_per_s"],
            )
        )
        print(rows[-1], flush=True)

    n = np.array([r["trajectories"] for r in rows], float)
    t = np.array([r["seconds"] for r in rows])
    slope, intercept = np.polyfit(n, t, 1)
    residual = t - (intercept + slope * n)
    full_n = variance.total_work(setting["study"], 1)
    matmul = variance.matmul_flops_per_s()
    flops = float(np.median([r["gradient_flops_per_s"] for r in rows]))
    summary = dict(
        slope_s_per_trajectory=slope,
        intercept_s=intercept,
        max_relative_residual=float(np.max(np.abs(residual) / t)),
        full_preset_trajectories_per_stage=full_n,
        full_preset_predicted_s_per_stage=intercept + slope * full_n,
        gradient_flops_per_s=flops,
        matmul_flops_per_s=matmul,
        gradient_flop_fraction=flops / matmul,
    )
    io.write_json(out / "summary.json", {"rows": rows, **summary})
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(out / "scaling.png", rows, (intercept, slope), full_n)
    lines = [
        f"# Variance study wall-clock against trajectories ({args.stage} policy)",
        "",
        "| fraction of full | reference | batches | trajectories N | first run (s) "
        "| timed run (s) | us per trajectory step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['fraction']} | {r['reference_trajectories']} | {r['num_batches']} "
        f"| {r['trajectories']:,} | {r['first_run_seconds']:.1f} | {r['seconds']:.1f} "
        f"| {r['us_per_trajectory_step']:.3f} |"
        for r in rows
    ]
    lines += [
        "",
        f"Fit t = {intercept:.2f} s + N x {slope * 1e3:.3f} ms (largest residual "
        f"{summary['max_relative_residual']:.1%}); full preset ({full_n:,} "
        f"trajectories per stage) predicted {summary['full_preset_predicted_s_per_stage']:.0f}"
        " s per stage. Gradient phase: "
        f"{flops / 1e9:.2f} GFLOP/s = {flops / matmul:.1%} of a same-run 1024x1024 "
        f"matmul ({matmul / 1e9:.1f} GFLOP/s).",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
