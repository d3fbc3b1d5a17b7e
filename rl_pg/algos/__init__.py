"""Training algorithms, one module each, with its config; one contract
(:mod:`rl_pg.algos.base`) and one registry (:mod:`rl_pg.algos.registry`)."""

from rl_pg.algos.a2c import A2CConfig
from rl_pg.algos.base import Algorithm, ChunkOut, RunState
from rl_pg.algos.config import RunConfig
from rl_pg.algos.dqn import DQNConfig
from rl_pg.algos.grpo import GRPOConfig
from rl_pg.algos.loop import TrainState, UpdateMetrics
from rl_pg.algos.ppo import PPOConfig
from rl_pg.algos.qlearning import QLearningConfig
from rl_pg.algos.registry import ALGORITHMS
from rl_pg.algos.reinforce import ReinforceConfig

__all__ = [
    "ALGORITHMS",
    "A2CConfig",
    "Algorithm",
    "ChunkOut",
    "DQNConfig",
    "GRPOConfig",
    "PPOConfig",
    "QLearningConfig",
    "ReinforceConfig",
    "RunConfig",
    "RunState",
    "TrainState",
    "UpdateMetrics",
]
