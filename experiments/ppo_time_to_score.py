"""Wall-clock and env steps for default PPO to stop with a held-out median of 10,000.

    python experiments/ppo_time_to_score.py --out DIR [--seeds 0,1,2,3,4]

One ``rl_pg.train.run`` per seed with the default config, one after another, each
with fresh jit caches so that its wall-clock includes compilation. The run stops
by its own rule, which sees validation levels only (a validation median at the
target, confirmed on ``stop_confirm_episodes`` fresh validation levels); the 32
held-out test levels are scored once, at the end, as ``eval.json``. The result is
the time and env steps at the stop (evaluations included) and the held-out score.

Writes ``DIR/seed_<s>/`` (run directories), ``DIR/results.csv``,
``DIR/summary.md`` and ``DIR/summary.json``.
"""

import argparse
import csv

import jax
import numpy as np

from rl_pg import io, train
from rl_pg.algos import ppo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--target", type=int, default=10_000)
    parser.add_argument("--episodes", type=int, default=32, help="held-out levels")
    parser.add_argument(
        "--max-env-steps", type=int, default=60_000_000, help="give up after this"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    out = io.new_out_dir(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    io.write_config(out, {"script": "ppo_time_to_score", **vars(args)})

    rows = []
    for seed in seeds:
        jax.clear_caches()  # every seed pays its own compilation
        config = ppo.PPOConfig(
            seed=seed,
            total_env_steps=args.max_env_steps,
            eval_max_score=args.target,
            stop_at_score=args.target,
            final_eval_episodes=args.episodes,
        )
        result = train.run(
            config, out / f"seed_{seed}", progress=not args.no_progress, gif=False
        )
        data = result.eval
        row = dict(
            seed=seed,
            reached=data["median_score"] >= args.target,
            stopped_early=data["trained_env_steps"]
            < config.num_updates * config.steps_per_update,
            wall_clock_s=data["wall_clock_s"],
            env_steps=data["env_steps"],  # when the kept (stopping) policy was saved
            updates=data["best_update"],
            held_out_median=data["median_score"],
            held_out_mean=data["mean_score"],
            held_out_at_cap=int(np.sum(np.asarray(data["scores"]) >= args.target)),
            env_steps_per_s=data["trained_env_steps"] / data["wall_clock_s"],
        )
        rows.append(row)
        print(row, flush=True)
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(rows)

    times = np.array([r["wall_clock_s"] for r in rows if r["reached"]])
    steps = np.array([r["env_steps"] for r in rows if r["reached"]])
    summary = dict(
        seeds=seeds,
        reached=int(sum(r["reached"] for r in rows)),
        wall_clock_s=dict(
            median=float(np.median(times)) if times.size else None,
            min=float(times.min()) if times.size else None,
            max=float(times.max()) if times.size else None,
        ),
        env_steps=dict(
            median=float(np.median(steps)) if steps.size else None,
            min=int(steps.min()) if steps.size else None,
            max=int(steps.max()) if steps.size else None,
        ),
        device=str(jax.devices()[0]),
    )
    io.write_json(out / "summary.json", {"rows": rows, **summary})
    lines = [
        f"# PPO (default) time to a held-out median of {args.target:,} pipes",
        "",
        f"| seed | held-out median {args.target:,} | held-out levels at the cap | "
        "wall-clock s (compile incl.) | env steps |",
        "|---:|:---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {'yes' if r['reached'] else 'no'} "
            f"({r['held_out_median']:g}) | {r['held_out_at_cap']}/{args.episodes} | "
            f"{r['wall_clock_s']:.0f} | {r['env_steps'] / 1e6:.1f}M |"
        )
    if times.size:
        lines += [
            "",
            f"Reached by {len(times)} of {len(rows)} seeds; wall-clock median "
            f"{np.median(times):.0f} s (min {times.min():.0f}, max {times.max():.0f}); "
            f"env steps median {np.median(steps) / 1e6:.1f}M (min "
            f"{steps.min() / 1e6:.1f}M, max {steps.max() / 1e6:.1f}M).",
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
