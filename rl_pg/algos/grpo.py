"""Group Relative Policy Optimization on Flappy Bird levels (Shao et al. 2024).

A level (reset key) plays the part of a prompt: each update rolls out
``group_size`` episodes on each of ``num_levels`` fresh levels, gives every step of
episode i the group-normalised return A_i = (R_i - mean_g R) / (std_g R + eps) and
takes ``update_epochs x num_minibatches`` Adam steps on the clipped-ratio loss of
:func:`rl_pg.estimators.grpo` (minibatches of whole groups), optionally with a KL
penalty ``beta`` to a reference policy, here the initial parameters. No critic.

``dr_grpo=True`` uses :func:`rl_pg.estimators.dr_grpo` instead (Liu et al. 2025):
A_i = R_i - mean_g R, no std division and no per-episode length normalisation.
"""

import dataclasses
from typing import ClassVar

import jax

from rl_pg.algos import base, loop
from rl_pg.algos.config import Checks, OnPolicyConfig


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class GRPOConfig(OnPolicyConfig):
    """GRPO hyperparameters (plus the shared fields of ``OnPolicyConfig``).

    Attributes:
      total_env_steps: training budget in live env steps (steps inside
        episodes, not the padding after one ended): updates go on until it is
        reached, so the last batch may overshoot it.
      eval_every_steps: live env steps between validation evaluations.
      num_levels: levels ("prompts") per batch.
      group_size: G, episodes per level (>= 2).
      horizon: steps per episode at most (batch length T).
      update_epochs: passes over each batch.
      num_minibatches: minibatches per pass (must divide ``num_levels``).
      clip_eps: ratio clip epsilon.
      beta: weight of the KL penalty to the initial policy (0: none).
      ent_coef: entropy bonus weight.
      eps: added to the group std (GRPO only).
      dr_grpo: use Dr. GRPO's advantages and normalisation.
    """

    SWEEPABLE: ClassVar[tuple[str, ...]] = (
        "lr",
        "reward_scale",
        "clip_eps",
        "ent_coef",
    )
    LIVE_BUDGET: ClassVar[bool] = True  # budget and evaluations in live env steps

    total_env_steps: int = 20_000_000
    eval_every_steps: int = 524_288  # live env steps
    num_levels: int = 16
    group_size: int = 8
    horizon: int = 256
    update_epochs: int = 2
    num_minibatches: int = 2
    clip_eps: float = 0.2
    beta: float = 0.0
    ent_coef: float = 0.0
    eps: float = 1e-4
    dr_grpo: bool = False

    @property
    def steps_per_update(self) -> int:
        return self.num_levels * self.group_size * self.horizon

    @property
    def gradient_steps_per_update(self) -> int:
        return self.update_epochs * self.num_minibatches

    @property
    def uses_critic(self) -> bool:
        return False

    @property
    def estimator(self) -> str:
        return "dr_grpo" if self.dr_grpo else "grpo"

    def check(self, checks: Checks) -> None:
        super().check(checks)
        for name in ("num_levels", "horizon", "update_epochs", "num_minibatches"):
            checks.int_at_least(name, 1)
        checks.int_at_least("group_size", 2)
        checks.divides("num_minibatches", "num_levels")
        checks.real_in("clip_eps", 0.0, 1.0, low_open=True, high_open=True)
        checks.real_in("beta", 0.0, 1e6)
        checks.real_in("ent_coef", 0.0, 1e6)
        checks.real_in("eps", 0.0, 1.0, low_open=True)
        checks.boolean("dr_grpo")
        self.check_budget(checks)


def init(config: GRPOConfig, key: jax.Array) -> loop.TrainState:
    """Initial params and optimizer state; the reference policy when beta > 0."""
    return loop.init_state(config, key, keep_reference=config.beta > 0)


def update(
    config: GRPOConfig, state: loop.TrainState
) -> tuple[loop.TrainState, loop.UpdateMetrics]:
    """Roll out a grouped batch and take the GRPO epochs on it."""
    loss_fn = loop.make_loss(
        config.estimator,
        loop.make_policy(config).apply,
        config.horizon,
        **loop.estimator_kwargs(config.estimator, config, {}),
    )
    return loop.episodic_update(
        config,
        state,
        loss_fn,
        num_levels=config.num_levels,
        group_size=config.group_size,
        horizon=config.horizon,
        num_epochs=config.update_epochs,
        num_minibatches=config.num_minibatches,
    )


ALGORITHM = loop.make_algorithm("grpo", GRPOConfig, init, update)
train = base.make_train(ALGORITHM)
