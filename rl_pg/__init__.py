"""rl_pg: policy-gradient estimators on a jittable Flappy Bird, in JAX.

The public API, by layer (see DESIGN.md): environments, policies, rollouts,
returns, estimators, and the estimator-variance study.
"""

import importlib

# name -> the module that defines it; imported on first use (PEP 562), so that
# JAX-free parts (``rl_pg.figures``, ``rl-pg plot``) load without JAX
_EXPORTS = {
    "rl_pg.envs": ("ENV_IDS", "EnvParams", "EnvState", "FlappyBird", "make"),
    "rl_pg.estimators": ("ESTIMATORS", "LossAux", "get_estimator"),
    "rl_pg.policies": (
        "Policy",
        "cnn_policy",
        "entropy",
        "log_prob",
        "mlp_policy",
        "sample",
    ),
    "rl_pg.returns": (
        "discounted_returns",
        "gae",
        "lambda_returns",
        "reward_to_go",
        "total_return",
    ),
    "rl_pg.rollout": (
        "StreamState",
        "episodic_rollout",
        "grouped_rollout",
        "stream_init",
        "streaming_rollout",
    ),
    "rl_pg.trajectory": ("Trajectory",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"rl_pg.{name}")  # a submodule
    except ModuleNotFoundError as error:
        if error.name != f"rl_pg.{name}":
            raise
    raise AttributeError(f"module 'rl_pg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__version__ = "0.1.0"

__all__ = [
    "ENV_IDS",
    "ESTIMATORS",
    "EnvParams",
    "EnvState",
    "FlappyBird",
    "LossAux",
    "Policy",
    "StreamState",
    "Trajectory",
    "cnn_policy",
    "discounted_returns",
    "entropy",
    "episodic_rollout",
    "gae",
    "get_estimator",
    "grouped_rollout",
    "lambda_returns",
    "log_prob",
    "make",
    "mlp_policy",
    "reward_to_go",
    "sample",
    "stream_init",
    "streaming_rollout",
    "total_return",
]
