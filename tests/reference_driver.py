"""Drive flappy-bird-gymnasium 0.4.0 and rl_pg's FlappyBird side by side.

The reference env draws gaps from its own RNG; here its pipe generator is
replaced by rl_pg's level sequence so both see the same pipes. The reference is
stepped in Python (its actions come from a random or scripted policy); the same
action sequences are then replayed through rl_pg's env in one jitted scan.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
from flappy_bird_gymnasium.envs.flappy_bird_env import FlappyBirdEnv  # noqa: E402

from rl_pg.envs import gap_top, level_seed  # noqa: E402


def level_gaps(key, params, count):
    """Gap tops of the first ``count`` pipes of the level that ``key`` selects."""
    level = level_seed(key)
    return np.asarray(gap_top(level, jnp.arange(count), params)).astype(int)


def patched_reference(gaps, use_lidar):
    """A reference env whose pipes come from ``gaps`` in order."""
    env = FlappyBirdEnv(use_lidar=use_lidar)
    it = iter(gaps)

    def next_pipe():
        gap_y = int(next(it))
        x = env._screen_width + 52 + env._screen_width * 0.2
        return [{"x": x, "y": gap_y - 320}, {"x": x, "y": gap_y + env._pipe_gap}]

    env._get_random_pipe = next_pipe
    return env


def scripted_action(env):
    """A simple controller that passes many pipes: stay near the gap's bottom."""
    pipes = sorted(
        zip(env._upper_pipes, env._lower_pipes, strict=True), key=lambda p: p[0]["x"]
    )
    ahead = [p for p in pipes if p[0]["x"] + 52 > env._player_x - 4]
    gap_bottom = ahead[0][1]["y"]
    return int(env._player_y + 24 > gap_bottom - 14 and env._player_vel_y >= 0)


def reference_episode(key, params, use_lidar, policy, max_steps, rng):
    """Run one reference episode; return its per-step records (numpy arrays)."""
    gaps = level_gaps(key, params, max_steps // 30 + 10)
    env = patched_reference(gaps, use_lidar)
    obs0, _ = env.reset(seed=0)
    rec = {k: [] for k in ("action", "obs", "reward", "terminated", "score")}
    rec.update(bird_y=[], bird_vel=[], pipe_x=[])
    for _ in range(max_steps):
        action = (
            scripted_action(env) if policy == "scripted" else int(rng.random() < policy)
        )
        obs, reward, terminated, _, info = env.step(action)
        xs = sorted(p["x"] for p in env._upper_pipes)
        for k, v in (
            ("action", action),
            ("obs", obs),
            ("reward", reward),
            ("terminated", terminated),
            ("score", info["score"]),
            ("bird_y", env._player_y),
            ("bird_vel", env._player_vel_y),
            ("pipe_x", xs),
        ):
            rec[k].append(v)
        if terminated:
            break
    out = {k: np.asarray(v) for k, v in rec.items()}
    out["obs0"] = np.asarray(obs0)
    return out


_RUNNERS: dict = {}  # (id(env), id(params)) -> (env, params, jitted scan)


def _runner(env, params):
    """One jitted scan per (env, params), kept for the session: a replay compiles
    once per length bucket, not once per episode."""
    ident = (id(env), id(params))
    if ident not in _RUNNERS:

        @jax.jit
        def run(key, actions):
            obs0, state = env.reset(key, params)

            def step(state, action):
                obs, state, reward, terminated, info = env.step_env(
                    key, state, action, params
                )
                out = dict(
                    obs=obs,
                    reward=reward,
                    terminated=terminated,
                    score=info["score"],
                    bird_y=state.bird_y,
                    bird_vel=state.bird_vel,
                    pipe_x=state.pipe_x,
                )
                return state, out

            _, out = jax.lax.scan(step, state, actions)
            return obs0, out

        _RUNNERS[ident] = (env, params, run)  # env, params: keep the ids alive
    return _RUNNERS[ident][2]


def replay(env, params, key, actions):
    """rl_pg's env on a fixed action sequence (no auto-reset): per-step records.

    The actions are padded with no-flaps to a power of two (at least 64) and the
    records cut back to ``len(actions)``: the scan is causal, so the first steps
    are the same, and episodes of similar length share one compilation."""
    n = len(actions)
    padded = np.zeros(max(64, 1 << (n - 1).bit_length()), np.int32)
    padded[:n] = actions
    obs0, out = _runner(env, params)(key, jnp.asarray(padded))
    out = jax.tree.map(lambda x: np.asarray(x)[:n], out)
    out["obs0"] = np.asarray(obs0)
    return out
