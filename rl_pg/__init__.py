"""rl_pg: policy-gradient estimators on a jittable Flappy Bird, in JAX.

The public API, by layer (see DESIGN.md): environments, policies, rollouts,
returns, estimators, and the estimator-variance study.
"""

from rl_pg.envs import ENV_IDS, EnvParams, EnvState, FlappyBird, make
from rl_pg.estimators import ESTIMATORS, LossAux, get_estimator
from rl_pg.policies import Policy, cnn_policy, entropy, log_prob, mlp_policy, sample
from rl_pg.returns import (
    discounted_returns,
    gae,
    lambda_returns,
    reward_to_go,
    total_return,
)
from rl_pg.rollout import (
    StreamState,
    episodic_rollout,
    grouped_rollout,
    stream_init,
    streaming_rollout,
)
from rl_pg.trajectory import Trajectory

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
