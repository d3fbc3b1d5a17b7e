"""PPO training throughput: env steps/s from the env ceiling to ``rl-pg train``.

    python experiments/ppo_throughput.py --out DIR [--quick] [--repeats 3]
        [--rejax-venv runs/rejax-venv] [--no-rejax]

Settings: FlappyBird-v0 (features) at rl_pg's PPO defaults (64 envs x 128 steps,
4 epochs x 4 minibatches, 64x64 tanh actor and critic), plus 256 envs (and 1,024
without ``--quick``) for scaling; CartPole-v1 at PureJaxRL's settings (4 envs x 128
steps, 4 epochs x 4 minibatches, lr 2.5e-4, rewards unscaled, no annealing, as in
``rejax_compare.py``). Env steps/s of

  (a) env: random actions in the same ``jit(scan(vmap(step)))`` shape, num_envs x
      (updates x num_steps) steps (:func:`rl_pg.throughput.compiled_rollout`): the
      env ceiling;
  (b) learn: ``jax.jit(rejax_compare.learn)`` (a scan of ``ppo.update``), no evaluation, second call (compiled);
  (b2) update by update: the same run as a Python loop over ``jax.jit(ppo.update)``
      (one host round trip per update; what a scan over updates saves, or costs);
  (c) cli: ``rl-pg train --algo ppo`` as a subprocess (driver included: jitted
      chunks, validation, checkpoints, metrics, final evaluation, plot and GIF).
      ``steady`` = env steps / wall-clock between consecutive ``metrics.csv`` rows
      (one chunk plus the driver's work after it); ``end to end`` = env steps /
      the subprocess's wall-clock (start-up and compilation included);
  (d) rejax 0.1.3 PPO on CartPole-v1 at the same settings, second call, in its own
      venv (``rejax_compare.py`` makes it and holds the script).

Every round runs every measurement once, in turns, so that they see the same spells
of load on a shared machine; ratios are taken within a round and the medians over
rounds reported, with the load average. A phase profile of one update (rollout,
GAE, SGD epochs; one minibatch gradient; the same gradient with PureJaxRL's loss
written out) and the driver's per-chunk cost (validation on its own, with this
run's policy and with the shipped ``good`` policy that reaches 10,000 pipes) follow.
Writes ``DIR/results.json`` and ``DIR/results.md``.
"""

import argparse
import csv
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rl_pg
from rl_pg import checkpoint, estimators, io, returns, rollout, throughput
from rl_pg import evaluate as evaluation
from rl_pg.algos import loop, ppo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rejax_compare  # noqa: E402  (experiments/ is not a package)

CARTPOLE = rejax_compare.CARTPOLE
# name -> (config fields, updates per timed (a)/(b) call, quick, full)
QUICK = dict(
    flappy64=(dict(), 16),
    flappy256=(dict(num_envs=256), 4),
    cartpole=(CARTPOLE, 256),
)
FULL = dict(
    flappy64=(dict(), 64),
    flappy256=(dict(num_envs=256), 16),
    flappy1024=(dict(num_envs=1024), 4),
    cartpole=(CARTPOLE, 1953),  # 999,936 env steps, as rejax_compare's 1M
)
# env steps of each `rl-pg train` run (c): several chunks of 262,144 steps each
CLI_STEPS = dict(
    quick=dict(flappy64=786_432, cartpole=786_432),
    full=dict(flappy64=2_097_152, cartpole=1_000_000),
)


def make_config(fields: dict, num_updates: int) -> ppo.PPOConfig:
    steps = num_updates * ppo.PPOConfig(**fields).steps_per_update
    return ppo.PPOConfig(**fields, total_env_steps=steps)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_time(fn, *args, repeats: int = 7) -> float:
    jax.block_until_ready(fn(*args))  # compile
    return float(np.median([timed(fn, *args) for _ in range(repeats)]))


# ------------------------------------------------------------------ (a) (b) (c) (d)


