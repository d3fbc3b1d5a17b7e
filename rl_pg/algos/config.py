"""Typed, frozen, validated configs: the run fields of every algorithm, and the
fields shared by the policy-gradient algorithms.

Every algorithm has one frozen dataclass deriving from :class:`RunConfig` (the
budget, evaluation, stop rule and checkpoints the one run driver reads):
``QLearningConfig``, ``DQNConfig``, and through :class:`OnPolicyConfig` (the
environment, the optimizer, the network) ``PPOConfig``, ``A2CConfig``,
``ReinforceConfig`` and ``GRPOConfig``. Each class adds its checks to ``check``;
``RunConfig.__post_init__`` runs them and reports all problems together as one
``ValueError``, before anything is compiled. ``SWEEPABLE`` names the float fields
that jitted code takes as traced values (:func:`hyperparameters`).

Configs are registered with ``jax.tree_util.register_static``: a config is a pytree
without leaves whose value is part of the tree structure. So it can be passed to
jitted and vmapped functions as an ordinary argument
(``jax.jit(jax.vmap(train, in_axes=(None, 0)))(config, keys)``), and equal configs
share one compilation.
"""

import copy
import dataclasses
import math
import numbers
from typing import Any, ClassVar

import jax.numpy as jnp

from rl_pg.envs import ENV_IDS, scored
from rl_pg.evaluate import MAX_SCORE_LIMIT

ACTIVATIONS = ("tanh", "relu", "gelu", "silu")
INT32_MAX = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


SEED_LIMIT = (
    2**32
)  # jax.random.PRNGKey(seed) wraps beyond: PRNGKey(2**32) == PRNGKey(0)


def seed_problem(seed: Any, name: str = "seed") -> str | None:
    """Why ``seed`` is not a seed (an int in [0, 2**32)), or None."""
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        return f"{name} must be an int in [0, 2**32), got {seed!r}"
    return None


