"""Same-machine speed of rl_pg's PPO and rejax's PPO, side by side, at equal settings.

    python experiments/rejax_compare.py --out DIR [--venv DIR] [--total-env-steps N]
        [--envs CartPole-v1,FlappyBird-v0] [--rounds R]

rejax 0.1.3 needs gymnax < 1.0, so it runs in its own virtual environment, made
here on first use (``python -m venv`` + ``pip install rejax==0.1.3 'gymnax<1.0'``).

* CartPole-v1 at PureJaxRL's settings (4 envs x 128 steps, 4 epochs x 4
  minibatches, lr 2.5e-4, gamma 0.99, lambda 0.95, clip 0.2, entropy 0.01, value
  0.5, max grad norm 0.5, 64x64 tanh networks), rejax on gymnax's CartPole.
* FlappyBird-v0 at rl_pg's PPO defaults (64 envs x 128 steps, 4 x 4, lr 1e-3, the
  rest as above), rejax on rl_pg's own env: the child imports it from this
  checkout through a gymnax-0.0.x step adapter (:data:`_GYMNAX0_FLAPPY`: gymnax
  0.0.x's ``step`` returns ``done`` = terminated or truncated, where gymnax 1.0
  returns both; rejax then bootstraps no truncated episode, rl_pg does).

"Equal settings" are the numbers above; each side keeps its own algorithm's choices:
rejax clips the value loss, clips gradients per element (``optax.clip``) and keeps
separate actor and critic optimizers; rl_pg does not clip the value loss and clips
the global norm (a few elementwise operations per step either way).

Both are jitted whole, without evaluation during training (rejax evaluates 128
episodes once, at the end). Each side runs twice in its process and the second
(compiled) call is timed: env steps / s = env steps / seconds. ``--rounds`` R
alternates the two sides R times (rl_pg compiles once); the ratio of each round
and their median go to ``DIR/results.json`` and ``DIR/results.md``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax

from rl_pg import io
from rl_pg.algos import ppo

ROOT = Path(__file__).resolve().parents[1]

# argv: total env steps, env id, settings (JSON: rejax's PPO.create keywords)
_REJAX = """
import json, sys, time
import jax
total, env_id = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "CartPole-v1"
settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else dict(
    num_envs=4, num_steps=128, learning_rate=2.5e-4)
if env_id == "CartPole-v1":
    env = dict(env=env_id)
else:
    exec(GYMNAX0_FLAPPY)  # defines make_flappy
    env = dict(zip(("env", "env_params"), make_flappy(env_id)))
from rejax import PPO
algo = PPO.create(
    **env, num_epochs=4, num_minibatches=4, gamma=0.99, gae_lambda=0.95,
    clip_eps=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5,
    total_timesteps=total, eval_freq=total, skip_initial_evaluation=True,
    agent_kwargs={"activation": "tanh", "hidden_layer_sizes": (64, 64)}, **settings,
)
train = jax.jit(algo.train)
start = time.perf_counter()
jax.block_until_ready(train(jax.random.PRNGKey(0)))
first = time.perf_counter() - start
start = time.perf_counter()
_, (lengths, returns) = jax.block_until_ready(train(jax.random.PRNGKey(1)))
seconds = time.perf_counter() - start
print(json.dumps(dict(first_call_s=first, seconds=seconds,
                      final_mean_return=float(returns[-1].mean()),
                      jax=jax.__version__)))
"""

# rl_pg's FlappyBird for gymnax 0.0.x (rejax's): no registry, a 5-output step
_GYMNAX0_FLAPPY = """
import gymnax
import jax.numpy as jnp
gymnax.register = lambda *args, **kwargs: None  # gymnax 0.0.x has no registry
from rl_pg.envs import make

def make_flappy(env_id):
    env, params = make(env_id)

    class Gymnax0Step(type(env)):
        def is_truncated(self, state, params):  # gymnax 1.0's, absent from 0.0.x
            return state.time >= params.max_steps_in_episode

        def step(self, key, state, action, params=None):
            obs, state, reward, terminated, truncated, info = super().step(
                key, state, action, params)
            return obs, state, reward, jnp.logical_or(terminated, truncated), info

    env.__class__ = Gymnax0Step
    return env, params