class Setting:
    """(a), (b) and (b2) of one config, compiled once; each call times once."""

    def __init__(self, config: ppo.PPOConfig):
        self.config = config
        self.steps = config.num_updates * config.steps_per_update
        env, env_params = loop.make_env(config)
        self.env = throughput.compiled_rollout(
            env, env_params, config.num_envs, config.num_updates * config.num_steps
        )
        self.train = jax.jit(rejax_compare.learn, static_argnums=0)
        self.state = jax.block_until_ready(self.train(config, jax.random.PRNGKey(0)))
        self.init = jax.jit(ppo.init, static_argnums=0)
        self.update = jax.jit(ppo.update, static_argnums=0)
        jax.block_until_ready(self.update(config, self.init(config, self.state.key)))

    def env_rate(self, key: jax.Array) -> float:
        return self.steps / timed(self.env, key)

    def learn_rate(self, key: jax.Array) -> float:
        return self.steps / timed(self.train, self.config, key)

    def loop_rate(self, key: jax.Array) -> float:
        """(b2): the same run as a Python loop over the jitted update."""

        def train(config, key):
            state = self.init(config, key)
            for _ in range(config.num_updates):
                state, _ = self.update(config, state)
            return state

        return self.steps / timed(train, self.config, key)


def cli_flags(fields: dict, total: int) -> list[str]:
    flags = [f"--total-env-steps={total}"]
    flags += [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()]
    return flags


def run_cli(out_dir: Path, fields: dict, total: int) -> dict:
    """Time ``rl-pg train --algo ppo`` in a subprocess; read its metrics.csv."""
    command = [sys.executable, "-m", "rl_pg.cli", "train", "--algo", "ppo"]
    command += ["--out", str(out_dir), *cli_flags(fields, total)]
    env = dict(os.environ, PYTHONPATH=str(Path(rl_pg.__file__).parents[1]))
    start = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if child.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{child.stderr[-3000:]}")
    with open(out_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = np.array([0] + [int(r["env_steps"]) for r in rows])
    clock = np.array([0.0] + [float(r["wall_clock_s"]) for r in rows])
    intervals = np.diff(clock)[1:]  # the first holds the compilations
    steady_steps = np.diff(steps)[1:]
    eval_data = json.loads((out_dir / "eval.json").read_text())
    return dict(
        env_steps=int(steps[-1]),
        wall_s=wall,
        end_to_end=steps[-1] / wall,
        steady=float(np.median(steady_steps / intervals)),
        chunk_interval_s=float(np.median(intervals)),
        chunk_steps=int(np.median(steady_steps)),
        first_chunk_s=float(clock[1]),
        train_wall_clock_s=eval_data["wall_clock_s"],
        final_eval_s=eval_data.get("eval_wall_clock_s"),
    )


def run_rejax(python: Path, total: int) -> dict:
    child = subprocess.run(
        [str(python), "-c", rejax_compare._REJAX, str(total)],
        check=True,
        capture_output=True,
        text=True,
    )
    row = json.loads(child.stdout.strip().splitlines()[-1])
    # rejax rounds the budget up to whole 512-step batches (CartPole's settings)
    return dict(row, rate=-(-total // 512) * 512 / row["seconds"])


# ------------------------------------------------------------------------- profile


def _purejaxrl_loss(apply_fn, params, batch, advantages, clip_eps=0.2):
    """PureJaxRL's PPO loss written out (vf 0.5, entropy 0.01), for comparison."""
    logits, value = apply_fn(params, batch.observations)
    log_pi = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_pi, batch.actions[..., None], -1)[..., 0]
    value_loss = 0.5 * jnp.mean(jnp.square(value - (advantages + batch.values)))
    ratio = jnp.exp(log_prob - batch.log_probs)
    adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = -jnp.mean(jnp.minimum(ratio * adv, clipped * adv))
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_pi) * log_pi, -1))
    return pg_loss + 0.5 * value_loss - 0.01 * entropy


def profile_update(setting: Setting, repeats: int) -> dict:
    """Median ms of one update and of its phases, jitted one by one."""
    config, state = setting.config, setting.state
    env, env_params = loop.make_env(config)
    apply_fn = loop.make_policy(config).apply
    key = jax.random.PRNGKey(1)

    @jax.jit
    def collect(params, stream):
        return rollout.streaming_rollout(
            key, params, apply_fn, env, env_params, stream, config.num_steps
        )

    @jax.jit
    def gae(batch):
        return returns.trajectory_gae(batch, config.gamma, config.lam)

    update = jax.jit(ppo.update, static_argnums=0)
    _, batch = collect(state.params, state.stream)
    advantages = gae(batch)
    size = config.steps_per_update // config.num_minibatches

    def first(x):  # one minibatch of single transitions, [1, size, ...]
        return x.reshape((1, -1, *x.shape[2:]))[:, :size]

    minibatch, mb_adv = jax.tree.map(first, batch), first(advantages)
    loss = estimators.get_estimator(
        "ppo_clip",
        apply_fn=apply_fn,
        **loop.estimator_kwargs("ppo_clip", config, {}),
    )
    ours = jax.jit(jax.grad(lambda p: loss(p, minibatch, advantages=mb_adv)[0]))
    reference = jax.jit(
        jax.grad(lambda p: _purejaxrl_loss(apply_fn, p, minibatch, mb_adv))
    )
    parts = dict(
        update=lambda: update(config, state),
        rollout=lambda: collect(state.params, state.stream),
        gae=lambda: gae(batch),
        minibatch_grad=lambda: ours(state.params),
        minibatch_grad_purejaxrl_loss=lambda: reference(state.params),
    )
    times = {name: [] for name in parts}
    for fn in parts.values():
        jax.block_until_ready(fn())
    for _ in range(repeats):  # in turns
        for name, fn in parts.items():
            times[name].append(timed(fn))
    ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    ms["sgd"] = ms["update"] - ms["rollout"] - ms["gae"]
    ms["gradient_steps"] = config.gradient_steps_per_update
    return ms


