"""Tabular Q-learning over several seeds: env steps and wall-clock to 10,000 pipes.

Trains the "default" preset of ``rl_pg.algos.qlearning`` (binned distances to the
next pipe plus velocity, epsilon = 0.01, 64 envs sharing one table) once per
seed, one after another in this process, each run stopping when the validation
median reaches ``stop_at_score`` (10,000 pipes) and then scored on the held-out
test levels.

    python experiments/qlearning_seeds.py --out runs/qlearning_seeds

Writes into --out (which must not exist, or be empty):

    seed_<s>/       a full run directory per seed (config.json, metrics.csv,
                    eval.json, checkpoints/, learning_curve.png, agent.gif)
    results.json    per-seed numbers, the config and library versions
    results.md      the same as a markdown table

Wall-clock is measured inside each run from its start; the first seed pays the
JIT compilation, later seeds in the same process reuse it (``compiled`` column).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from rl_pg import io, train
from rl_pg.algos import qlearning


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--preset", default="default", choices=sorted(qlearning.PRESETS)
    )
    parser.add_argument("--total-env-steps", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def run_seed(config: qlearning.QLearningConfig, out_dir: Path, progress: bool) -> dict:
    result = train.run(config, out_dir, progress=progress)
    ev = result.eval
    reached = config.stop_at_score is not None and (
        ev["best_validation_median"] >= config.stop_at_score
    )
    return dict(
        seed=config.seed,
        reached_target=bool(reached),
        env_steps=ev["env_steps"],
        wall_clock_s=round(ev["wall_clock_s"], 1),
        total_wall_clock_s=round(ev["wall_clock_s"] + ev["eval_wall_clock_s"], 1),
        validation_median=ev["best_validation_median"],
        test_median=ev["median_score"],
        test_mean=round(ev["mean_score"], 1),
        test_crashed=ev["num_crashed"],
        test_episodes=ev["num_episodes"],
        total_env_steps=ev["trained_env_steps"],
    )


def markdown(rows: list[dict], config: qlearning.QLearningConfig) -> str:
    target = config.stop_at_score
    lines = [
        f"# Tabular Q-learning, {len(rows)} seeds",
        "",
        f"Config: {config.num_envs} envs, epsilon {config.epsilon}, alpha "
        f"{config.alpha}, gamma {config.gamma}, bins {config.bin_size} px, velocity "
        f"{'on' if config.use_velocity else 'off'}; validation every "
        f"{config.eval_every_steps:,} env steps on {config.eval_episodes} levels; "
        f"stop at a validation median of {target}; budget "
        f"{config.total_env_steps:,} env steps. Test: {config.final_eval_episodes} "
        f"held-out levels, capped at {config.eval_max_score:,} pipes.",
        "",
        "| seed | compiled | env steps to target | wall-clock to target (s) "
        "| test median | test mean | crashed | run total (s) |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        steps = f"{r['env_steps']:,}" if r["reached_target"] else "not reached"
        lines.append(
            f"| {r['seed']} | {'yes' if i == 0 else 'cached'} | {steps} "
            f"| {r['wall_clock_s']} | {r['test_median']:g} | {r['test_mean']:g} "
            f"| {r['test_crashed']}/{r['test_episodes']} | {r['total_wall_clock_s']} |"
        )
    reached = [r for r in rows if r["reached_target"]]
    if reached:
        steps = [r["env_steps"] for r in reached]
        clock = [r["wall_clock_s"] for r in reached]
        lines += [
            "",
            f"Reached the target: {len(reached)}/{len(rows)} seeds. Env steps to "
            f"target: median {statistics.median(steps):,.0f} (min {min(steps):,}, max "
            f"{max(steps):,}); wall-clock to target: median "
            f"{statistics.median(clock):.1f} s (min {min(clock)}, max {max(clock)}).",
        ]
    lines += [
        "",
        "Wall-clock to target is measured from the start of the run (the first "
        "seed's includes JIT compilation) to the end of the validation that "
        "reached the target; run total adds the held-out test evaluation, the "
        "plot and the GIF.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"--out {args.out} exists and is not empty; choose a new directory")
    overrides = {}
    if args.total_env_steps is not None:
        overrides["total_env_steps"] = args.total_env_steps
    base = qlearning.preset(args.preset, **overrides)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    rows = []
    for seed in args.seeds:
        config = dataclasses.replace(base, seed=seed)
        rows.append(run_seed(config, args.out / f"seed_{seed}", not args.no_progress))
        print(json.dumps(rows[-1]))

    (args.out / "results.md").write_text(markdown(rows, base))
    results = dict(
        preset=args.preset,
        config=dataclasses.asdict(base),
        seeds=rows,
        elapsed_s=round(time.perf_counter() - start, 1),
        versions=io.versions(),
    )
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(rows, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
