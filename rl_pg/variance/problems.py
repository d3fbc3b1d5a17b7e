"""What the study is about: a :class:`Problem` (policy and sampler) and the
estimators under study (:class:`SuiteConfig`, their losses and per-step weights).

:func:`flappy_problem` samples grouped Flappy Bird rollouts;
:func:`rl_pg.variance.exact.enumerable_problem` the exactly solvable MDP of
:mod:`rl_pg.enumerable`. The studied estimators are read from the registry
(:data:`rl_pg.estimators.REGISTRY`) or given as ``module:function`` losses.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.flatten_util import ravel_pytree

from rl_pg import estimators as estimators_lib
from rl_pg.rollout import grouped_rollout
from rl_pg.trajectory import Trajectory


class Problem(NamedTuple):
    """What the study needs to know about a policy-gradient problem.

    ``exact(params, column_grads, batch_sizes, specs) -> {n: {name: {metric:
    value}}}`` (optional) gives exact values (nan where unknown) of the metrics
    ``bias2``, ``variance``, ``mse``, ``snr``, ``rel_variance``, ``cos_mean``;
    ``column_grads(batch) -> {name: [B, P]}`` are their one-column estimates.
    """

    apply_fn: Callable  # (params, obs) -> (logits, value)
    sample: Callable[[jax.Array, Any, int], Trajectory]  # (key, params, n)
    group_size: int  # consecutive columns sharing a level
    exact: Callable | None = None


def critic_in_reward_units(apply_fn: Callable, reward_scale: float) -> Callable:
    """``apply_fn`` whose values are divided by ``reward_scale``.

    A critic trained on rewards x c (PPO's ``reward_scale``) predicts c times the
    return; the study rolls out with raw rewards, so value-based estimators must
    see V / c.
    """
    if reward_scale == 1.0:
        return apply_fn

    def apply(params, obs):
        logits, values = apply_fn(params, obs)
        return logits, values / reward_scale

    return apply


def flappy_problem(apply_fn, env, env_params, horizon: int, group_size: int) -> Problem:
    """Grouped Flappy Bird rollouts: n // G levels x G episodes of ``horizon``."""

    def sample(key, params, n):
        key_levels, key_actions = jax.random.split(key)
        level_keys = jax.random.split(key_levels, n // group_size)
        return grouped_rollout(
            key_actions,
            params,
            apply_fn,
            env,
            env_params,
            level_keys,
            group_size,
            horizon,
        )

    return Problem(apply_fn, sample, group_size)


# ------------------------------------------------------------------ estimators


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """The estimators under study and their shared hyperparameters.

    ``names`` are registered estimator names (:mod:`rl_pg.estimators`) and/or
    ``module:function`` references to loss functions; default: every registered
    estimator marked ``in_study``. Value and entropy terms are off.
    """

    names: tuple[str, ...] = tuple(
        name for name, s in estimators_lib.REGISTRY.items() if s.in_study
    )
    gamma: float = 0.99
    lam: float = 0.95


def suite_specs(config: SuiteConfig) -> dict[str, estimators_lib.EstimatorSpec]:
    """Output name -> spec of every studied estimator (validated, unique names)."""
    specs = {}
    for ref in config.names:
        spec = estimators_lib.resolve(ref)
        if spec.name in specs:
            raise ValueError(f"two studied estimators are named {spec.name!r}")
        specs[spec.name] = spec
    if not specs:
        raise ValueError("no estimators to study")
    return specs


def _suite_kwargs(
    problem: Problem, config: SuiteConfig, constant_b: float | jax.Array
) -> dict[str, tuple[estimators_lib.EstimatorSpec, dict]]:
    """Name -> (spec, the study's hyperparameters for it); see estimator_suite."""
    G = problem.group_size
    options = {
        "group_size": G,
        "vf_coef": 0.0,
        "ent_coef": 0.0,
        "gamma": config.gamma,
        "lam": config.lam,
        "b": constant_b,
        "beta": 0.0,
    }
    out = {}
    for name, spec in suite_specs(config).items():
        if spec.min_group_size > G:
            raise ValueError(
                f"{name} needs group_size >= {spec.min_group_size}, got {G}"
            )
        accepted = estimators_lib.hyperparameters(spec.loss)
        kwargs = {k: v for k, v in options.items() if k in accepted}
        out[name] = spec, kwargs | spec.study_kwargs
    return out


def studied_hyperparameters(config: SuiteConfig, group_size: int) -> dict:
    """Output name -> (spec, the hyperparameters the study passes it) with
    groups of ``group_size`` (``b``: the stage's mean return, set per stage)."""
    problem = Problem(None, None, group_size)
    return _suite_kwargs(problem, config, constant_b=float("nan"))


def estimator_suite(
    problem: Problem, config: SuiteConfig, constant_b: float | jax.Array = 0.0
) -> dict[str, Callable]:
    """Name -> ``loss(params, batch) -> (loss, aux)`` for every studied estimator.

    Each estimator gets the study's options it accepts (the problem's groups,
    ``b`` = ``constant_b`` (an estimate of E[R] from the reference sample,
    independent of the batches), gamma, lam; value, entropy and KL coefficients
    0, so each gradient is a pure policy-gradient estimate), then its registry
    entry's ``study_kwargs``.
    """
    suite = {}
    for name, (spec, kwargs) in _suite_kwargs(problem, config, constant_b).items():
        if spec is estimators_lib.REGISTRY.get(name):
            suite[name] = estimators_lib.get_estimator(
                name, apply_fn=problem.apply_fn, **kwargs
            )
        else:
            suite[name] = functools.partial(
                spec.loss, apply_fn=problem.apply_fn, **kwargs
            )
    return suite


def weight_suite(
    problem: Problem, config: SuiteConfig, constant_b: float | jax.Array = 0.0
) -> dict[str, Callable]:
    """Name -> ``weights(batch, inputs) -> StepWeights`` or ``from_scores(batch,
    scores) -> [P]`` (wrapped in :class:`FromScores`) for the studied estimators
    that declare either, with ``estimator_suite``'s hyperparameters."""
    suite = {}
    for name, (spec, kwargs) in _suite_kwargs(problem, config, constant_b).items():
        if spec.weights is not None:
            suite[name] = functools.partial(spec.weights, **kwargs)
        elif spec.from_scores is not None:
            suite[name] = FromScores(functools.partial(spec.from_scores, **kwargs))
    return suite


class FromScores(NamedTuple):
    """An estimator given as ``fn(batch, scores [B, P]) -> [P]`` (not weights)."""

    fn: Callable


def flat_gradient(loss_fn: Callable, params: Any, batch: Trajectory) -> jax.Array:
    """The estimate g_hat = -grad loss as one flat vector [P]."""
    grads = jax.grad(lambda p: loss_fn(p, batch)[0])(params)
    return -ravel_pytree(grads)[0]
