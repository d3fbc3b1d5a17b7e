"""A Gymnasium ``Env`` view of a gymnax environment that passes Gymnasium's checker.

gymnax 1.0.1's ``GymnaxToGymWrapper`` fails ``gymnasium.utils.env_checker.check_env``:
its ``reset`` never calls ``gymnasium.Env.reset(seed=...)``, and it returns JAX
arrays. This thin subclass fixes both and renders ``rgb_array`` frames.
"""

from typing import Any

import gymnasium
import jax
import numpy as np
from gymnax.wrappers.gym import GymnaxToGymWrapper

from rl_pg.envs.render import render_rgb


class GymnasiumFlappyBird(GymnaxToGymWrapper):
    """``rl_pg`` Flappy Bird as a Gymnasium environment (numpy in, numpy out)."""

    def __init__(self, env, params=None, seed: int | None = None, render_mode=None):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(
                f"render_mode must be None or 'rgb_array', got {render_mode!r}"
            )
        super().__init__(env, params, seed)
        # The parent updates (and so mutates) the class-level metadata dict.
        self.metadata = {
            "render_modes": ["rgb_array"],
            "render_fps": 30,
            "name": env.name,
        }
        self.render_mode = render_mode
        self._render = jax.jit(render_rgb)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        gymnasium.Env.reset(self, seed=seed)
        obs, info = super().reset(seed=seed, options=options)
        return np.asarray(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(int(action))
        info = {k: np.asarray(v) for k, v in info.items()}
        return np.asarray(obs), float(reward), bool(terminated), bool(truncated), info

    def render(self):
        if self.render_mode == "rgb_array":
            return np.asarray(self._render(self.env_state, self.env_params))
        return None
