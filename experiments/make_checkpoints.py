"""Train PPO (default settings) and save three policy checkpoints.

    python experiments/make_checkpoints.py --out DIR [--seed 0]

Writes ``DIR/initial`` (the initial parameters), ``DIR/partial`` (the first
policy whose held-out median lies in [--partial-low, --partial-high] pipes) and
``DIR/good`` (the best validation checkpoint, held-out median >= 1,000, ideally
10,000), each a ``rl_pg.checkpoint`` directory whose ``meta.json`` records its
held-out score, plus ``DIR/run`` (the training run) and ``DIR/summary.json``.
The package ships copies under ``rl_pg/checkpoints/{initial,partial,good}``.
"""

import argparse
import json

import jax
import numpy as np

from rl_pg import evaluate as evaluation
from rl_pg import io, train
from rl_pg.algos import loop, ppo


def held_out(config, params, num_episodes, max_score):
    env, env_params = loop.make_env(config)
    result = evaluation.evaluate(
        loop.greedy_act_fn(loop.make_policy(config)),
        params,
        env,
        env_params,
        jax.random.PRNGKey(0),
        num_episodes,
        max_score,
    )
    return evaluation.summarize(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partial-low", type=float, default=5)
    parser.add_argument("--partial-high", type=float, default=50)
    parser.add_argument("--episodes", type=int, default=32, help="held-out levels")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    out = io.new_out_dir(args.out)
    config = ppo.PPOConfig(seed=args.seed)
    io.write_config(out, {"script": "make_checkpoints", **vars(args)})
    save = {}

    def stage(name, params, event=None, summary=None):
        summary = summary or held_out(config, params, args.episodes, 10_000)
        extra = dict(
            stage=name,
            algo="ppo",
            seed=args.seed,
            update=0 if event is None else event.update,
            env_steps=0 if event is None else event.env_steps,
            held_out_median=summary["median_score"],
            held_out_mean=summary["mean_score"],
            held_out_episodes=args.episodes,
        )
        train.save_policy(out / name, config, params, **extra)
        save[name] = extra
        print(f"{name}: {json.dumps(extra)}", flush=True)

    initial = jax.jit(ppo.init, static_argnums=0)(config, jax.random.PRNGKey(args.seed))
    stage("initial", initial.params)

    def on_eval(event: train.EvalEvent) -> None:
        low, high = args.partial_low, args.partial_high
        if "partial" in save or not low <= event.val_median <= high:
            return
        # Confirm on the held-out levels (capped: a partial policy stays low).
        summary = held_out(config, event.params, args.episodes, 1_000)
        if low <= summary["median_score"] <= high:
            stage("partial", jax.device_get(event.params), event, summary)

    result = train.run(
        config, out / "run", progress=not args.no_progress, callback=on_eval
    )
    best = result.eval
    best_event = train.EvalEvent(
        best["best_update"], best["env_steps"], best["best_wall_clock_s"], None, 0, 0
    )
    stage("good", result.best_params, best_event, best)
    io.write_json(out / "summary.json", save)
    if "partial" not in save:
        print("no evaluation fell in the partial range; rerun with another seed")
    print(np.round([save[k]["held_out_median"] for k in save], 1))


if __name__ == "__main__":
    main()
