"""Every algorithm under the same env-step budget, several seeds.

    python experiments/compare_algorithms.py --out DIR [--env-steps N] [--seeds 0,1,2]

Each algorithm trains its seeds side by side (``rl_pg.train.train_seeds``, one
``jit(vmap)``), is scored on validation levels every ``--eval-every-steps`` and
reports its best policy's held-out median. A second, shorter pass trains the same
seeds one after another and side by side without evaluation, for the speedup of
``vmap`` over sequential seeds.

Writes ``DIR/curves.csv``, ``DIR/results.csv``, ``DIR/table.md``,
``DIR/learning_curves.png/.pdf/.svg`` and ``DIR/summary.json``; with
``rl_pg[viz]`` also the IQM and median over seeds with stratified-bootstrap 95%
intervals (rliable) in the table and ``summary.json``, and
``DIR/performance_profile.png/.pdf/.svg``.
"""

import argparse
import csv
import json

import jax
import numpy as np

from rl_pg import extras, figures, io, train
from rl_pg.runs import aggregate

# name -> (algo, overrides); episodic algorithms count every simulated step.
ALGORITHMS = {
    "ppo": ("ppo", {}),
    "a2c": ("a2c", {}),
    "reinforce": (
        "reinforce",
        {"estimator": "reinforce", "num_levels": 32, "group_size": 1},
    ),
    "rloo": ("reinforce", {"estimator": "rloo"}),
    "grpo": ("grpo", {}),
    "dr_grpo": ("grpo", {"dr_grpo": True}),
    # value-based baselines (rl_pg.algos.qlearning, rl_pg.algos.dqn)
    "qlearning": ("qlearning", {}),
    "dqn": ("dqn", {}),
}


