"""The training loop shared by the policy-gradient algorithms.

One update = collect a batch with the current policy, then take
``epochs x minibatches`` optimizer steps on an estimator's surrogate loss from
:mod:`rl_pg.estimators` (the very functions the variance study measures). Two ways
to collect:

* :func:`streaming_update` (PPO, A2C): ``num_steps`` steps of ``num_envs``
  auto-resetting streams (:func:`rl_pg.rollout.streaming_rollout`), carried in the
  train state; truncated episodes bootstrap from ``info["final_observation"]``.
* :func:`episodic_update` (REINFORCE family, GRPO): one episode per column from
  fresh levels, ``num_levels x group_size`` columns
  (:func:`rl_pg.rollout.grouped_rollout`), ``horizon`` steps, no auto-reset.

Minibatches are blocks of whole columns (and of whole groups), because estimators
compute returns and advantages along each column's time axis; PPO instead computes
GAE once per batch and shuffles single transitions (:func:`gae_transitions`).

Loss scale. Most estimators aggregate ``(1/B) sum_i sum_t``; the loop divides their
loss by the batch length ``T`` so that it is the per-step mean that PPO
implementations use (which sets what ``max_grad_norm`` means). GRPO and Dr. GRPO
normalise by sequence length themselves and are used as they are. A constant scale
does not change the direction of any estimate.

Every function is pure. :func:`make_algorithm` turns an algorithm's ``init`` and
one-batch ``update`` into the :class:`rl_pg.algos.base.Algorithm` contract (a
chunk is ``n`` updates in one ``lax.scan``); ``rl_pg.algos.base.make_train`` makes
the whole run one pure function, so ``jax.jit(jax.vmap(train, in_axes=(None, 0)))``
trains several seeds at once.
"""

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rl_pg import checkpoint, envs, estimators, policies, returns, rollout
from rl_pg.algos import base
from rl_pg.algos.config import OnPolicyConfig
from rl_pg.envs import ENV_IDS, scored
from rl_pg.trajectory import Trajectory

Params = Any
# Estimators that normalise their own sum over steps (per sequence or by B * T).


class TrainState(NamedTuple):
    """Everything a run carries from one update to the next (and checkpoints).

    Attributes:
      params: policy (and critic) parameters.
      opt_state: optax state (its step count drives learning-rate annealing).
      key: [2] PRNG key of the next update.
      update: [] int32 updates done.
      env_steps: [] int32 env steps taken so far (all streams; for episodic
        batches only the live steps, not the padding after an episode ended).
      stream: auto-resetting streams (streaming algorithms), else None.
      ref_params: reference policy of a KL penalty (GRPO with beta > 0), else None.
    """

    params: Params
    opt_state: optax.OptState
    key: jax.Array
    update: jax.Array
    env_steps: jax.Array
    stream: rollout.StreamState | None
    ref_params: Params | None


class UpdateMetrics(NamedTuple):
    """Diagnostics of one update; all scalars.

    Loss terms are means over the update's optimizer steps (``LossAux`` fields);
    episode statistics cover the episodes that ended in the batch.
    """

    loss: jax.Array
    pg_loss: jax.Array
    value_loss: jax.Array
    entropy: jax.Array
    kl: jax.Array
    approx_kl: jax.Array
    clip_fraction: jax.Array
    grad_norm: jax.Array  # before clipping
    episodes: jax.Array  # int32 episodes that ended in the batch
    score_sum: jax.Array  # float32 sum of their final scores (pipes)
    score_max: jax.Array  # int32
    live_steps: jax.Array  # int32 steps inside episodes (mask > 0)
    env_steps: jax.Array  # int32 cumulative env steps after the update


# ------------------------------------------------------------------ env and policy


@functools.cache
def _env(env_id: str):
    if env_id not in ENV_IDS:  # another gymnax env, scored by its episode return
        return scored.make(env_id)[0]
    with jax.ensure_compile_time_eval():  # make() validates with jnp: not traced
        return envs.make(env_id)[0]


@functools.cache
def _env_params(env_id: str, max_steps_in_episode: int | None):
    if env_id not in ENV_IDS:
        return scored.make(env_id, max_steps_in_episode)[1]
    kwargs = {}
    if max_steps_in_episode is not None:
        kwargs["max_steps_in_episode"] = max_steps_in_episode
    with jax.ensure_compile_time_eval():
        return envs.make(env_id, **kwargs)[1]


