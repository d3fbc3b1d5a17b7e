"""REINFORCE and its variance-reduced variants on episodic, grouped batches.

Each update rolls out ``group_size`` episodes on each of ``num_levels`` fresh levels
(:func:`rl_pg.rollout.grouped_rollout`: a group shares its pipes and differs only in
sampled actions), ``horizon`` steps at most, and takes one Adam step on the loss of
any estimator registered in :mod:`rl_pg.estimators`:

* ``reinforce``: total return, the seed's vanilla REINFORCE (Williams 1992);
* ``reward_to_go``: causality;
* ``constant_baseline`` (``baseline``), ``mean_baseline``, ``optimal_baseline``;
* ``rloo``: leave-one-out baseline within each group (Kool et al. 2019);
* ``value_baseline`` / ``gae``: a learned critic (the policy gets one);
* ``ppo_clip``, ``grpo``, ``dr_grpo`` also run (one pass, so the ratio is 1).

Group estimators use the groups of the rollout (``group_size`` consecutive columns).
Episodes still alive at ``horizon`` are cut there (``truncated``; bootstrapped only
by estimators with a critic).
"""

import dataclasses
from typing import ClassVar

import jax

from rl_pg import estimators
from rl_pg.algos import base, loop
from rl_pg.algos.config import Checks, OnPolicyConfig

# Estimator arguments that come from differently named config fields.
_RENAMES = {"b": "baseline"}


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ReinforceConfig(OnPolicyConfig):
    """REINFORCE-family hyperparameters (plus ``OnPolicyConfig``'s fields).

    Attributes:
      total_env_steps: training budget in live env steps (steps inside
        episodes; the padding after an episode ended is not counted): updates
        go on until it is reached, so the last batch may overshoot it.
      eval_every_steps: live env steps between validation evaluations (each
        evaluation comes after the first update that passes a multiple of it).
      estimator: a name in ``rl_pg.estimators.ESTIMATORS``.
      num_levels: levels per batch.
      group_size: episodes per level (>= 2 for ``rloo``).
      horizon: steps per episode at most (batch length T).
      baseline: b of ``constant_baseline``, on the scale of the rewards times
        ``reward_scale`` (at its default 0.1, a raw mean return of 20 is b = 2).
      gamma, lam, vf_coef, ent_coef: passed to estimators that take them
        (``value_baseline``, ``gae``, ``ppo_clip``, ``grpo``, ...).
    """

    SWEEPABLE: ClassVar[tuple[str, ...]] = (
        "lr",
        "reward_scale",
        "gamma",
        "lam",
        "ent_coef",
        "vf_coef",
    )
    LIVE_BUDGET: ClassVar[bool] = True  # budget and evaluations in live env steps

    eval_every_steps: int = 524_288  # live env steps
    estimator: str = "rloo"
    num_levels: int = 8
    group_size: int = 4
    horizon: int = 256
    baseline: float = 0.0
    gamma: float = 0.99
    lam: float = 0.95
    vf_coef: float = 0.5
    ent_coef: float = 0.0

    @property
    def steps_per_update(self) -> int:
        return self.num_levels * self.group_size * self.horizon

    @property
    def uses_critic(self) -> bool:
        return (
            self.estimator in estimators.ESTIMATORS
            and "vf_coef" in estimators.hyperparameters(self.estimator)
        )

    def check(self, checks: Checks) -> None:
        super().check(checks)
        for name in ("num_levels", "group_size", "horizon"):
            checks.int_at_least(name, 1)
        checks.real_in("baseline", -1e12, 1e12)
        checks.real_in("gamma", 0.0, 1.0)
        checks.real_in("lam", 0.0, 1.0)
        checks.real_in("vf_coef", 0.0, 1e6)
        checks.real_in("ent_coef", 0.0, 1e6)
        checks.one_of("estimator", tuple(estimators.ESTIMATORS))
        if not checks.problems:
            try:  # the estimator's own checks (rloo needs groups of 2 or more, ...)
                estimators.get_estimator(self.estimator, **self.estimator_kwargs())
            except ValueError as error:
                checks.require(False, str(error))
        self.check_budget(checks)

    def estimator_kwargs(self) -> dict:
        """Hyperparameters passed to the estimator (those it accepts)."""
        return loop.estimator_kwargs(self.estimator, self, _RENAMES)


def init(config: ReinforceConfig, key: jax.Array) -> loop.TrainState:
    """Initial params and optimizer state (no streams: every batch is fresh)."""
    return loop.init_state(config, key)


def update(
    config: ReinforceConfig, state: loop.TrainState
) -> tuple[loop.TrainState, loop.UpdateMetrics]:
    """Roll out a grouped episodic batch and take one gradient step on it."""
    loss_fn = loop.make_loss(
        config.estimator,
        loop.make_policy(config).apply,
        config.horizon,
        **config.estimator_kwargs(),
    )
    return loop.episodic_update(
        config,
        state,
        loss_fn,
        num_levels=config.num_levels,
        group_size=config.group_size,
        horizon=config.horizon,
    )


ALGORITHM = loop.make_algorithm("reinforce", ReinforceConfig, init, update)
train = base.make_train(ALGORITHM)
