"""Any gymnax environment with a discrete action space, scored by episode return.

The training loops, rollouts and :mod:`rl_pg.evaluate` read two things from a
Flappy Bird state that other gymnax environments do not have: ``info["score"]``
(pipes passed) and ``state.score`` / ``state.time``. :class:`EpisodeReturn` wraps
a gymnax environment and supplies them, with the score = the episode's return so
far (the sum of its rewards), so the same code trains and scores, say,
``CartPole-v1``. :func:`make` builds one from a gymnax id.

Only environments with ``Discrete`` actions and flat (1-D) observations fit the
MLP policies; :func:`check_env_id` says why another does not.
"""

import functools
from typing import Any

import chex
import gymnax
import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces


@struct.dataclass
class ScoredState:
    """A wrapped env's state plus the episode's return and length so far."""

    env_state: Any
    score: jax.Array  # [] float32 sum of the episode's rewards so far
    time: jax.Array  # [] int32 steps taken in the episode


class EpisodeReturn(environment.Environment):
    """``env`` with ``info["score"]``, ``state.score`` (episode return so far)
    and ``state.time``; the gymnax 1.0 API (auto-reset in ``step``,
    ``info["final_observation"]``) comes from the base class."""

    def __init__(self, env: environment.Environment):
        self.env = env

    def __hash__(self) -> int:
        return hash((type(self), self.env))

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other.env == self.env

    def __repr__(self) -> str:
        return f"EpisodeReturn({self.env.name})"

    @property
    def default_params(self) -> Any:
        return self.env.default_params

    @property
    def name(self) -> str:
        return self.env.name

    @property
    def num_actions(self) -> int:
        return self.env.num_actions

    def action_space(self, params: Any = None) -> spaces.Discrete:
        return self.env.action_space(params)

    def observation_space(self, params: Any = None) -> spaces.Box:
        return self.env.observation_space(params)

    def reset_env(self, key: chex.PRNGKey, params: Any) -> tuple[Any, ScoredState]:
        obs, state = self.env.reset_env(key, params)
        zero = jnp.zeros((), jnp.float32)
        return obs, ScoredState(state, zero, jnp.zeros((), jnp.int32))

    def step_env(
        self, key: chex.PRNGKey, state: ScoredState, action: Any, params: Any
    ) -> tuple[Any, ScoredState, jax.Array, jax.Array, dict[str, Any]]:
        obs, env_state, reward, terminated, info = self.env.step_env(
            key, state.env_state, action, params
        )
        reward = jnp.asarray(reward, jnp.float32)
        score = state.score + reward
        new = ScoredState(env_state, score, state.time + 1)
        return obs, new, reward, jnp.asarray(terminated, bool), info | {"score": score}

    def is_truncated(self, state: ScoredState, params: Any) -> jax.Array:
        return self.env.is_truncated(state.env_state, params)

    def get_obs(self, state: ScoredState, params: Any = None, key=None) -> Any:
        return self.env.get_obs(state.env_state, params=params, key=key)


def check_env_id(env_id: str) -> str | None:
    """None if ``env_id`` is a gymnax id with discrete actions and 1-D
    observations, else the reason it is not usable."""
    if env_id not in gymnax.registered_envs:
        return f"{env_id!r} is not a gymnax environment id"
    env, params = _make(env_id)
    if not isinstance(env.action_space(params), spaces.Discrete):
        return f"{env_id} has no discrete action space"
    if len(env.observation_space(params).shape) != 1:
        return f"{env_id} has no flat (1-D) feature observations"
    return None


@functools.cache
def _make(env_id: str) -> tuple[EpisodeReturn, Any]:
    with jax.ensure_compile_time_eval():
        env, params = gymnax.make(env_id)
    return EpisodeReturn(env), params


def make(env_id: str, max_steps_in_episode: int | None = None):
    """``(EpisodeReturn(env), params)`` for a gymnax id; ``max_steps_in_episode``
    replaces the env's own time limit when given."""
    problem = check_env_id(env_id)
    if problem:
        raise ValueError(problem)
    env, params = _make(env_id)
    if max_steps_in_episode is not None:
        params = params.replace(max_steps_in_episode=max_steps_in_episode)
    return env, params
