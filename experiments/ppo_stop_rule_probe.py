"""How well does a validation round predict the held-out score? (PPO stop rule.)

    python experiments/ppo_stop_rule_probe.py --out DIR [--seed 0] [--until-stop]

Trains default PPO with ``stop_at_score=None`` and, for analysis only, scores every
policy whose validation median reaches ``--threshold`` on the 128 fresh validation
levels of the stop rule's confirmation (``rl_pg.evaluate.CONFIRMATION_SEED``) and on
the 32 held-out test levels. The test scores never steer training or stopping.
With ``--until-stop`` the run ends where the default stop rule would stop it.
Writes ``DIR/run/`` (the run directory) and ``DIR/probe.jsonl`` (one row per
evaluation).
"""

import argparse
import json

import jax
import numpy as np

from rl_pg import evaluate as ev
from rl_pg import io, train
from rl_pg.algos import loop, ppo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=2_000)
    parser.add_argument("--max-env-steps", type=int, default=40_000_000)
    parser.add_argument("--until-stop", action="store_true")
    args = parser.parse_args()
    out = io.new_out_dir(args.out)
    defaults = ppo.PPOConfig()
    config = ppo.PPOConfig(
        seed=args.seed, total_env_steps=args.max_env_steps, stop_at_score=None
    )
    target = defaults.stop_at_score
    env, env_params = loop.make_env(config)
    act = loop.greedy_act_fn(loop.make_policy(config))

    def scores(params, num, seed):
        keys = ev.held_out_keys(num, seed)
        result = ev.evaluate(
            act,
            params,
            env,
            env_params,
            jax.random.PRNGKey(0),
            max_score=target,
            reset_keys=keys,
        )
        return np.asarray(result.scores)

    path = out / "probe.jsonl"

    def on_eval(event: train.EvalEvent) -> bool:
        row = dict(
            update=event.update, env_steps=event.env_steps, val_median=event.val_median
        )
        stop = False
        if event.val_median >= args.threshold:
            fresh = scores(
                event.params, defaults.stop_confirm_episodes, ev.CONFIRMATION_SEED
            )
            test = scores(event.params, 32, ev.HELD_OUT_SEED)
            row.update(
                fresh_at_cap=float(np.mean(fresh >= target)),
                test_median=float(np.median(test)),
                test_at_cap=int(np.sum(test >= target)),
            )
            stop = args.until_stop and (
                event.val_median >= target
                and row["fresh_at_cap"] >= defaults.stop_confirm_fraction
            )
        with open(path, "a") as log:
            print(json.dumps(row), file=log)
        return stop

    train.run(config, out / "run", progress=False, callback=on_eval, gif=False)


if __name__ == "__main__":
    main()