def make_env(config: OnPolicyConfig):
    """``(env, env_params)`` for training; one env object per id (jit caches).

    Flappy Bird ids come from ``rl_pg.make``; any other gymnax id with discrete
    actions is wrapped by :class:`rl_pg.envs.scored.EpisodeReturn` (score =
    episode return)."""
    env = _env(config.env_id)
    return env, _env_params(config.env_id, config.max_steps_in_episode)


@functools.cache
def _policy(spec: tuple[tuple[str, Any], ...]) -> policies.Policy:
    spec = dict(spec)
    kind = spec.pop("kind")
    factory = {"mlp": policies.mlp_policy, "cnn": policies.cnn_policy}[kind]
    return factory(**spec)


def _freeze(spec: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(spec.items())
    )


def policy_spec(config: OnPolicyConfig) -> dict[str, Any]:
    """The checkpoint spec (``{"kind", **factory kwargs}``) of ``config``'s policy."""
    env = _env(config.env_id)
    return config.policy_spec(env.num_actions)


def make_policy(config: OnPolicyConfig) -> policies.Policy:
    """``config``'s policy; the same object for equal specs (jit caches)."""
    return policy_from_spec(policy_spec(config))


def policy_from_spec(spec: dict[str, Any]) -> policies.Policy:
    return _policy(_freeze(spec))


@functools.cache
def _greedy_act_fn(policy: policies.Policy):
    def act(params: Params, obs: jax.Array, state: Any, key: jax.Array) -> jax.Array:
        del state, key
        logits, _ = policy.apply(params, obs)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return act


def greedy_act_fn(policy: policies.Policy):
    """``act_fn(params, obs, state, key)`` for :func:`rl_pg.evaluate.evaluate`:
    argmax of the logits; one function object per policy (one compilation)."""
    return _greedy_act_fn(policy)


@functools.cache
def sampling_act_fn(policy: policies.Policy):
    """``act_fn(params, obs, state, key)``: actions sampled from the logits."""

    def act(params: Params, obs: jax.Array, state: Any, key: jax.Array) -> jax.Array:
        del state
        logits, _ = policy.apply(params, obs)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    return act


def load_agent(path: str | Path, greedy: bool = True) -> base.Agent:
    """The agent of a :mod:`rl_pg.checkpoint` policy directory (what
    :func:`save_policy` and DQN's ``save`` write): argmax or sampled actions."""
    _, params, env, env_params, meta = checkpoint.load_policy(path)
    # The cached policy object for this spec: evaluations share one compile.
    policy = policy_from_spec(meta["policy"])
    act_fn = greedy_act_fn(policy) if greedy else sampling_act_fn(policy)
    return base.Agent(act_fn, params, env, env_params, meta)


def is_policy_checkpoint(path: str | Path) -> bool:
    """A policy checkpoint is a directory (its loader names a missing file)."""
    return Path(path).is_dir()


# ----------------------------------------------------------------------- optimizer


