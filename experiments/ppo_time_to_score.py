"""Wall-clock and env steps for default PPO to reach a held-out median of 10,000.

    python experiments/ppo_time_to_score.py --out DIR [--seeds 0,1,2,3,4]

One ``rl_pg.train.run`` per seed, one after another, each with fresh jit caches so
that its wall-clock includes compilation. After every evaluation whose validation
median reaches the target, the policy is scored on the held-out test levels; the
run stops at the first one whose held-out median reaches the target too. The
time and env steps of that moment (evaluations included) are the result.

Writes ``DIR/seed_<s>/`` (run directories), ``DIR/results.csv``,
``DIR/summary.md`` and ``DIR/summary.json``.
"""

import argparse
import csv
import time

import jax
import numpy as np

from rl_pg import evaluate as evaluation
from rl_pg import io, train
from rl_pg.algos import loop, ppo


def held_out_stopper(config, args, start, reached):
    """A ``run`` callback: stop at the first held-out median >= the target.

    Held-out levels are scored only once the validation median reaches the
    target; ``reached`` receives the time, steps and scores of that moment.
    """
    env, env_params = loop.make_env(config)
    act_fn = loop.greedy_act_fn(loop.make_policy(config))

    def on_eval(event: train.EvalEvent) -> bool:
        if event.val_median < args.target:
            return False
        result = evaluation.evaluate(
            act_fn,
            event.params,
            env,
            env_params,
            jax.random.PRNGKey(0),
            args.episodes,
            args.target,
        )
        scores = np.asarray(result.scores)
        if np.median(scores) < args.target:
            return False
        reached.update(
            wall_clock_s=time.perf_counter() - start,
            env_steps=event.env_steps,
            update=event.update,
            held_out_median=float(np.median(scores)),
            held_out_mean=float(np.mean(scores)),
        )
        return True

    return on_eval


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
        start = time.perf_counter()
        config = ppo.PPOConfig(
            seed=seed,
            total_env_steps=args.max_env_steps,
            eval_max_score=args.target,
            stop_at_score=None,
        )
        reached = {}
        on_eval = held_out_stopper(config, args, start, reached)
        result = train.run(
            config,
            out / f"seed_{seed}",
            progress=not args.no_progress,
            callback=on_eval,
            gif=False,
        )
        row = dict(
            seed=seed,
            reached=bool(reached),
            wall_clock_s=reached.get("wall_clock_s", float("nan")),
            env_steps=reached.get("env_steps", result.eval["trained_env_steps"]),
            updates=reached.get("update", -1),
            held_out_median=reached.get("held_out_median", result.eval["median_score"]),
            held_out_mean=reached.get("held_out_mean", result.eval["mean_score"]),
            env_steps_per_s=reached.get("env_steps", 0)
            / reached.get("wall_clock_s", float("inf")),
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
        "| seed | reached | wall-clock s (compile incl.) | env steps | held-out median |",
        "|---:|:---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {'yes' if r['reached'] else 'no'} | "
            f"{r['wall_clock_s']:.0f} | {r['env_steps'] / 1e6:.1f}M | "
            f"{r['held_out_median']:g} |"
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
