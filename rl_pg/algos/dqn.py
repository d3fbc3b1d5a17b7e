"""Deep Q-learning (DQN) with a replay buffer and a target network.

DQN (Mnih et al. 2015, "Human-level control through deep reinforcement
learning") regresses an online network ``Q_theta`` on bootstrapped targets from a
slowly moving copy ``Q_target``, on transitions drawn uniformly from a replay
buffer (:mod:`rl_pg.replay`)::

    y = R + discount * Q_target(s', argmax_a' Q_sel(s', a'))
    L(theta) = mean_i huber_delta(Q_theta(s_i, a_i) - y_i)

with ``Q_sel = Q_target`` (DQN: the max of the target network) or
``Q_sel = Q_theta`` (Double DQN, van Hasselt et al. 2016, "Deep Reinforcement
Learning with Double Q-learning": the online network selects, the target network
evaluates, which removes the max's upward bias). For ``n_step = 1`` (Mnih et al.)
``R = r``, ``s'`` is the next state and ``discount = gamma * (1 - terminated)``;
for ``n_step = n`` (Sutton 1988; Hessel et al. 2018, "Rainbow"), ``R`` sums up to
``n`` discounted rewards, ``s'`` is the state ``n`` steps later and ``discount =
gamma^n`` (shorter, or 0, where the episode ends first: see
:func:`n_step_transition`). The Huber loss is Mnih et al.'s clipping of the TD
error to [-delta, delta] in the gradient. Adam with global-norm clipping; the
target network follows the online one every ``target_update_every`` gradient
steps, as a hard copy (``tau = 1``) or a Polyak average ``target <- tau * online
+ (1 - tau) * target``.

Acting. ``num_envs`` auto-resetting environments step in parallel (``vmap``),
epsilon-greedy with epsilon decaying linearly from ``epsilon_start`` to
``epsilon_end`` over ``epsilon_decay_steps`` env steps. The state keeps each env's
last ``n_step - 1`` steps (:func:`init` takes the first ones); every vector step
completes the n-step transition of the oldest and adds those ``num_envs``
transitions to the buffer. Once ``learning_starts`` env steps have been taken,
every ``train_every``-th vector step takes one gradient step on a batch of
``batch_size``.

Episode ends. A crash is terminal: the return stops there and is not
bootstrapped. An episode cut by the training time limit (``max_steps_in_episode``)
is not terminal: the return stops there too, but bootstraps from the cut
episode's ``info["final_observation"]`` (gymnax's auto-reset returns the next
episode's first observation). No return runs across an episode boundary.

Rewards are the environment's (+0.1 alive, +1 per pipe, -0.5 at the top, -1 on a
crash) times ``reward_scale``. Observations: features or LIDAR vectors (an MLP) or
pixels (a CNN). The Q-network is a :mod:`rl_pg.policies` network without a critic
whose "logits" are the Q-values, so checkpoints are ordinary policy checkpoints
(:mod:`rl_pg.checkpoint`) and their greedy policy (argmax) is the DQN agent:
``rl-pg eval --checkpoint RUN_DIR`` and ``rl-pg render --checkpoint`` work on a
DQN run as they are.

Like the other off-policy agent here (tabular Q-learning), the greedy policy's
score swings between evaluations, so training scores it every
``eval_every_steps`` env steps on validation levels and keeps the best parameters;
the reported score comes from the disjoint held-out test levels.

Entry points: :data:`ALGORITHM` (the :class:`rl_pg.algos.base.Algorithm` that
``rl-pg train --algo dqn`` runs through the one run driver) and :func:`train` (the
whole run as one pure, jittable function; ``jit(vmap(train))`` over keys trains
several seeds).
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rl_pg import checkpoint, policies, replay
from rl_pg.algos import base, loop
from rl_pg.algos.config import ACTIVATIONS, Checks, RunConfig
from rl_pg.envs import ENV_IDS

Params = Any
QApplyFn = Callable[[Params, jax.Array], jax.Array]  # (params, obs [B, ...]) -> [B, A]


# ---------------------------------------------------------------------------- config


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DQNConfig(RunConfig):
    """Hyperparameters of a DQN run; validated on construction.

    Defaults are for ``FlappyBird-v0`` (features). Screened at 3M env steps
    (2 seeds, ``experiments/dqn_tuning.py``, held-out medians; README "DQN"):
    the earlier defaults (64x64, Huber delta 1) 16 and 20.5; a 128x128 network
    26 and 63.5; Huber delta 10 34.5 and 17; both (these defaults) 68 and 33.
    Worse: a dueling head (8.5, 5), lr 1e-3 (7, 14), 5-step returns (6.5, 7),
    lr 2.5e-4 with the 128x128 network and delta 10 (23, 39). Why delta 10: a
    live state's value is about ``0.1 / (1 - gamma) = 10`` plus the pipes'
    rewards, a crash's target is -1, so the rare transitions that teach the
    agent where it dies have TD errors of order 10, which delta 1 clips to a
    unit gradient while the common small errors stay quadratic. Raw rewards
    (``reward_scale=1``): with Adam, scaling rewards by c is close to scaling
    ``huber_delta`` by 1/c, so one of the two is enough.

    Attributes:
      env_id: ``FlappyBird-v0`` (features, MLP), ``FlappyBird-lidar-v0`` (MLP)
        or ``FlappyBird-pixels-v0`` (CNN).
      max_steps_in_episode: training episodes are truncated (and bootstrapped)
        after this many steps.
      total_env_steps: training budget in env steps (all envs together); the run
        takes ``num_chunks * eval_every_steps`` of them, plus the
        ``(n_step - 1) * num_envs`` that fill the n-step window.
      num_envs: environments stepping in parallel.
      buffer_size: replay capacity in transitions (at least ``num_envs``).
      batch_size: transitions per gradient step.
      learning_starts: env steps of pure collection before the first gradient step.
      train_every: vector steps (of ``num_envs`` env steps) per gradient step.
      target_update_every: gradient steps between target-network updates.
      tau: target update ``tau * online + (1 - tau) * target``; 1 is a hard copy.
      double_dqn: select the bootstrap action with the online network.
      dueling: Q from a state value and mean-centred advantages on one torso
        (:func:`dueling_q`); the checkpoint's logits are the advantages, whose
        argmax is the greedy action.
      n_step: steps of reward summed before bootstrapping (1: Mnih et al.'s
        one-step target; see :func:`n_step_transition`).
      gamma: discount.
      reward_scale: environment rewards are multiplied by this.
      huber_delta: the Huber loss is quadratic for |TD error| <= delta.
      lr: Adam learning rate.
      adam_eps: Adam's epsilon.
      max_grad_norm: clip the gradient's global norm to this.
      epsilon_start, epsilon_end: exploration probability at env step 0 and from
        ``epsilon_decay_steps`` on (linear in between).
      epsilon_decay_steps: env steps of the linear decay.
      hidden: dense widths (the MLP; the dense layers after the CNN for pixels).
      activation: "tanh", "relu", "gelu" or "silu".
      eval_every_steps: env steps between validation evaluations (a multiple of
        ``num_envs``); also the length of one jitted training chunk.

    The other run fields (evaluation, stop rule, checkpoints) are
    ``RunConfig``'s; the stop is unconfirmed by default (``stop_confirm_episodes
    = 0``: the best validation median reaching ``stop_at_score`` stops).
    """

    SWEEPABLE: ClassVar[tuple[str, ...]] = ("lr", "gamma", "reward_scale", "tau")

    seed: int = 0
    env_id: str = "FlappyBird-v0"
    max_steps_in_episode: int = 10_000
    total_env_steps: int = 5_000_000
    num_envs: int = 32
    buffer_size: int = 200_000
    batch_size: int = 256
    learning_starts: int = 10_000
    train_every: int = 1
    target_update_every: int = 1
    tau: float = 0.02
    double_dqn: bool = True
    dueling: bool = False
    n_step: int = 3
    gamma: float = 0.99
    reward_scale: float = 1.0
    huber_delta: float = 10.0
    lr: float = 5e-4
    adam_eps: float = 1e-5
    max_grad_norm: float = 10.0
    epsilon_start: float = 1.0
    epsilon_end: float = 0.01
    epsilon_decay_steps: int = 100_000
    hidden: tuple[int, ...] = (128, 128)
    activation: str = "relu"
    eval_every_steps: int = 250_016  # 7813 vector steps of 32 envs
    eval_episodes: int = 32
    eval_max_score: int = 10_000
    stop_at_score: int | None = 10_000
    final_eval_episodes: int = 32

    def check(self, checks: Checks) -> None:
        super().check(checks)
        checks.one_of("env_id", tuple(ENV_IDS))
        for name in (
            "max_steps_in_episode",
            "num_envs",
            "buffer_size",
            "batch_size",
            "train_every",
            "target_update_every",
            "n_step",
            "epsilon_decay_steps",
        ):
            checks.int_at_least(name, 1)
        checks.int_at_least("learning_starts", 0)
        checks.real_in("tau", 0.0, 1.0, low_open=True)
        checks.real_in("gamma", 0.0, 1.0)
        checks.real_in("reward_scale", 0.0, math.inf, low_open=True, high_open=True)
        checks.real_in("huber_delta", 0.0, math.inf, low_open=True, high_open=True)
        checks.real_in("lr", 0.0, 1.0, low_open=True)
        checks.real_in("adam_eps", 0.0, 1.0, low_open=True)
        checks.real_in("max_grad_norm", 0.0, math.inf, low_open=True, high_open=True)
        checks.real_in("epsilon_start", 0.0, 1.0)
        checks.real_in("epsilon_end", 0.0, 1.0)
        checks.boolean("double_dqn")
        checks.boolean("dueling")
        checks.widths("hidden")
        checks.one_of("activation", ACTIVATIONS)
        if not checks.problems:  # relations between fields that passed alone
            checks.divides("num_envs", "eval_every_steps")
            checks.require(
                self.buffer_size >= self.num_envs,
                f"buffer_size ({self.buffer_size}) must hold one vector step "
                f"(num_envs = {self.num_envs})",
            )
            checks.require(
                self.total_env_steps >= self.eval_every_steps,
                f"total_env_steps ({self.total_env_steps}) must be at least one "
                f"chunk (eval_every_steps = {self.eval_every_steps})",
            )
            trained = self.num_chunks * self.eval_every_steps
            checks.require(
                self.learning_starts < trained,
                f"learning_starts ({self.learning_starts}) must be below the env "
                f"steps trained ({trained}): hardly a gradient step would be taken",
            )

    @property
    def num_chunks(self) -> int:
        """Training chunks (one validation evaluation each) in the budget."""
        return self.total_env_steps // self.eval_every_steps

    @property
    def steps_per_chunk(self) -> int:
        """Vector steps (of ``num_envs`` env steps each) per chunk."""
        return self.eval_every_steps // self.num_envs

    def network_spec(self, num_actions: int) -> dict[str, Any]:
        """``{"kind", **factory kwargs}`` of the Q-network (a critic-less policy)."""
        kind = "cnn" if ENV_IDS[self.env_id] == "pixels" else "mlp"
        return {
            "kind": kind,
            "num_actions": num_actions,
            "hidden": list(self.hidden),
            "activation": self.activation,
            # Dueling: the advantage head is the policy's logits, the value head
            # sits on the same torso (see dueling_q).
            "value": "shared" if self.dueling else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -------------------------------------------------------------------------- the loss


class Step(NamedTuple):
    """One environment step as the acting loop sees it (batched: [N, ...])."""

    obs: jax.Array  # [*obs_shape] s_t
    action: jax.Array  # [] int32 a_t
    reward: jax.Array  # [] float32 r_{t+1}, scaled
    next_obs: jax.Array  # [*obs_shape] s_{t+1}; the final observation at an end
    terminated: jax.Array  # [] bool, s_{t+1} is terminal (a crash)
    truncated: jax.Array  # [] bool, the episode was cut after this step


class Transition(NamedTuple):
    """An n-step transition as the replay buffer stores it (batched: [B, ...])."""

    obs: jax.Array  # [*obs_shape] s_t
    action: jax.Array  # [] int32 a_t
    reward: jax.Array  # [] float32 sum_{k<m} gamma^k r_{t+k+1}
    next_obs: jax.Array  # [*obs_shape] s_{t+m}, the state bootstrapped from
    discount: jax.Array  # [] float32 gamma^m, or 0 when s_{t+m} is terminal


def n_step_transition(steps: Step, gamma: float | jax.Array) -> Transition:
    """The n-step transition from the first of ``n`` consecutive steps of one env.

    The return runs for ``m = n`` steps or up to the episode's end, whichever
    comes first (Sutton 1988; Hessel et al. 2018, "Rainbow", eq. 2)::

        reward   = sum_{k < m} gamma^k r_{t+k+1}
        discount = gamma^m * (1 - terminated_{t+m})
        next_obs = s_{t+m}

    A crash ends the sum with no bootstrap; a time-limit cut ends it too but
    bootstraps from the cut episode's final observation. Computed by a reverse
    ``lax.scan``; ``n = 1`` is the one-step transition with
    ``discount = gamma * (1 - terminated)``.

    Args:
      steps: Step with leaves [n, ...], time-major, t .. t + n - 1 of one env.
      gamma: discount per step.

    Returns:
      Transition (unbatched).
    """
    chex.assert_rank([steps.reward, steps.terminated, steps.truncated], 1)
    n = steps.reward.shape[0]
    # The sum stops after step k if the episode ends there or the window does.
    cut = (steps.terminated | steps.truncated).at[n - 1].set(True)

    def backward(carry, step):
        reward_after, discount_after, obs_after = carry
        step, cut_here = step
        reward = step.reward + jnp.where(cut_here, 0.0, gamma * reward_after)
        own = gamma * (1.0 - step.terminated.astype(jnp.float32))
        discount = jnp.where(cut_here, own, gamma * discount_after)
        obs = jnp.where(cut_here, step.next_obs, obs_after)
        return (reward, discount, obs), None

    last = jax.tree.map(lambda x: x[n - 1], steps)
    init = (jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32), last.next_obs)
    (reward, discount, next_obs), _ = jax.lax.scan(
        backward, init, (steps, cut), reverse=True
    )
    return Transition(
        obs=steps.obs[0],
        action=steps.action[0],
        reward=reward.astype(jnp.float32),
        next_obs=next_obs,
        discount=discount.astype(jnp.float32),
    )


class LossAux(NamedTuple):
    """Diagnostics of :func:`dqn_loss`; all scalars (means over the batch)."""

    q_mean: jax.Array  # Q_theta(s, a)
    target_mean: jax.Array  # y
    td_abs: jax.Array  # |Q_theta(s, a) - y|


def q_learning_target(
    reward: jax.Array,
    discount: jax.Array,
    q_next_target: jax.Array,
    q_next_selector: jax.Array,
) -> jax.Array:
    """The bootstrapped target of one transition.

    ``y = r + discount * q_next_target[argmax_a q_next_selector[a]]``; with
    ``q_next_selector = q_next_target`` this is Q-learning's ``r + discount *
    max_a Q(s', a)`` (Watkins 1989; DQN with a target network), with the online
    network's values it is Double Q-learning (van Hasselt et al. 2016, eq. 4).
    Ties go to the lowest action. Matches ``rlax.double_q_learning``'s target.

    Args:
      reward: [] r_{t+1}.
      discount: [] gamma * (1 - terminated_{t+1}).
      q_next_target: [A] values of s_{t+1} that are bootstrapped from.
      q_next_selector: [A] values of s_{t+1} that select the action.

    Returns:
      [] the target y (no gradient is stopped here).
    """
    chex.assert_rank([reward, discount, q_next_target, q_next_selector], [0, 0, 1, 1])
    chex.assert_equal_shape([q_next_target, q_next_selector])
    best = jnp.argmax(q_next_selector)
    return reward + discount * q_next_target[best]


def dqn_loss(
    params: Params,
    target_params: Params,
    batch: Transition,
    *,
    apply_fn: QApplyFn,
    double_dqn: bool,
    huber_delta: float,
) -> tuple[jax.Array, LossAux]:
    """The DQN / Double DQN loss on a batch of transitions.

    ``L = (1/B) sum_i huber_delta(Q_theta(s_i, a_i) - sg[y_i])`` with ``y_i`` from
    :func:`q_learning_target` with the stored ``discount_i`` (``gamma^m``, 0 after
    a crash: see :func:`n_step_transition`), the target network's values and, for
    Double DQN, the online network's selection (Mnih et al. 2015; van Hasselt et
    al. 2016). ``huber_delta(x) = x^2 / 2`` for
    ``|x| <= delta``, else ``delta * (|x| - delta / 2)``.

    Args:
      params: online network parameters (differentiated).
      target_params: target network parameters.
      batch: Transition with leaves [B, ...].
      apply_fn: ``(params, obs [B, ...]) -> Q [B, A]``.
      double_dqn: select the bootstrap action with the online network.
      huber_delta: the Huber loss's quadratic range.

    Returns:
      (loss [], LossAux).
    """
    chex.assert_rank([batch.action, batch.reward, batch.discount], 1)
    num = batch.action.shape[0]
    if double_dqn:
        # One online pass over s and s' (the s' half only selects actions).
        both = jnp.concatenate([batch.obs, batch.next_obs])
        q_both = apply_fn(params, both)
        q, q_next_selector = q_both[:num], jax.lax.stop_gradient(q_both[num:])
    else:
        q = apply_fn(params, batch.obs)
    q_next_target = apply_fn(target_params, batch.next_obs)
    if not double_dqn:
        q_next_selector = q_next_target
    targets = jax.vmap(q_learning_target)(
        batch.reward.astype(jnp.float32),
        batch.discount.astype(jnp.float32),
        q_next_target,
        q_next_selector,
    )
    targets = jax.lax.stop_gradient(targets)
    q_taken = jnp.take_along_axis(q, batch.action[:, None].astype(jnp.int32), axis=1)
    td = q_taken[:, 0] - targets
    loss = jnp.mean(optax.losses.huber_loss(td, delta=huber_delta))
    return loss, LossAux(
        q_mean=jnp.mean(q_taken),
        target_mean=jnp.mean(targets),
        td_abs=jnp.mean(abs(td)),
    )


def epsilon_at(config: DQNConfig, env_steps: jax.Array) -> jax.Array:
    """Linear decay from ``epsilon_start`` to ``epsilon_end`` over the decay steps."""
    schedule = optax.linear_schedule(
        config.epsilon_start, config.epsilon_end, config.epsilon_decay_steps
    )
    return schedule(env_steps)


# -------------------------------------------------------------------------- pieces


def make_env(config: DQNConfig):
    """``(env, env_params)`` of the run (one cached env object per id)."""
    return loop.make_env(config)


def make_network(config: DQNConfig) -> policies.Policy:
    """The Q-network: a critic-less policy whose logits are Q-values.

    The same object for equal specs, so jitted evaluations compile once.
    """
    env, _ = make_env(config)
    return loop.policy_from_spec(config.network_spec(env.num_actions))


def dueling_q(advantages: jax.Array, value: jax.Array) -> jax.Array:
    """Q-values of a dueling head (Wang et al. 2016, "Dueling Network
    Architectures for Deep Reinforcement Learning", eq. 9)::

        Q(s, a) = V(s) + A(s, a) - (1/|A|) sum_a' A(s, a')

    Centring makes V and A identifiable; the argmax is A's.

    Args:
      advantages: [..., A] advantage head.
      value: [...] state-value head.

    Returns:
      [..., A] Q-values.
    """
    chex.assert_equal_shape_prefix([advantages, value], value.ndim)
    chex.assert_rank(advantages, value.ndim + 1)
    centred = advantages - jnp.mean(advantages, axis=-1, keepdims=True)
    return value[..., None] + centred


def _q_apply(network: policies.Policy, dueling: bool = False) -> QApplyFn:
    if dueling:
        return lambda params, obs: dueling_q(*network.apply(params, obs))
    return lambda params, obs: network.apply(params, obs)[0]


def make_optimizer(config: DQNConfig) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm, adam)``."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adam(config.lr, eps=config.adam_eps),
    )


def make_replay(config: DQNConfig) -> replay.Replay:
    """The run's replay buffer, shaped like the env's transitions."""
    env, env_params = make_env(config)
    space = env.observation_space(env_params)
    obs = jax.ShapeDtypeStruct(space.shape, space.dtype)
    example = Transition(
        obs=obs,
        action=jax.ShapeDtypeStruct((), jnp.int32),
        reward=jax.ShapeDtypeStruct((), jnp.float32),
        next_obs=obs,
        discount=jax.ShapeDtypeStruct((), jnp.float32),
    )
    return replay.make_replay(config.buffer_size, example)


# -------------------------------------------------------------------------- training


class DQNState(NamedTuple):
    """Carry of the training loop (and what the driver checkpoints)."""

    params: Params  # online network
    target_params: Params  # target network
    opt_state: optax.OptState
    buffer: replay.ReplayState
    window: Step  # every leaf [n_step - 1, num_envs, ...]: the latest steps
    obs: jax.Array  # [num_envs, *obs_shape] current observations
    env_state: Any  # EnvState, every leaf [num_envs, ...]
    key: chex.PRNGKey
    env_steps: jax.Array  # [] int32, env steps so far (all envs)
    gradient_steps: jax.Array  # [] int32


class TrainStats(NamedTuple):
    """Sums over the vector steps of :func:`train_steps`; every field []."""

    episodes: jax.Array  # int32, training episodes that ended
    crashes: jax.Array  # int32, of which by a crash (the rest truncated)
    score_sum: jax.Array  # float32, their final scores
    score_max: jax.Array  # int32 (0 if none)
    updates: jax.Array  # int32, gradient steps taken
    loss_sum: jax.Array  # float32, over the gradient steps
    q_sum: jax.Array  # float32, mean Q(s, a) of each batch
    td_abs_sum: jax.Array  # float32
    grad_norm_sum: jax.Array  # float32, before clipping


def init(config: DQNConfig, key: chex.PRNGKey) -> DQNState:
    """Fresh networks (target = online), an empty buffer, reset environments and
    the first ``n_step - 1`` steps of each (the n-step window; counted in
    ``env_steps``)."""
    env, env_params = make_env(config)
    network = make_network(config)
    key, key_params, key_reset, key_window = jax.random.split(key, 4)
    obs, env_state = jax.vmap(env.reset, (0, None))(
        jax.random.split(key_reset, config.num_envs), env_params
    )
    params = network.init(key_params, obs[:1])
    zero = jnp.asarray(0, jnp.int32)

    def fill(carry, key):
        obs, env_state, env_steps = carry
        step, obs, env_state, _ = _act(config, params, obs, env_state, env_steps, key)
        return (obs, env_state, env_steps + config.num_envs), step

    (obs, env_state, env_steps), window = jax.lax.scan(
        fill, (obs, env_state, zero), jax.random.split(key_window, config.n_step - 1)
    )
    return DQNState(
        params=params,
        target_params=params,
        opt_state=make_optimizer(config).init(params),
        buffer=make_replay(config).init(),
        window=window,
        obs=obs,
        env_state=env_state,
        key=key,
        env_steps=env_steps,
        gradient_steps=zero,
    )


class _Learner(NamedTuple):
    params: Params
    target_params: Params
    opt_state: optax.OptState
    gradient_steps: jax.Array


def _gradient_step(
    config: DQNConfig, learner: _Learner, batch: Transition
) -> tuple[_Learner, tuple[jax.Array, LossAux, jax.Array]]:
    """One Adam step on a sampled batch; update the target network if due."""
    loss_fn = functools.partial(
        dqn_loss,
        apply_fn=_q_apply(make_network(config), config.dueling),
        double_dqn=config.double_dqn,
        huber_delta=config.huber_delta,
    )
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        learner.params, learner.target_params, batch
    )
    updates, opt_state = make_optimizer(config).update(
        grads, learner.opt_state, learner.params
    )
    params = optax.apply_updates(learner.params, updates)
    gradient_steps = learner.gradient_steps + 1
    due = gradient_steps % config.target_update_every == 0
    moved = optax.incremental_update(params, learner.target_params, config.tau)
    target_params = jax.tree.map(
        lambda new, old: jnp.where(due, new, old), moved, learner.target_params
    )
    return _Learner(params, target_params, opt_state, gradient_steps), (
        loss,
        aux,
        optax.tree.norm(grads),
    )


def _act(
    config: DQNConfig,
    params: Params,
    obs: jax.Array,
    env_state: Any,
    env_steps: jax.Array,
    key: chex.PRNGKey,
) -> tuple[Step, jax.Array, Any, jax.Array]:
    """One epsilon-greedy step of every env (auto-resetting).

    Returns:
      (the Step [N], the next observations [N, ...] (a new episode's first where
      one ended), the next env states, the scores [N] after the step).
    """
    env, env_params = make_env(config)
    num_envs = config.num_envs
    key_explore, key_random, key_step = jax.random.split(key, 3)
    q = _q_apply(make_network(config), config.dueling)(params, obs)
    explore = jax.random.uniform(key_explore, (num_envs,)) < epsilon_at(
        config, env_steps
    )
    random_actions = jax.random.randint(key_random, (num_envs,), 0, q.shape[-1])
    actions = jnp.where(explore, random_actions, jnp.argmax(q, axis=-1))
    actions = actions.astype(jnp.int32)
    next_obs, env_state, reward, terminated, truncated, info = jax.vmap(
        env.step, (0, 0, 0, None)
    )(jax.random.split(key_step, num_envs), env_state, actions, env_params)
    step = Step(
        obs=obs,
        action=actions,
        reward=(reward * config.reward_scale).astype(jnp.float32),
        next_obs=info["final_observation"],
        terminated=terminated,
        truncated=truncated & ~terminated,
    )
    return step, next_obs, env_state, info["score"]


def collect(
    config: DQNConfig, state: DQNState, key: chex.PRNGKey
) -> tuple[DQNState, Step, jax.Array]:
    """Step every env once and store the n-step transitions this completes.

    The window's ``n_step - 1`` older steps and the new one make each env's
    oldest n-step transition complete (:func:`n_step_transition`); those
    ``num_envs`` transitions go to the buffer and the window moves on.

    Returns:
      (the state with envs, window, buffer and ``env_steps`` advanced, the new
      Step [N], the scores [N] after it).
    """
    step, obs, env_state, score = _act(
        config, state.params, state.obs, state.env_state, state.env_steps, key
    )
    steps = jax.tree.map(
        lambda old, new: jnp.concatenate([old, new[None]]), state.window, step
    )
    transitions = jax.vmap(n_step_transition, in_axes=(1, None))(steps, config.gamma)
    state = state._replace(
        buffer=make_replay(config).add(state.buffer, transitions),
        window=jax.tree.map(lambda x: x[1:], steps),
        obs=obs,
        env_state=env_state,
        env_steps=state.env_steps + config.num_envs,
    )
    return state, step, score


def _vector_step(
    config: DQNConfig, state: DQNState, key: chex.PRNGKey
) -> tuple[DQNState, TrainStats]:
    """:func:`collect`, then a gradient step when one is due."""
    key_collect, key_learn = jax.random.split(key)
    state, step, score = collect(config, state, key_collect)
    buffer, env_steps = state.buffer, state.env_steps

    learner = _Learner(
        state.params, state.target_params, state.opt_state, state.gradient_steps
    )
    iteration = env_steps // config.num_envs
    learn = (env_steps >= config.learning_starts) & (
        iteration % config.train_every == 0
    )
    zero = jnp.asarray(0.0, jnp.float32)

    def skip(learner, batch):
        return learner, (zero, LossAux(zero, zero, zero), zero)

    # Sampled outside the cond: a cond operand may be copied, and the buffer is big.
    batch = make_replay(config).sample(buffer, key_learn, config.batch_size)
    learner, (loss, aux, grad_norm) = jax.lax.cond(
        learn, functools.partial(_gradient_step, config), skip, learner, batch
    )

    done = step.terminated | step.truncated
    final_score = jnp.where(done, score, 0)
    stats = TrainStats(
        episodes=jnp.sum(done, dtype=jnp.int32),
        crashes=jnp.sum(step.terminated, dtype=jnp.int32),
        score_sum=jnp.sum(final_score, dtype=jnp.float32),
        score_max=jnp.max(final_score).astype(jnp.int32),
        updates=learn.astype(jnp.int32),
        loss_sum=loss,
        q_sum=aux.q_mean,
        td_abs_sum=aux.td_abs,
        grad_norm_sum=grad_norm,
    )
    state = state._replace(
        params=learner.params,
        target_params=learner.target_params,
        opt_state=learner.opt_state,
        gradient_steps=learner.gradient_steps,
    )
    return state, stats


def train_steps(
    config: DQNConfig, state: DQNState, num_steps: int | None = None
) -> tuple[DQNState, TrainStats]:
    """``num_steps`` vector steps (default: one chunk, ``eval_every_steps`` env
    steps) of acting and learning, in a ``lax.scan``."""
    if num_steps is None:
        num_steps = config.steps_per_chunk

    def body(carry, key):
        state, total = carry
        state, step = _vector_step(config, state, key)
        total = TrainStats(
            *(
                jnp.maximum(a, b) if name == "score_max" else a + b
                for name, a, b in zip(TrainStats._fields, total, step, strict=True)
            )
        )
        return (state, total), None

    key, key_chunk = jax.random.split(state.key)
    zero_i, zero_f = jnp.asarray(0, jnp.int32), jnp.asarray(0.0, jnp.float32)
    total = TrainStats(
        zero_i, zero_i, zero_f, zero_i, zero_i, zero_f, zero_f, zero_f, zero_f
    )
    (state, total), _ = jax.lax.scan(
        body,
        (state._replace(key=key), total),
        jax.random.split(key_chunk, num_steps),
    )
    return state, total


def greedy_act_fn(config: DQNConfig):
    """``act_fn`` for :func:`rl_pg.evaluate.evaluate`: argmax_a Q(obs, a)."""
    return loop.greedy_act_fn(make_network(config))


COLUMNS = (
    "gradient_steps",
    "epsilon",
    "train_episodes",
    "train_crashes",
    "train_score_mean",
    "train_score_max",
    "loss",
    "q_mean",
    "td_abs",
    "grad_norm",
)


def steps(
    config: DQNConfig, state: DQNState, num_steps: int
) -> tuple[DQNState, dict[str, jax.Array]]:
    """:func:`train_steps` and the chunk's ``metrics.csv`` columns (means over
    its gradient steps and finished training episodes; nan where none)."""
    state, stats = train_steps(config, state, num_steps)

    def mean(total, count):
        return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)

    return state, dict(
        gradient_steps=state.gradient_steps,
        epsilon=epsilon_at(config, state.env_steps),
        train_episodes=stats.episodes,
        train_crashes=stats.crashes,
        train_score_mean=mean(stats.score_sum, stats.episodes),
        train_score_max=stats.score_max,
        loss=mean(stats.loss_sum, stats.updates),
        q_mean=mean(stats.q_sum, stats.updates),
        td_abs=mean(stats.td_abs_sum, stats.updates),
        grad_norm=mean(stats.grad_norm_sum, stats.updates),
    )


def save_network(
    directory: str | os.PathLike, config: DQNConfig, params: Params, **extra: Any
) -> Path:
    """A :mod:`rl_pg.checkpoint` policy directory (written atomically) whose greedy
    policy is the DQN agent."""
    env, _ = make_env(config)
    return checkpoint.save_policy(
        directory,
        params,
        policy=config.network_spec(env.num_actions),
        env_id=config.env_id,
        env_kwargs={"max_steps_in_episode": config.max_steps_in_episode},
        **extra,
    )


ALGORITHM = base.Algorithm(
    name="dqn",
    config_cls=DQNConfig,
    init=init,
    steps=steps,
    chunk_sizes=lambda config: (config.steps_per_chunk,) * config.num_chunks,
    params=lambda state: state.params,
    env_steps=lambda state: state.env_steps,
    make_env=make_env,
    act_fn=greedy_act_fn,
    save=save_network,
    describe=lambda config: dict(
        network=config.network_spec(make_env(config)[0].num_actions),
        num_chunks=config.num_chunks,
    ),
    columns=COLUMNS,
    load=loop.load_agent,
    is_checkpoint=loop.is_policy_checkpoint,
)
train = base.make_train(ALGORITHM)


__all__ = [
    "ALGORITHM",
    "COLUMNS",
    "DQNConfig",
    "DQNState",
    "LossAux",
    "Step",
    "TrainStats",
    "Transition",
    "collect",
    "dqn_loss",
    "dueling_q",
    "epsilon_at",
    "greedy_act_fn",
    "init",
    "make_network",
    "make_optimizer",
    "make_replay",
    "n_step_transition",
    "q_learning_target",
    "save_network",
    "steps",
    "train",
    "train_steps",
]