"""

# PureJaxRL's CartPole settings, as rejax runs them (no learning-rate annealing)
CARTPOLE = dict(
    env_id="CartPole-v1",
    num_envs=4,
    num_steps=128,
    lr=2.5e-4,
    update_epochs=4,
    num_minibatches=4,
    reward_scale=1.0,
)
# rl_pg's PPO defaults on its own env (the other settings are CARTPOLE's too)
FLAPPY = dict(env_id="FlappyBird-v0")
SETTINGS = {"CartPole-v1": CARTPOLE, "FlappyBird-v0": FLAPPY}


def rejax_settings(config: ppo.PPOConfig) -> dict:
    """rejax's ``PPO.create`` keywords that differ between the settings."""
    return dict(
        num_envs=config.num_envs, num_steps=config.num_steps, learning_rate=config.lr
    )


def make_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "rejax==0.1.3", "gymnax<1.0"],
            check=True,
        )
    return python


def learn(config: ppo.PPOConfig, key: jax.Array):
    """Every PPO update of a run in one ``lax.scan``, without validation (the pure
    learning rate; ``ppo.train`` also validates and keeps the best inside jit)."""

    def body(state, _):
        return ppo.update(config, state)[0], None

    return jax.lax.scan(body, ppo.init(config, key), None, config.num_updates)[0]


def time_rl_pg(config: ppo.PPOConfig, seed: int) -> dict:
    """Seconds of the jitted ``learn`` (compiled on the first call of a config)."""
    train = jax.jit(learn, static_argnums=0)
    start = time.perf_counter()
    jax.block_until_ready(train(config, jax.random.PRNGKey(seed)))
    return dict(seconds=time.perf_counter() - start, jax=jax.__version__)


def time_rejax(python: Path, config: ppo.PPOConfig) -> dict:
    """rejax's PPO at ``config``'s settings, in its venv (this checkout's rl_pg on
    its path, for FlappyBird)."""
    program = f"GYMNAX0_FLAPPY = {_GYMNAX0_FLAPPY!r}\n{_REJAX}"
    settings = json.dumps(rejax_settings(config))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.run(
        [str(python), "-c", program, str(config.total_env_steps), config.env_id]
        + [settings],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def compare(python: Path, env_id: str, total: int, rounds: int) -> dict:
    """``rounds`` alternated timings of both sides on one env."""
    config = ppo.PPOConfig(**SETTINGS[env_id], total_env_steps=total)
    batch = config.num_envs * config.num_steps
    # whole batches: rejax rounds the budget up, rl_pg down
    steps = dict(rejax=-(-total // batch) * batch, rl_pg=total // batch * batch)
    time_rl_pg(config, 0)  # compiles
    rows = []
    for r in range(rounds):
        row = dict(rejax=time_rejax(python, config), rl_pg=time_rl_pg(config, r + 1))
        for side, timing in row.items():
            timing["env_steps_per_s"] = steps[side] / timing["seconds"]
        row["rl_pg_over_rejax"] = (
            row["rl_pg"]["env_steps_per_s"] / row["rejax"]["env_steps_per_s"]
        )
        rows.append(row)
        print(env_id, f"round {r + 1}: rl_pg / rejax {row['rl_pg_over_rejax']:.3f}")
    ratios = [row["rl_pg_over_rejax"] for row in rows]
    return dict(env_steps=steps, rounds=rows, median_ratio=statistics.median(ratios))


def _table(results: dict) -> list[str]:
    lines = [
        "| env | rejax 0.1.3 env steps/s | rl_pg env steps/s | rl_pg / rejax (rounds) | median |",
        "|---|---:|---:|---|---:|",
    ]
    for env_id, res in results["envs"].items():
        rate = {
            side: statistics.median(r[side]["env_steps_per_s"] for r in res["rounds"])
            for side in ("rejax", "rl_pg")
        }
        ratios = ", ".join(f"{r['rl_pg_over_rejax']:.3f}" for r in res["rounds"])
        lines.append(
            f"| {env_id} | {rate['rejax']:,.0f} | {rate['rl_pg']:,.0f} | {ratios} | "
            f"{res['median_ratio']:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--venv", default="runs/rejax-venv")
    parser.add_argument("--total-env-steps", type=int, default=1_000_000)
    parser.add_argument("--envs", default="CartPole-v1,FlappyBird-v0")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    envs = args.envs.split(",")
    unknown = sorted(set(envs) - set(SETTINGS))
    if unknown or args.rounds < 1:
        parser.error(f"--envs takes {', '.join(SETTINGS)}; --rounds >= 1")
    out = io.new_out_dir(args.out)
    python = make_venv(Path(args.venv))
    results = dict(total_env_steps=args.total_env_steps, envs={})
    for env_id in envs:
        results["envs"][env_id] = compare(
            python, env_id, args.total_env_steps, args.rounds
        )
    io.write_json(out / "results.json", results)
    lines = _table(results)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
