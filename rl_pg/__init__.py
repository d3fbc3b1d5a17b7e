"""rl_pg: policy-gradient estimators on a jittable Flappy Bird, in JAX.

The public API, by layer (see DESIGN.md): environments, policies, rollouts,
returns, estimators, and the estimator-variance study.

The names below are imported on first use (PEP 562), so ``import rl_pg`` (and
``rl-pg --help``) costs no JAX import. The Flappy Bird ids are registered with
gymnax as soon as gymnax is imported (now, or later), so ``import rl_pg`` then
``gymnax.make("FlappyBird-v0")`` works as before.
"""

from rl_pg import _lazy

__version__ = "0.1.0"

_MODULES = {
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
_NAMES = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_NAMES)
# The subpackages an eager ``import rl_pg`` used to load stay reachable as
# attributes (``rl_pg.envs``, ...).
_NAMES.update({m.split(".")[1]: m for m in _MODULES})
__getattr__, __dir__ = _lazy.attributes(__name__, _NAMES, globals())
_lazy.register_envs_with_gymnax()
