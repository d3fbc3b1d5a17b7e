"""Advantage actor-critic with GAE on auto-resetting streams (synchronous A2C).

Each update collects ``num_steps`` steps from each of ``num_envs`` streams and takes
one Adam step on :func:`rl_pg.estimators.gae`: the score-function estimate with
generalized advantages (Schulman et al. 2016) from the collection-time critic, the
critic's regression to the lambda-returns and an entropy bonus (Mnih et al. 2016,
"Asynchronous Methods for Deep Reinforcement Learning", run synchronously). No
ratio, no clipping: each batch is used once, on-policy.
"""

import dataclasses
from typing import ClassVar

import jax

from rl_pg.algos import base, loop
from rl_pg.algos.config import Checks, OnPolicyConfig


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class A2CConfig(OnPolicyConfig):
    """A2C hyperparameters (plus the shared fields of ``OnPolicyConfig``).

    Attributes:
      num_envs: parallel auto-resetting environments.
      num_steps: steps per env per update (batch length T).
      gamma: discount.
      lam: GAE lambda.
      ent_coef: entropy bonus weight.
      vf_coef: value loss weight.
    """

    SWEEPABLE: ClassVar[tuple[str, ...]] = (
        "lr",
        "reward_scale",
        "gamma",
        "lam",
        "ent_coef",
        "vf_coef",
    )

    total_env_steps: int = 20_000_000
    eval_every_steps: int = 262_144  # 128 updates
    num_envs: int = 64
    num_steps: int = 32
    gamma: float = 0.99
    lam: float = 0.95
    ent_coef: float = 0.01
    vf_coef: float = 0.5

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def uses_critic(self) -> bool:
        return True

    def check(self, checks: Checks) -> None:
        super().check(checks)
        checks.int_at_least("num_envs", 1)
        checks.int_at_least("num_steps", 1)
        checks.real_in("gamma", 0.0, 1.0)
        checks.real_in("lam", 0.0, 1.0)
        checks.real_in("ent_coef", 0.0, 1e6)
        checks.real_in("vf_coef", 0.0, 1e6)
        self.check_budget(checks)


def init(config: A2CConfig, key: jax.Array) -> loop.TrainState:
    """Initial params, optimizer state and ``num_envs`` reset streams."""
    return loop.init_state(config, key, num_streams=config.num_envs)


def update(
    config: A2CConfig, state: loop.TrainState
) -> tuple[loop.TrainState, loop.UpdateMetrics]:
    """Collect one streaming batch and take one gradient step on it."""
    loss_fn = loop.make_loss(
        "gae",
        loop.make_policy(config).apply,
        config.num_steps,
        **loop.estimator_kwargs("gae", config, {}),
    )
    return loop.streaming_update(
        config,
        state,
        loss_fn,
        num_steps=config.num_steps,
        num_epochs=1,
        num_minibatches=1,
    )


ALGORITHM = loop.make_algorithm("a2c", A2CConfig, init, update)
train = base.make_train(ALGORITHM)
