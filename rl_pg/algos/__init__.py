"""Training algorithms, one module each, with its config; one contract
(:mod:`rl_pg.algos.base`) and one registry (:mod:`rl_pg.algos.registry`).

The names below are imported on first use (``import rl_pg.algos`` costs no JAX).
"""

from rl_pg import _lazy

_NAMES = {
    "ALGORITHMS": "rl_pg.algos.registry",
    "A2CConfig": "rl_pg.algos.a2c",
    "Algorithm": "rl_pg.algos.base",
    "ChunkOut": "rl_pg.algos.base",
    "DQNConfig": "rl_pg.algos.dqn",
    "GRPOConfig": "rl_pg.algos.grpo",
    "PPOConfig": "rl_pg.algos.ppo",
    "QLearningConfig": "rl_pg.algos.qlearning",
    "ReinforceConfig": "rl_pg.algos.reinforce",
    "RunConfig": "rl_pg.algos.config",
    "RunState": "rl_pg.algos.base",
    "TrainState": "rl_pg.algos.loop",
    "UpdateMetrics": "rl_pg.algos.loop",
}
__getattr__, __dir__ = _lazy.attributes(__name__, _NAMES, globals())
__all__ = sorted(_NAMES)