def validation_ms(config: ppo.PPOConfig, params) -> float:
    """The driver's validation round on its own (32 levels, median only)."""
    env, env_params = loop.make_env(config)
    keys = evaluation.held_out_keys(config.eval_episodes, evaluation.VALIDATION_SEED)

    def validate():
        return evaluation.evaluate(
            loop.greedy_act_fn(loop.make_policy(config)),
            params,
            env,
            env_params,
            jax.random.PRNGKey(0),
            max_score=config.eval_max_score,
            reset_keys=keys,
            median_only=True,
        ).scores

    return 1e3 * median_time(validate, repeats=3)


# -------------------------------------------------------------------------- report


def _cell(row: dict, key: str, fmt: str = "{:,.0f}") -> str:
    return fmt.format(row[key]) if key in row else ""


def med(values) -> float:
    return float(np.median(values))


def markdown(result: dict) -> str:
    r = result["rates"]
    lines = [
        f"Load average {result['load_start']} at the start, {result['load_end']} at "
        f"the end; {result['repeats']} rounds; medians of env steps/s.",
        "",
        "| setting | (a) env only | (b) PPO jitted | (b2) update by update | "
        "(c) rl-pg train steady | (c) end to end | (d) rejax PPO | (b)/(a) | "
        "(b)/(b2) | (c)/(b) | (b)/(d) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in r.items():
        f = functools.partial(_cell, row)
        lines.append(
            f"| {name} | {f('env')} | {f('learn')} | {f('update_by_update')} | "
            f"{f('cli_steady')} | {f('cli_end_to_end')} | {f('rejax')} | "
            f"{f('learn_over_env', '{:.3f}')} | {f('learn_over_loop', '{:.2f}')} | "
            f"{f('cli_over_learn', '{:.2f}')} | {f('learn_over_rejax', '{:.2f}')} |"
        )
    lines += ["", "Phases of one update (ms, medians, each jitted on its own):", ""]
    lines += [
        "| setting | update | rollout | GAE | SGD (rest) | one minibatch "
        "gradient x steps | same, PureJaxRL's loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in result["profile"].items():
        n = p["gradient_steps"]
        lines.append(
            f"| {name} | {p['update']:.1f} | {p['rollout']:.1f} "
            f"({p['rollout'] / p['update']:.0%}) | {p['gae']:.2f} | {p['sgd']:.1f} "
            f"({p['sgd'] / p['update']:.0%}) | {p['minibatch_grad']:.2f} x {n} = "
            f"{p['minibatch_grad'] * n:.1f} | {p['minibatch_grad_purejaxrl_loss']:.2f} |"
        )
    lines += ["", "Driver cost per chunk of `rl-pg train` (medians):", ""]
    for name, d in result["driver"].items():
        lines.append(
            f"- {name}: {d['chunk_steps']:,} env steps per chunk; interval between "
            f"metrics rows {d['interval_s']:.2f} s, of which the jitted chunk "
            f"~{d['chunk_s']:.2f} s (at rate (b)), validation {d['validation_s']:.2f} s "
            f"on its own, the rest {d['rest_s']:.2f} s (checkpoints, metrics, host "
            f"transfers); first chunk {d['first_chunk_s']:.1f} s (compilation); "
            f"subprocess {d['wall_s']:.1f} s for {d['env_steps']:,} steps, of which "
            f"{d['outside_training_s']:.1f} s outside training (start-up, final "
            f"evaluation, plot, GIF)."
        )
    for name, ms in result.get("validation_good_policy_ms", {}).items():
        lines.append(
            f"- {name}: one validation round of the shipped `good` policy "
            f"(held-out median 10,000 pipes) takes {ms / 1e3:.2f} s."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--quick", action="store_true", help="smaller budgets")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, in turns")
    parser.add_argument("--rejax-venv", default="runs/rejax-venv")
    parser.add_argument("--no-rejax", action="store_true", help="skip (d)")
    args = parser.parse_args()
    out = io.new_out_dir(args.out)
    mode = "quick" if args.quick else "full"
    plan = QUICK if args.quick else FULL
    load_start = [round(x, 2) for x in os.getloadavg()]
    python = None if args.no_rejax else rejax_compare.make_venv(Path(args.rejax_venv))

    settings = {name: Setting(make_config(f, u)) for name, (f, u) in plan.items()}
    samples: dict[str, dict[str, list]] = {name: {} for name in plan}
    cli_runs: dict[str, list[dict]] = {name: [] for name in CLI_STEPS[mode]}
    rejax_runs: list[dict] = []
    round_loads = []

    def add(name, key, value):
        samples[name].setdefault(key, []).append(value)

    for i in range(args.repeats):
        key = jax.random.PRNGKey(100 + i)
        for name, s in settings.items():
            add(name, "env", s.env_rate(key))
            add(name, "learn", s.learn_rate(key))
            add(name, "update_by_update", s.loop_rate(key))
            add(
                name,
                "learn_over_loop",
                samples[name]["learn"][-1] / samples[name]["update_by_update"][-1],
            )
            add(
                name,
                "learn_over_env",
                samples[name]["learn"][-1] / samples[name]["env"][-1],
            )
        for name, total in CLI_STEPS[mode].items():
            run = run_cli(out / "cli_runs" / f"{name}_round{i}", plan[name][0], total)
            cli_runs[name].append(run)
            add(name, "cli_steady", run["steady"])
            add(name, "cli_end_to_end", run["end_to_end"])
            add(name, "cli_over_learn", run["steady"] / samples[name]["learn"][-1])
        if python is not None:
            run = run_rejax(python, settings["cartpole"].steps)
            rejax_runs.append(run)
            add("cartpole", "rejax", run["rate"])
            add(
                "cartpole",
                "learn_over_rejax",
                samples["cartpole"]["learn"][-1] / run["rate"],
            )
        round_loads.append(round(os.getloadavg()[0], 2))
        print(f"round {i + 1}/{args.repeats}: load {round_loads[-1]}", flush=True)

    profile = {
        name: profile_update(settings[name], repeats=5 * args.repeats)
        for name in ("flappy64", "cartpole")
    }
    driver = {}
    for name, runs in cli_runs.items():
        s = settings[name]
        validation_s = validation_ms(s.config, s.state.params) / 1e3
        chunk_steps = runs[0]["chunk_steps"]
        chunk_s = chunk_steps / med(samples[name]["learn"])
        interval = med([r["chunk_interval_s"] for r in runs])
        driver[name] = dict(
            chunk_steps=chunk_steps,
            interval_s=interval,
            chunk_s=chunk_s,
            validation_s=validation_s,
            rest_s=interval - chunk_s - validation_s,
            first_chunk_s=med([r["first_chunk_s"] for r in runs]),
            wall_s=med([r["wall_s"] for r in runs]),
            env_steps=runs[0]["env_steps"],
            outside_training_s=med(
                [r["wall_s"] - r["train_wall_clock_s"] for r in runs]
            ),
        )
    good = Path(rl_pg.__file__).parent / "checkpoints" / "good"
    _, good_params, *_ = checkpoint.load_policy(good)
    result = dict(
        mode=mode,
        repeats=args.repeats,
        load_start=load_start,
        load_end=[round(x, 2) for x in os.getloadavg()],
        load_after_each_round=round_loads,
        cpu_count=os.cpu_count(),
        devices=[str(d) for d in jax.devices()],
        settings={
            name: dict(fields=plan[name][0], steps_per_call=s.steps)
            for name, s in settings.items()
        },
        cli_env_steps=CLI_STEPS[mode],
        rates={name: {k: med(v) for k, v in d.items()} for name, d in samples.items()},
        samples=samples,
        cli_runs=cli_runs,
        rejax_runs=rejax_runs,
        profile=profile,
        driver=driver,
        validation_good_policy_ms=dict(
            flappy64=validation_ms(settings["flappy64"].config, good_params)
        ),
        versions=io.versions(),
    )
    io.write_json(out / "results.json", result)
    text = markdown(result)
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