def make_optimizer(
    config: OnPolicyConfig, env_steps: jax.Array | None = None
) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm, adam)``, with linear annealing if asked.

    The annealing schedule reaches 0 after ``num_updates x gradient steps per
    update`` optimizer steps (the whole budget). With ``config.LIVE_BUDGET`` the
    number of updates is not known in advance: the rate of an update is
    ``lr * max(0, 1 - env_steps / total_env_steps)`` (``env_steps`` before it;
    None, for ``init``: the same state structure).
    """
    lr: float | optax.Schedule = config.lr
    if config.anneal_lr and config.LIVE_BUDGET:
        if env_steps is not None:
            lr = lr * jnp.maximum(0.0, 1.0 - env_steps / config.total_env_steps)
    elif config.anneal_lr:
        total = config.num_updates * config.gradient_steps_per_update
        lr = optax.linear_schedule(config.lr, 0.0, total)
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adam(lr, eps=config.adam_eps),
    )


def init_state(
    config: OnPolicyConfig,
    key: jax.Array,
    *,
    num_streams: int | None = None,
    keep_reference: bool = False,
) -> TrainState:
    """Fresh parameters, optimizer state and (for streaming) reset streams.

    Args:
      config: the algorithm's config.
      key: the run's key.
      num_streams: number of auto-resetting envs (None: episodic, no streams).
      keep_reference: keep the initial params as ``ref_params``.
    """
    env, env_params = make_env(config)
    policy = make_policy(config)
    key, key_params, key_reset = jax.random.split(key, 3)
    obs = jnp.zeros(env.observation_space(env_params).shape, jnp.float32)
    params = policy.init(key_params, obs)
    opt_state = make_optimizer(config).init(params)
    stream = None
    if num_streams is not None:
        stream = rollout.stream_init(key_reset, env, env_params, num_streams)
    return TrainState(
        params=params,
        opt_state=opt_state,
        key=key,
        update=jnp.asarray(0, jnp.int32),
        env_steps=jnp.asarray(0, jnp.int32),
        stream=stream,
        ref_params=params if keep_reference else None,
    )


# ------------------------------------------------------------------------- losses


def make_loss(
    name: str, apply_fn: estimators.ApplyFn, batch_length: int, **hyperparameters: Any
) -> Callable[..., tuple[jax.Array, estimators.LossAux]]:
    """An estimator's loss bound to its hyperparameters, scaled to a per-step mean.

    Returns ``loss(params, batch, **call_kwargs) -> (loss, aux)`` that calls
    ``rl_pg.estimators.get_estimator(name, apply_fn=..., **hyperparameters)`` and
    multiplies the loss by ``1 / batch_length`` unless its registry entry says it
    normalises itself (GRPO, Dr. GRPO).
    """
    estimator = estimators.get_estimator(name, apply_fn=apply_fn, **hyperparameters)
    scale = 1.0 if estimators.spec(name).self_normalised else 1.0 / batch_length

    def loss(params, batch, **call_kwargs):
        value, aux = estimator(params, batch, **call_kwargs)
        return value * scale, estimators.as_loss_aux(aux, value, name)

    return loss


def estimator_kwargs(name: str, config: Any, renames: dict[str, str]) -> dict:
    """The hyperparameters of estimator ``name`` that ``config`` sets.

    An estimator argument ``arg`` takes ``config.<renames.get(arg, arg)>`` when the
    config has that field; the others keep the estimator's defaults.
    """
    kwargs = {}
    for arg in estimators.hyperparameters(name):
        field = renames.get(arg, arg)
        if arg not in ("apply_fn", "ref_params") and hasattr(config, field):
            kwargs[arg] = getattr(config, field)
    return kwargs


# ------------------------------------------------------------------------ SGD loop


class _SGDCarry(NamedTuple):
    params: Params
    opt_state: optax.OptState


class _StepStats(NamedTuple):
    loss: jax.Array
    aux: estimators.LossAux
    grad_norm: jax.Array


def minibatch_columns(
    key: jax.Array, num_columns: int, num_minibatches: int, block_size: int = 1
) -> jax.Array:
    """Column indices of one epoch's minibatches: [M, B / M].

    Blocks of ``block_size`` consecutive columns (groups) are shuffled whole, so
    each minibatch holds whole groups, in their original column order within a
    group; every column appears exactly once.
    """
    num_blocks = num_columns // block_size
    if num_blocks * block_size != num_columns or num_blocks % num_minibatches:
        raise ValueError(
            f"{num_columns} columns in blocks of {block_size} cannot be split into "
            f"{num_minibatches} equal minibatches"
        )
    order = jax.random.permutation(key, num_blocks)
    columns = order[:, None] * block_size + jnp.arange(block_size)
    return columns.reshape(num_minibatches, -1)


def ordered_mean(x: jax.Array) -> jax.Array:
    """Mean of all elements, summed one after another in index order.

    ``jnp.mean`` is an XLA reduction whose summation order XLA picks per shape,
    so under ``vmap`` a seed's metric would change in the last bit with the number
    of seeds beside it; a sequential sum (a ``lax.scan``) does not.
    """
    return ordered_sum(x) / x.size


def ordered_sum(x: jax.Array) -> jax.Array:
    """Sum of all elements, one after another in index order (see
    :func:`ordered_mean`)."""
    flat = jnp.ravel(x)
    total, _ = jax.lax.scan(lambda c, v: (c + v, None), jnp.zeros((), flat.dtype), flat)
    return total


def sgd_on_batch(
    loss_fn: Callable[[Params, Trajectory], tuple[jax.Array, estimators.LossAux]],
    optimizer: optax.GradientTransformation,
    params: Params,
    opt_state: optax.OptState,
    batch: Trajectory,
    key: jax.Array,
    *,
    num_epochs: int,
    num_minibatches: int,
    block_size: int = 1,
) -> tuple[Params, optax.OptState, _StepStats]:
    """``num_epochs`` passes over the batch in ``num_minibatches`` column blocks.

    Each epoch shuffles the batch's blocks of ``block_size`` consecutive columns
    (a group stays whole) and splits them into equal minibatches ``[T, B / M]``.

    Args:
      loss_fn: ``(params, batch) -> (loss, LossAux)``.
      optimizer: an optax transformation.
      params, opt_state: current parameters and optimizer state.
      batch: ``[T, B]`` trajectories.
      key: shuffling key.
      num_epochs: passes over the batch.
      num_minibatches: M; must divide ``B / block_size``.
      block_size: columns that must stay together (the group size).

    Returns:
      (params, opt_state, stats averaged over the ``num_epochs x M`` steps).
    """
    num_columns = jax.tree.leaves(batch)[0].shape[1]
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(carry: _SGDCarry, minibatch: Trajectory):
        (loss, aux), grads = grad_fn(carry.params, minibatch)
        updates, opt_state = optimizer.update(grads, carry.opt_state, carry.params)
        params = optax.apply_updates(carry.params, updates)
        return _SGDCarry(params, opt_state), _StepStats(
            loss, aux, optax.tree.norm(grads)
        )

    def epoch(carry: _SGDCarry, key: jax.Array):
        columns = minibatch_columns(key, num_columns, num_minibatches, block_size)

        def split(x):  # [T, B, ...] -> [M, T, B / M, ...]
            x = jnp.take(x, columns.reshape(-1), axis=1)
            x = x.reshape((x.shape[0], num_minibatches, -1, *x.shape[2:]))
            return jnp.swapaxes(x, 0, 1)

        return jax.lax.scan(minibatch_step, carry, jax.tree.map(split, batch))

    carry, stats = jax.lax.scan(
        epoch, _SGDCarry(params, opt_state), jax.random.split(key, num_epochs)
    )
    return carry.params, carry.opt_state, jax.tree.map(ordered_mean, stats)


# ----------------------------------------------------------------- batch statistics


class _EpisodeStats(NamedTuple):
    episodes: jax.Array
    score_sum: jax.Array
    score_max: jax.Array
    live_steps: jax.Array


def _streaming_stats(batch: Trajectory) -> _EpisodeStats:
    # The batch's last row is marked truncated where the stream merely goes on;
    # only a crash there counts as an ending.
    ended = batch.terminated | batch.truncated.at[-1].set(False)
    scores = jnp.where(ended, batch.score, 0)
    return _EpisodeStats(
        episodes=jnp.sum(ended).astype(jnp.int32),
        score_sum=jnp.sum(scores).astype(jnp.float32),
        score_max=jnp.max(scores).astype(jnp.int32),
        live_steps=jnp.asarray(batch.mask.size, jnp.int32),
    )


def _episodic_stats(batch: Trajectory) -> _EpisodeStats:
    # One episode per column; the score only grows, so its final value is the max.
    live = batch.mask > 0
    final = jnp.max(jnp.where(live, batch.score, 0), axis=0)
    return _EpisodeStats(
        episodes=jnp.asarray(final.shape[0], jnp.int32),
        score_sum=jnp.sum(final).astype(jnp.float32),
        score_max=jnp.max(final).astype(jnp.int32),
        live_steps=jnp.sum(live).astype(jnp.int32),
    )


def _metrics(stats: _StepStats, episodes: _EpisodeStats, env_steps) -> UpdateMetrics:
    return UpdateMetrics(
        loss=stats.loss,
        pg_loss=stats.aux.pg_loss,
        value_loss=stats.aux.value_loss,
        entropy=stats.aux.entropy,
        kl=stats.aux.kl,
        approx_kl=stats.aux.approx_kl,
        clip_fraction=stats.aux.clip_fraction,
        grad_norm=stats.grad_norm,
        episodes=episodes.episodes,
        score_sum=episodes.score_sum,
        score_max=episodes.score_max,
        live_steps=episodes.live_steps,
        env_steps=env_steps,
    )


def _scale_rewards(batch: Trajectory, scale: float) -> Trajectory:
    return batch._replace(rewards=batch.rewards * scale)


# ------------------------------------------------------------------------ updates


def _learn(
    config: OnPolicyConfig,
    state: TrainState,
    loss_fn: Callable[..., tuple[jax.Array, estimators.LossAux]],
    batch: Trajectory,
    episodes: Any,
    key_sgd: jax.Array,
    prepare: Callable[[Trajectory], Any] | None = None,
    **sgd_options: Any,
) -> tuple[TrainState, UpdateMetrics]:
    """Scale the rewards, ``prepare`` the batch (if given), SGD on it and count its
    live steps: the end of every update (``state`` already holds the new key and
    streams). Episodic batches count only their live steps, not the padding."""
    batch = _scale_rewards(batch, config.reward_scale)
    if prepare is not None:
        batch = prepare(batch)
    params, opt_state, stats = sgd_on_batch(
        loss_fn,
        make_optimizer(config, state.env_steps),
        state.params,
        state.opt_state,
        batch,
        key_sgd,
        **sgd_options,
    )
    env_steps = state.env_steps + episodes.live_steps
    new_state = state._replace(
        params=params,
        opt_state=opt_state,
        update=state.update + 1,
        env_steps=env_steps,
    )
    return new_state, _metrics(stats, episodes, env_steps)


def streaming_update(
    config: OnPolicyConfig,
    state: TrainState,
    loss_fn: Callable[..., tuple[jax.Array, estimators.LossAux]],
    *,
    num_steps: int,
    num_epochs: int,
    num_minibatches: int,
    prepare: Callable[[Trajectory], Any] | None = None,
) -> tuple[TrainState, UpdateMetrics]:
    """Collect ``num_steps`` steps of the state's streams, then SGD on them
    (after ``prepare``, for instance :func:`gae_transitions`)."""
    env, env_params = make_env(config)
    policy = make_policy(config)
    key, key_rollout, key_sgd = jax.random.split(state.key, 3)
    stream, batch = rollout.streaming_rollout(
        key_rollout,
        state.params,
        policy.apply,
        env,
        env_params,
        state.stream,
        num_steps,
    )
    return _learn(
        config,
        state._replace(key=key, stream=stream),
        loss_fn,
        batch,
        _streaming_stats(batch),
        key_sgd,
        prepare,
        num_epochs=num_epochs,
        num_minibatches=num_minibatches,
    )


class Transitions(NamedTuple):
    """A batch flattened to ``[1, T * B]`` single transitions with their GAE.

    ``sgd_on_batch`` shuffles the columns, so minibatches are random transitions
    from the whole batch (PureJaxRL, CleanRL), not whole env columns.
    """

    batch: Trajectory
    advantages: jax.Array


def gae_transitions(batch: Trajectory, gamma: float, lam: float) -> Transitions:
    """GAE once over the ``[T, B]`` batch from its collection-time values, then
    every field flattened to ``[1, T * B]`` (time-major order)."""
    advantages = returns.trajectory_gae(batch, gamma, lam)

    def flat(x):
        return x.reshape((1, x.shape[0] * x.shape[1], *x.shape[2:]))

    return Transitions(jax.tree.map(flat, batch), flat(advantages))


def episodic_update(
    config: OnPolicyConfig,
    state: TrainState,
    loss_fn: Callable[..., tuple[jax.Array, estimators.LossAux]],
    *,
    num_levels: int,
    group_size: int,
    horizon: int,
    num_epochs: int = 1,
    num_minibatches: int = 1,
) -> tuple[TrainState, UpdateMetrics]:
    """Roll out ``group_size`` episodes on each of ``num_levels`` fresh levels,
    then SGD on them (minibatches of whole groups).

    ``state.ref_params`` (when not None) is passed to the loss as ``ref_params``.
    """
    env, env_params = make_env(config)
    policy = make_policy(config)
    key, key_levels, key_rollout, key_sgd = jax.random.split(state.key, 4)
    level_keys = jax.random.split(key_levels, num_levels)
    batch = rollout.grouped_rollout(
        key_rollout,
        state.params,
        policy.apply,
        env,
        env_params,
        level_keys,
        group_size,
        horizon,
    )
    if state.ref_params is not None:
        loss_fn = functools.partial(loss_fn, ref_params=state.ref_params)
    return _learn(
        config,
        state._replace(key=key),
        loss_fn,
        batch,
        _episodic_stats(batch),
        key_sgd,
        num_epochs=num_epochs,
        num_minibatches=num_minibatches,
        block_size=group_size,
    )


# ---------------------------------------------------------------------- whole runs


def _chunk_metrics(
    config: OnPolicyConfig, state: TrainState, m: UpdateMetrics
) -> dict[str, jax.Array]:
    """A chunk's ``metrics.csv`` columns from its [n] updates' metrics: means of
    the loss terms, sums of the episode counts."""
    bad = ~(jnp.isfinite(m.loss) & jnp.isfinite(m.grad_norm))
    first_update = state.update - m.loss.shape[0] + 1
    totals = _Totals(
        count=jnp.asarray(m.loss.shape[0], jnp.int32),
        sums={name: ordered_sum(getattr(m, name)) for name in _LOSS_COLUMNS},
        episodes=jnp.sum(m.episodes),
        score_sum=jnp.sum(m.score_sum),
        score_max=jnp.max(m.score_max),
        first_bad=jnp.where(jnp.any(bad), first_update + jnp.argmax(bad), -1),
    )
    return _columns(config, state, totals)


class _Totals(NamedTuple):
    """A chunk's update metrics reduced so far (sums in update order)."""

    count: jax.Array  # int32 updates
    sums: dict[str, jax.Array]  # _LOSS_COLUMNS, summed one after another
    episodes: jax.Array
    score_sum: jax.Array
    score_max: jax.Array
    first_bad: jax.Array  # int32 first update with a non-finite loss, or -1


