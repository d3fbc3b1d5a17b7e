"""Proximal Policy Optimization on auto-resetting streams (Schulman et al. 2017).

Each update collects ``num_steps`` steps from each of ``num_envs`` streams,
computes GAE once over the batch from the values stored at collection time, then
takes ``update_epochs x num_minibatches`` Adam steps on
:func:`rl_pg.estimators.ppo_clip` (clipped ratio, advantages normalised per
minibatch, value regression, optionally clipped, entropy bonus). Each epoch
shuffles the batch's ``num_envs x num_steps`` single transitions into minibatches,
as PureJaxRL and CleanRL do.

Defaults are the settings measured to reach a held-out median of 10,000 pipes
(REFERENCE.md s.10): PureJaxRL's PPO (64 envs x 128 steps, 4 epochs x 4
minibatches, gamma 0.99, lambda 0.95, clip 0.2, entropy 0.01, separate 64x64 tanh
actor and critic, Adam eps 1e-5, global norm 0.5) with rewards scaled by 0.1 and
learning rate 1e-3.
"""

import dataclasses
import functools
from typing import ClassVar

import jax

from rl_pg.algos import base, loop
from rl_pg.algos.config import Checks, OnPolicyConfig


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PPOConfig(OnPolicyConfig):
    """PPO hyperparameters (plus the shared fields of ``OnPolicyConfig``).

    Attributes:
      num_envs: parallel auto-resetting environments.
      num_steps: steps per env per update (batch length T).
      update_epochs: passes over each batch.
      num_minibatches: minibatches per pass (must divide ``num_envs x num_steps``).
      gamma: discount.
      lam: GAE lambda.
      clip_eps: ratio clip epsilon.
      ent_coef: entropy bonus weight.
      vf_coef: value loss weight.
      normalize_advantages: normalise advantages per minibatch.
      clip_value_loss: clip the value loss around the collection-time values
        (``clip_eps``), as PureJaxRL and CleanRL do.
    """

    SWEEPABLE: ClassVar[tuple[str, ...]] = (
        "lr",
        "reward_scale",
        "gamma",
        "lam",
        "clip_eps",
        "ent_coef",
        "vf_coef",
    )

    total_env_steps: int = 40_000_000
    eval_every_steps: int = 262_144  # 32 updates
    num_envs: int = 64
    num_steps: int = 128
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 0.99
    lam: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    normalize_advantages: bool = True
    clip_value_loss: bool = False

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def gradient_steps_per_update(self) -> int:
        return self.update_epochs * self.num_minibatches

    @property
    def uses_critic(self) -> bool:
        return True

    def check(self, checks: Checks) -> None:
        super().check(checks)
        for name in ("num_envs", "num_steps", "update_epochs", "num_minibatches"):
            checks.int_at_least(name, 1)
        checks.divides("num_minibatches", "steps_per_update")
        checks.real_in("gamma", 0.0, 1.0)
        checks.real_in("lam", 0.0, 1.0)
        checks.real_in("clip_eps", 0.0, 1.0, low_open=True, high_open=True)
        checks.real_in("ent_coef", 0.0, 1e6)
        checks.real_in("vf_coef", 0.0, 1e6)
        checks.boolean("normalize_advantages")
        checks.boolean("clip_value_loss")
        self.check_budget(checks)


def init(config: PPOConfig, key: jax.Array) -> loop.TrainState:
    """Initial params, optimizer state and ``num_envs`` reset streams."""
    return loop.init_state(config, key, num_streams=config.num_envs)


def update(
    config: PPOConfig, state: loop.TrainState
) -> tuple[loop.TrainState, loop.UpdateMetrics]:
    """Collect one streaming batch, compute its GAE once and take the PPO epochs
    on minibatches of its shuffled transitions."""
    # Batch length 1: a [1, N] minibatch's per-trajectory mean is the per-step mean.
    estimator = loop.make_loss(
        "ppo_clip",
        loop.make_policy(config).apply,
        1,
        **loop.estimator_kwargs("ppo_clip", config, {}),
    )

    def loss_fn(params, minibatch: loop.Transitions):
        return estimator(params, minibatch.batch, advantages=minibatch.advantages)

    return loop.streaming_update(
        config,
        state,
        loss_fn,
        num_steps=config.num_steps,
        num_epochs=config.update_epochs,
        num_minibatches=config.num_minibatches,
        prepare=functools.partial(
            loop.gae_transitions, gamma=config.gamma, lam=config.lam
        ),
    )


ALGORITHM = loop.make_algorithm("ppo", PPOConfig, init, update)
train = base.make_train(ALGORITHM)
