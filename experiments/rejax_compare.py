"""Same-machine speed of rl_pg's PPO and rejax's PPO on CartPole-v1, side by side.

    python experiments/rejax_compare.py --out DIR [--venv DIR] [--total-env-steps N]

rejax 0.1.3 needs gymnax < 1.0, so it runs in its own virtual environment, made
here on first use (``python -m venv`` + ``pip install rejax==0.1.3 'gymnax<1.0'``).
Both train PPO with PureJaxRL's CartPole settings (4 envs x 128 steps, 4 epochs x 4
minibatches, lr 2.5e-4, gamma 0.99, lambda 0.95, clip 0.2, entropy 0.01, value 0.5,
max grad norm 0.5, 64x64 tanh networks), jitted whole, no evaluation during
training (rejax evaluates 128 episodes once, at the end). Each is run twice in its
process; the second (compiled) call is timed: env steps / s = env steps / seconds. Writes ``DIR/results.json`` and
``DIR/results.md``.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax

from rl_pg import io
from rl_pg.algos import ppo

_REJAX = """
import json, sys, time
import jax
from rejax import PPO
total = int(sys.argv[1])
algo = PPO.create(
    env="CartPole-v1", num_envs=4, num_steps=128, num_epochs=4, num_minibatches=4,
    learning_rate=2.5e-4, gamma=0.99, gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01,
    vf_coef=0.5, max_grad_norm=0.5, total_timesteps=total, eval_freq=total,
    skip_initial_evaluation=True,
    agent_kwargs={"activation": "tanh", "hidden_layer_sizes": (64, 64)},
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


def make_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "rejax==0.1.3", "gymnax<1.0"],
            check=True,
        )
    return python


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


def learn(config: ppo.PPOConfig, key: jax.Array):
    """Every PPO update of a run in one ``lax.scan``, without validation (the pure
    learning rate; ``ppo.train`` also validates and keeps the best inside jit)."""

    def body(state, _):
        return ppo.update(config, state)[0], None

    return jax.lax.scan(body, ppo.init(config, key), None, config.num_updates)[0]


def time_rl_pg(total: int) -> dict:
    config = ppo.PPOConfig(**CARTPOLE, total_env_steps=total)
    train = jax.jit(learn, static_argnums=0)
    start = time.perf_counter()
    jax.block_until_ready(train(config, jax.random.PRNGKey(0)))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(train(config, jax.random.PRNGKey(1)))
    seconds = time.perf_counter() - start
    return dict(first_call_s=first, seconds=seconds, jax=jax.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--venv", default="runs/rejax-venv")
    parser.add_argument("--total-env-steps", type=int, default=1_000_000)
    args = parser.parse_args()
    out = io.new_out_dir(args.out)
    total = args.total_env_steps
    python = make_venv(Path(args.venv))
    child = subprocess.run(
        [str(python), "-c", _REJAX, str(total)],
        check=True,
        capture_output=True,
        text=True,
    )
    rejax = json.loads(child.stdout.strip().splitlines()[-1])
    ours = time_rl_pg(total)
    # whole 512-step batches: rejax rounds the budget up, rl_pg down
    rejax["env_steps"] = -(-total // 512) * 512
    ours["env_steps"] = total // 512 * 512
    for row in (rejax, ours):
        row["env_steps_per_s"] = row["env_steps"] / row["seconds"]
    result = dict(total_env_steps=total, rejax=rejax, rl_pg=ours)
    io.write_json(out / "results.json", result)
    lines = [
        "| implementation | env steps/s | seconds (compiled) | first call s |",
        "|---|---:|---:|---:|",
    ]
    for name, row in (("rejax 0.1.3 PPO", rejax), ("rl_pg PPO", ours)):
        lines.append(
            f"| {name} (jax {row['jax']}) | {row['env_steps_per_s']:,.0f} | "
            f"{row['seconds']:.1f} | {row['first_call_s']:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