def _columns(
    config: OnPolicyConfig, state: TrainState, t: _Totals
) -> dict[str, jax.Array]:
    """``metrics.csv`` columns from a chunk's totals (``state``: after it)."""
    lr = jnp.asarray(config.lr, jnp.float32)
    if config.anneal_lr and config.LIVE_BUDGET:
        lr = lr * jnp.maximum(0.0, 1.0 - state.env_steps / config.total_env_steps)
    elif config.anneal_lr:
        lr = lr * jnp.maximum(0.0, 1.0 - state.update / config.num_updates)
    count = jnp.maximum(t.count, 1)
    return dict(
        update=state.update,
        live_env_steps=state.env_steps,
        lr=lr,
        **{name: t.sums[name] / count for name in _LOSS_COLUMNS},
        train_episodes=t.episodes,
        train_score_mean=t.score_sum / jnp.maximum(t.episodes, 1),
        train_score_max=t.score_max,
        first_nonfinite_update=t.first_bad,
    )


_LOSS_COLUMNS = (
    "loss",
    "pg_loss",
    "value_loss",
    "entropy",
    "kl",
    "approx_kl",
    "clip_fraction",
    "grad_norm",
)
COLUMNS = (
    "update",
    "live_env_steps",
    "lr",
    *_LOSS_COLUMNS,
    "train_episodes",
    "train_score_mean",
    "train_score_max",
)


