"""Training algorithms, one module each, with its config and run function."""

from rl_pg.algos.a2c import A2CConfig
from rl_pg.algos.dqn import DQNConfig, train_dqn
from rl_pg.algos.grpo import GRPOConfig
from rl_pg.algos.loop import TrainState, UpdateMetrics
from rl_pg.algos.ppo import PPOConfig
from rl_pg.algos.qlearning import QLearningConfig, train_qlearning
from rl_pg.algos.reinforce import ReinforceConfig

__all__ = [
    "A2CConfig",
    "DQNConfig",
    "GRPOConfig",
    "PPOConfig",
    "QLearningConfig",
    "ReinforceConfig",
    "TrainState",
    "UpdateMetrics",
    "train_dqn",
    "train_qlearning",
]