def _is_real(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


class Checks:
    """Collects problems with config fields; ``raise_if_any`` reports them all."""

    def __init__(self, config: Any):
        self.config = config
        self.problems: list[str] = []

    def require(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)

    def int_at_least(self, name: str, minimum: int) -> None:
        value = getattr(self.config, name)
        self.require(
            _is_int(value) and value >= minimum,
            f"{name} must be an int >= {minimum}, got {value!r}",
        )

    def real_in(
        self,
        name: str,
        low: float,
        high: float,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        value = getattr(self.config, name)
        ok = _is_real(value)
        if ok:
            ok = (value > low if low_open else value >= low) and (
                value < high if high_open else value <= high
            )
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        self.require(
            ok, f"{name} must be a number in {lo}{low}, {high}{hi}, got {value!r}"
        )

    def boolean(self, name: str) -> None:
        value = getattr(self.config, name)
        self.require(isinstance(value, bool), f"{name} must be a bool, got {value!r}")

    def one_of(self, name: str, choices: tuple[Any, ...]) -> None:
        value = getattr(self.config, name)
        self.require(
            value in choices, f"{name} must be one of {list(choices)}, got {value!r}"
        )

    def widths(self, name: str) -> None:
        value = getattr(self.config, name)
        self.require(
            isinstance(value, tuple)
            and len(value) > 0
            and all(_is_int(h) and h > 0 for h in value),
            f"{name} must be a non-empty tuple of positive ints, got {value!r}",
        )

    def divides(self, divisor: str, dividend: str) -> None:
        a, b = getattr(self.config, divisor), getattr(self.config, dividend)
        if _is_int(a) and _is_int(b) and a > 0:
            self.require(b % a == 0, f"{divisor} ({a}) must divide {dividend} ({b})")

    def raise_if_any(self) -> None:
        if self.problems:
            name = type(self.config).__name__
            raise ValueError(f"Invalid {name}: " + "; ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Fields every algorithm's run shares: budget, evaluation, stop rule, files.

    Every algorithm's config derives from this class, so the one run driver
    (:mod:`rl_pg.runs.driver`) and the pure ``train`` of :mod:`rl_pg.algos.base`
    read the same names, and their checks are written here once.

    ``SWEEPABLE`` names the float fields that are traced values in jitted code
    (:func:`hyperparameters`, :func:`with_hyperparameters`): a grid over them
    trains in one ``jit(vmap(...))`` (``rl-pg sweep``).

    Attributes:
      seed: PRNG seed of the run (the driver's ``jax.random.PRNGKey(seed)``).
      total_env_steps: training budget in env steps (all envs together).
      eval_every_steps: env steps between greedy evaluations on validation levels
        (rounded down to whole updates or vector steps); one jitted chunk.
      eval_episodes: validation levels per evaluation (checkpoint selection).
      eval_max_score: evaluation episodes stop at this many pipes.
      stop_at_score: stop once a validation median reaches this and the stop is
        confirmed (None: use the whole budget). Inside the pure ``train`` a
        stopped run stops changing.
      stop_confirm_episodes: confirm a stop on this many fresh validation levels
        (``rl_pg.evaluate.CONFIRMATION_SEED``); 0 stops on the first validation
        median that reaches ``stop_at_score``.
      stop_confirm_fraction: the fraction of those levels on which the policy
        must reach ``stop_at_score`` (0.5 is a median; held-out medians need a
        margin above it, see the README).
      final_eval_episodes: held-out test levels scored at the end (``eval.json``).
      checkpoint_every_evals: write the resumable checkpoint every this many
        evaluations (and always at the end).
    """

    SWEEPABLE: ClassVar[tuple[str, ...]] = ()

    seed: int = 0
    total_env_steps: int = 10_000_000
    eval_every_steps: int = 500_000
    eval_episodes: int = 32
    eval_max_score: int = 10_000
    stop_at_score: int | None = 10_000
    stop_confirm_episodes: int = 0
    stop_confirm_fraction: float = 0.5
    final_eval_episodes: int = 32
    checkpoint_every_evals: int = 1

    def __post_init__(self):
        hidden = getattr(self, "hidden", None)
        if isinstance(hidden, list | tuple):
            object.__setattr__(self, "hidden", tuple(hidden))
        checks = Checks(self)
        self.check(checks)
        checks.raise_if_any()

    def check(self, checks: Checks) -> None:
        """Adds this config's problems to ``checks``; subclasses extend it."""
        problem = seed_problem(self.seed)
        checks.require(problem is None, problem)
        for name in (
            "total_env_steps",
            "eval_every_steps",
            "eval_episodes",
            "eval_max_score",
            "final_eval_episodes",
            "checkpoint_every_evals",
        ):
            checks.int_at_least(name, 1)
        checks.require(
            not _is_int(self.eval_max_score) or self.eval_max_score <= MAX_SCORE_LIMIT,
            f"eval_max_score must be <= {MAX_SCORE_LIMIT}, got {self.eval_max_score!r}",
        )
        checks.int_at_least("stop_confirm_episodes", 0)
        checks.real_in("stop_confirm_fraction", 0.0, 1.0, low_open=True)
        checks.require(
            self.stop_at_score is None
            or (_is_int(self.stop_at_score) and self.stop_at_score >= 1),
            f"stop_at_score must be None or an int >= 1, got {self.stop_at_score!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hyperparameters(config: RunConfig) -> dict[str, Any]:
    """``{name: float32 scalar}`` of ``config``'s ``SWEEPABLE`` fields: the values
    jitted training code receives as traced arguments."""
    return {
        name: jnp.asarray(getattr(config, name), jnp.float32)
        for name in type(config).SWEEPABLE
    }


def with_hyperparameters(config: RunConfig, hparams: dict[str, Any]) -> RunConfig:
    """A copy of ``config`` whose sweepable fields hold ``hparams``' (traced) values.

    For use inside jitted code only: the copy is not validated again and cannot
    be hashed once it holds tracers. Everything else reads the static config.
    """
    unknown = set(hparams) - set(type(config).SWEEPABLE)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not sweepable fields")
    traced = copy.copy(config)
    for name, value in hparams.items():
        object.__setattr__(traced, name, value)
    return traced


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig(RunConfig):
    """Fields shared by every policy-gradient algorithm.

    Attributes:
      env_id: ``FlappyBird-v0`` (features) or ``FlappyBird-lidar-v0``; pixels take
        ``FlappyBird-pixels-v0`` and a CNN. Any other gymnax id with discrete
        actions and flat observations (``CartPole-v1``, ``Acrobot-v1``, ...)
        works too, scored by its episode return.
      max_steps_in_episode: training episodes are truncated (and bootstrapped
        where a critic exists) after this many steps (None: the env's own
        limit, 10,000 steps for Flappy Bird, 500 for CartPole-v1).
      total_env_steps: training budget in env steps (all envs together); the run
        does ``total_env_steps // steps_per_update`` updates. Episodic algorithms
        (``LIVE_BUDGET``: REINFORCE family, GRPO) count live env steps (the steps
        inside episodes, not the padding after one ended) and update until the
        budget is reached (the last batch may overshoot it).
      lr: Adam learning rate.
      anneal_lr: decay the learning rate linearly to 0 over the budget (over the
        live env steps, for ``LIVE_BUDGET`` algorithms).
      adam_eps: Adam's epsilon.
      max_grad_norm: clip the gradient's global norm to this (optax).
      reward_scale: rewards are multiplied by this before the loss (REFERENCE s.10:
        0.1 keeps the value targets small enough for the critic to follow).
      hidden: hidden-layer widths of the MLP (of each torso with a critic).
      activation: "tanh", "relu", "gelu" or "silu".
      (The run fields, from ``seed`` to ``checkpoint_every_evals``, are
      ``RunConfig``'s; the stop is confirmed on 128 levels by default.)
    """

    SWEEPABLE: ClassVar[tuple[str, ...]] = ("lr", "reward_scale")
    # Budget and evaluations in live env steps, reached by a data-dependent number
    # of updates (episodic batches); False: whole batches, all of them live.
    LIVE_BUDGET: ClassVar[bool] = False

    seed: int = 0
    env_id: str = "FlappyBird-v0"
    max_steps_in_episode: int | None = None
    total_env_steps: int = 10_000_000
    lr: float = 1e-3
    anneal_lr: bool = False
    adam_eps: float = 1e-5
    max_grad_norm: float = 0.5
    reward_scale: float = 0.1
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    eval_every_steps: int = 500_000
    eval_episodes: int = 32
    eval_max_score: int = 10_000
    stop_at_score: int | None = 10_000
    stop_confirm_episodes: int = 128
    stop_confirm_fraction: float = 0.65

    # --- derived sizes; subclasses define steps_per_update and minibatch steps.

    @property
    def steps_per_update(self) -> int:
        """Env steps simulated per update (one batch)."""
        raise NotImplementedError

    @property
    def gradient_steps_per_update(self) -> int:
        """Optimizer steps per update (epochs x minibatches)."""
        return 1

    @property
    def num_updates(self) -> int:
        """Updates in the budget (``LIVE_BUDGET``: the fewest it can take)."""
        return self.total_env_steps // self.steps_per_update

    @property
    def updates_per_eval(self) -> int:
        return max(
            1, min(self.num_updates, self.eval_every_steps // self.steps_per_update)
        )

    @property
    def uses_critic(self) -> bool:
        raise NotImplementedError

    def check(self, checks: Checks) -> None:
        """Adds this config's problems to ``checks``; subclasses extend it."""
        super().check(checks)
        if self.env_id not in ENV_IDS:
            problem = (
                scored.check_env_id(self.env_id)
                if isinstance(self.env_id, str)
                else f"{self.env_id!r} is not a string"
            )
            checks.require(
                problem is None,
                f"env_id must be one of {list(ENV_IDS)} or a gymnax id with "
                f"discrete actions and flat observations: {problem}",
            )
        if self.max_steps_in_episode is not None:
            checks.int_at_least("max_steps_in_episode", 1)
        checks.require(
            not _is_int(self.max_steps_in_episode)
            or self.max_steps_in_episode <= INT32_MAX,
            f"max_steps_in_episode must fit int32 (<= {INT32_MAX}), got "
            f"{self.max_steps_in_episode!r}",
        )
        checks.real_in("lr", 0.0, 1.0, low_open=True)
        checks.real_in("adam_eps", 0.0, 1.0, low_open=True)
        checks.real_in("max_grad_norm", 0.0, math.inf, low_open=True, high_open=True)
        checks.real_in("reward_scale", 0.0, math.inf, low_open=True, high_open=True)
        checks.boolean("anneal_lr")
        checks.widths("hidden")
        checks.one_of("activation", ACTIVATIONS)

    def check_budget(self, checks: Checks) -> None:
        """The budget must buy at least one update (call after the batch checks)."""
        if checks.problems:
            return
        checks.require(
            self.total_env_steps >= self.steps_per_update,
            f"total_env_steps ({self.total_env_steps}) must be at least one batch "
            f"({self.steps_per_update} env steps)",
        )

    def policy_spec(self, num_actions: int) -> dict[str, Any]:
        """``{"kind", **factory kwargs}`` for ``rl_pg.checkpoint.save_policy``."""
        value = "separate" if self.uses_critic else None
        if ENV_IDS.get(self.env_id) == "pixels":
            return {
                "kind": "cnn",
                "num_actions": num_actions,
                "hidden": list(self.hidden),
                "activation": self.activation,
                "value": "shared" if self.uses_critic else None,
            }
        return {
            "kind": "mlp",
            "num_actions": num_actions,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "value": value,
        }