def chunk_sizes(config: OnPolicyConfig) -> tuple[int, ...]:
    """Updates per chunk: ``updates_per_eval`` each, the remainder last.

    ``LIVE_BUDGET``: ``ceil(total_env_steps / eval_every_steps)`` chunks of
    ``eval_every_steps`` live env steps (:func:`steps_until`), the most a run
    can need; the driver skips those left once the budget is spent.
    """
    if config.LIVE_BUDGET:
        every = config.eval_every_steps
        return (every,) * -(-config.total_env_steps // every)
    per_eval = config.updates_per_eval
    sizes = (per_eval,) * (config.num_updates // per_eval)
    remainder = config.num_updates % per_eval
    return sizes + ((remainder,) if remainder else ())


def save_policy(directory: str | Path, config: Any, params: Any, **extra: Any) -> Path:
    """A ``rl_pg.checkpoint`` policy directory for ``config``'s policy and env.

    Records the reward scale (and discount) the critic learned with, so that the
    variance study can put V back into raw reward units.
    """
    critic = {
        k: getattr(config, k) for k in ("reward_scale", "gamma") if hasattr(config, k)
    }
    return checkpoint.save_policy(
        directory,
        params,
        policy=policy_spec(config),
        env_id=config.env_id,
        env_kwargs={
            "max_steps_in_episode": int(make_env(config)[1].max_steps_in_episode)
        },
        **critic,
        **extra,
    )


def describe(config: OnPolicyConfig) -> dict[str, Any]:
    """What ``config.json`` records besides the config."""
    if config.LIVE_BUDGET:
        return dict(
            policy=policy_spec(config),
            steps_per_update=config.steps_per_update,
            budget="live env steps",
        )
    return dict(
        policy=policy_spec(config),
        steps_per_update=config.steps_per_update,
        num_updates=config.num_updates,
        updates_per_eval=config.updates_per_eval,
    )


def steps_until(
    update: Callable[[Any, TrainState], tuple[TrainState, UpdateMetrics]],
    config: OnPolicyConfig,
    state: TrainState,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Updates until the live env steps reach the next multiple of
    ``eval_every_steps`` (at most ``total_env_steps``): one chunk of a
    ``LIVE_BUDGET`` run, in a ``lax.while_loop`` (jittable, vmappable). A run
    whose budget is spent does no update. Returns (state, chunk columns)."""
    every = config.eval_every_steps
    target = jnp.minimum((state.env_steps // every + 1) * every, config.total_env_steps)
    zero = jnp.zeros((), jnp.float32)
    totals = _Totals(
        count=jnp.asarray(0, jnp.int32),
        sums={name: zero for name in _LOSS_COLUMNS},
        episodes=jnp.asarray(0, jnp.int32),
        score_sum=zero,
        score_max=jnp.asarray(0, jnp.int32),
        first_bad=jnp.asarray(-1, jnp.int32),
    )

    def body(carry: tuple[TrainState, _Totals]) -> tuple[TrainState, _Totals]:
        state, t = carry
        state, m = update(config, state)
        bad = ~(jnp.isfinite(m.loss) & jnp.isfinite(m.grad_norm))
        return state, _Totals(
            count=t.count + 1,
            sums={k: t.sums[k] + getattr(m, k) for k in _LOSS_COLUMNS},
            episodes=t.episodes + m.episodes,
            score_sum=t.score_sum + m.score_sum,
            score_max=jnp.maximum(t.score_max, m.score_max),
            first_bad=jnp.where((t.first_bad < 0) & bad, state.update, t.first_bad),
        )

    state, totals = jax.lax.while_loop(
        lambda carry: carry[0].env_steps < target, body, (state, totals)
    )
    return state, _columns(config, state, totals)


def make_algorithm(
    name: str,
    config_cls: type,
    init: Callable[[Any, jax.Array], TrainState],
    update: Callable[[Any, TrainState], tuple[TrainState, UpdateMetrics]],
) -> base.Algorithm:
    """A policy-gradient algorithm from its ``init`` and one-batch ``update``:
    a chunk is ``n`` updates in one ``lax.scan``."""

    def steps(config, state, n):
        if config.LIVE_BUDGET:
            return steps_until(update, config, state)

        def body(state: TrainState, _):
            return update(config, state)

        state, metrics = jax.lax.scan(body, state, None, length=n)
        return state, _chunk_metrics(config, state, metrics)

    return base.Algorithm(
        name=name,
        config_cls=config_cls,
        init=init,
        steps=steps,
        chunk_sizes=chunk_sizes,
        params=lambda state: state.params,
        env_steps=lambda state: state.env_steps,
        make_env=make_env,
        act_fn=lambda config: greedy_act_fn(make_policy(config)),
        save=save_policy,
        describe=describe,
        columns=COLUMNS,
        load=load_agent,
        is_checkpoint=is_policy_checkpoint,
    )