def plot(path, curves):
    """Median over seeds of the validation median (band: min to max) against
    env steps and against wall-clock, in the paper style of ``rl_pg.figures``,
    as PNG, PDF and SVG; returns the files written."""
    plt = figures.pyplot()
    from matplotlib import ticker

    with plt.rc_context(figures.STYLE):
        fig, axes = plt.subplots(
            1, 2, figsize=(7.0, 2.8), sharey=True, layout="constrained"
        )
        for i, (name, per_seed) in enumerate(curves.items()):
            steps = np.array([r["env_steps"] for r in per_seed[0]], float)
            times = np.array([r["train_time_s"] for r in per_seed[0]], float)
            scores = np.array([[r["val_median"] for r in seed] for seed in per_seed])
            palette = figures.OKABE_ITO
            style = dict(
                color=palette[i % len(palette)],
                linestyle=figures.LINESTYLES[i // len(palette)],
                marker=figures.MARKERS[i % len(figures.MARKERS)],
                markersize=2.5,
            )
            for ax, x in zip(axes, (steps, times), strict=True):
                ax.plot(
                    x, np.median(scores, 0), label=name, gid=f"series:{name}", **style
                )
                ax.fill_between(
                    x,
                    scores.min(0),
                    scores.max(0),
                    color=style["color"],
                    alpha=0.12,
                    lw=0,
                )
        figures.score_axis(axes[0])
        figures.steps_axis(axes[0])
        axes[0].set_xlabel("env steps per seed")
        axes[1].set_xlabel(
            "training wall-clock of the vmapped seeds (s, compile incl.)"
        )
        axes[0].set_ylabel("greedy validation median (pipes)")
        axes[1].set_xscale("log")
        axes[1].xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axes[1].xaxis.set_minor_formatter(  # 20, 50, 200, ...: not every minor tick
            ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")
        )
        for ax in axes:
            ax.grid(alpha=0.25, lw=0.5)
        axes[1].legend(frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
        fig.supxlabel(
            "lines: median over seeds; bands: min to max",
            fontsize=6,
            x=0.99,
            ha="right",
        )
    written = figures.save(fig, path, figures.FORMATS)
    plt.close(fig)
    return written


def seed_statistics(out, table):
    """IQM and median over seeds with 95% intervals (rliable) into
    summary.json's ``seed_statistics``, and the performance profiles; None
    (and one line) without the viz extra."""
    scores = {t["algo"]: t["held_out_medians"] for t in table}
    try:
        stats = aggregate.interval_estimates(scores, feature="seed statistics")
        profile = aggregate.performance_profiles(scores)
    except extras.MissingExtraError as error:
        print(f"skipped: {error}")
        return None
    fig = figures.profile_figure(profile)
    figures.save(fig, out / "performance_profile.png", figures.FORMATS)
    summary = json.loads((out / "summary.json").read_text())
    io.write_json(out / "summary.json", {**summary, "seed_statistics": stats})
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--env-steps", type=int, default=10 * 2**20, help="per seed")
    parser.add_argument("--eval-every-steps", type=int, default=2**20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algos", default=",".join(ALGORITHMS))
    parser.add_argument(
        "--speedup-env-steps",
        type=int,
        default=2**20,
        help="per seed, for the vmap-vs-sequential timing (0: skip)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    out = io.new_out_dir(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.algos.split(",")
    io.write_config(out, {"script": "compare_algorithms", **vars(args)})

    curves, results, table = {}, [], []
    curve_rows = []
    for name in names:
        algo, overrides = ALGORITHMS[name]
        common = {
            "total_env_steps": args.env_steps,
            "eval_every_steps": args.eval_every_steps,
        }
        config = train.make_config(algo, {**overrides, **common})
        print(f"{name}: {config}", flush=True)
        run = train.train_seeds(config, seeds, progress=not args.no_progress)
        curves[name] = run.curves
        for seed, per_seed in zip(seeds, run.curves, strict=True):
            curve_rows += [dict(algo=name, seed=seed, **r) for r in per_seed]
        finals = [f["median_score"] for f in run.final]
        for seed, final, per_seed in zip(seeds, run.final, run.curves, strict=True):
            results.append(
                dict(
                    algo=name,
                    seed=seed,
                    held_out_median=final["median_score"],
                    held_out_mean=final["mean_score"],
                    best_val_median=per_seed[-1]["best_median"],
                )
            )
        throughput = len(seeds) * run.env_steps / run.train_time_s
        speedup = None
        if args.speedup_env_steps:
            short = train.make_config(
                algo,
                {
                    **overrides,
                    "total_env_steps": args.speedup_env_steps,
                    "eval_every_steps": args.speedup_env_steps,
                },
            )
            jax.clear_caches()  # each pass pays its own compilation
            alone = train.train_seeds(short, seeds, vmap=False, evaluate=False)
            jax.clear_caches()
            together = train.train_seeds(short, seeds, vmap=True, evaluate=False)
            speedup = dict(
                sequential_s=alone.train_time_s,
                vmapped_s=together.train_time_s,
                speedup=alone.train_time_s / together.train_time_s,
            )
        table.append(
            dict(
                algo=name,
                settings=overrides or "defaults",
                held_out_medians=finals,
                median_over_seeds=float(np.median(finals)),
                mean_score=float(np.mean([f["mean_score"] for f in run.final])),
                env_steps_per_seed=run.env_steps,
                train_time_s=run.train_time_s,
                env_steps_per_s=throughput,
                vmap=speedup,
            )
        )
        print(table[-1], flush=True)
        io.write_json(out / "summary.json", {"seeds": seeds, "algorithms": table})

    for filename, rows in (("curves.csv", curve_rows), ("results.csv", results)):
        with open(out / filename, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    plot(out / "learning_curves.png", curves)
    stats = seed_statistics(out, table)
    lines = [
        f"# Algorithms at {args.env_steps / 1e6:.1f}M env steps per seed, "
        f"seeds {seeds}",
        "",
        "Held-out median: greedy, best validation checkpoint, 32 test levels, cap "
        "10,000. Throughput: env steps per second of the vmapped seeds together, "
        "updates, compilation and validation included (episodic algorithms count "
        "only live steps), final evaluation excluded. vmap speedup: "
        "sequential seeds' training time over vmapped seeds' (short runs of "
        f"{args.speedup_env_steps / 1e6:.1f}M steps per seed, compile included).",
        "",
        "| algorithm | settings | held-out median per seed | median | "
        "env steps/s | vmap speedup |",
        "|---|---|---|---:|---:|---:|",
    ]
    for t in table:
        settings = (
            "defaults"
            if t["settings"] == "defaults"
            else ", ".join(f"{k}={v}" for k, v in t["settings"].items())
        )
        speed = f"{t['vmap']['speedup']:.2f}x" if t["vmap"] else "-"
        lines.append(
            f"| {t['algo']} | {settings} | "
            f"{', '.join(f'{m:g}' for m in t['held_out_medians'])} | "
            f"{t['median_over_seeds']:g} | {t['env_steps_per_s']:,.0f} | {speed} |"
        )
    if stats:
        lines += [
            "",
            "Across seeds (Agarwal et al. 2021, rliable): interquartile mean and "
            "median of the held-out medians, stratified-bootstrap 95% intervals; "
            "performance profiles in performance_profile.png.",
            "",
            aggregate.markdown_table(stats, "algorithm"),
        ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
