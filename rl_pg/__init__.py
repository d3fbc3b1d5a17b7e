"""rl_pg: policy-gradient estimators on a jittable Flappy Bird, in JAX."""

from rl_pg.envs import FlappyBird, make

__all__ = ["FlappyBird", "make"]
