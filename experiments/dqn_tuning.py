"""DQN alone on the comparison budget, with config overrides (for tuning).

    python experiments/dqn_tuning.py --out DIR [--env-steps N] [--seeds 0,1,2]
        [--set lr=1e-3 --set n_step=5 ...]

The DQN row of ``experiments/compare_algorithms.py``: the same budget fields
(``total_env_steps``, ``eval_every_steps``), seeds trained side by side
(``rl_pg.train.train_seeds``), validation every ``--eval-every-steps``, the best
validation policy's median on the 32 held-out levels. Writes ``DIR/summary.json``
(config, per-seed held-out medians, validation curves, env steps/s, ``uptime``).
"""

import argparse
import os

from rl_pg import io, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--env-steps", type=int, default=10 * 2**20, help="per seed")
    parser.add_argument("--eval-every-steps", type=int, default=2**20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a DQNConfig override (repeatable)",
    )
    args = parser.parse_args()
    out = io.new_out_dir(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = dict(s.split("=", 1) for s in args.set)
    config = train.make_config(
        "dqn",
        {
            **overrides,
            "total_env_steps": args.env_steps,
            "eval_every_steps": args.eval_every_steps,
        },
    )
    print(config, flush=True)
    load_before = os.getloadavg()
    run = train.train_seeds(config, seeds)
    summary = dict(
        overrides=overrides,
        config=config.to_dict(),
        seeds=seeds,
        held_out_medians=[f["median_score"] for f in run.final],
        held_out_means=[f["mean_score"] for f in run.final],
        env_steps_per_seed=run.env_steps,
        train_time_s=run.train_time_s,
        env_steps_per_s=len(seeds) * run.env_steps / run.train_time_s,
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        curves=run.curves,
    )
    io.write_json(out / "summary.json", summary)
    for seed, curve in zip(seeds, run.curves, strict=True):
        print(seed, [(c["val_median"], round(c["train_score_mean"], 1)) for c in curve])
    print(
        f"{overrides or 'defaults'}: held-out medians {summary['held_out_medians']}, "
        f"{summary['env_steps_per_s']:,.0f} env steps/s, load {load_before}",
        flush=True,
    )


if __name__ == "__main__":
    main()
