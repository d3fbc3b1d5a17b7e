"""The one algorithm contract, and the pure, jittable run built on it.

Every algorithm (REINFORCE family, A2C, PPO, GRPO, tabular Q-learning, DQN) is an
:class:`Algorithm`: a frozen, validated config class (a ``RunConfig``) plus pure
functions. ``steps(config, state, n)`` trains ``n`` units (updates, or vector
steps for the value-based agents) and returns the chunk's metrics already
reduced to scalars. On top of it, this module writes once what every run does
after a chunk, inside jit:

* validation: the greedy policy on ``eval_episodes`` validation levels
  (:data:`rl_pg.evaluate.VALIDATION_SEED`);
* keep-best: the parameters with the highest validation median (ties: mean);
* the stop rule: once a validation median reaches ``stop_at_score``, the same
  policy must reach it on ``stop_confirm_fraction`` of ``stop_confirm_episodes``
  fresh levels (:data:`rl_pg.evaluate.CONFIRMATION_SEED`); with 0 confirmation
  episodes, the best median reaching the target stops. A stopped run stops
  changing: later chunks leave its :class:`RunState` as it is.

:func:`make_train` turns an algorithm into ``train(config, key, hparams=None) ->
(RunState, ChunkOut [chunks])``, so ``jax.jit(jax.vmap(train, in_axes=(None, 0,
0)))(config, keys, hparams)`` trains a grid of hyperparameters x seeds in one
compilation, and returns bit for bit what the run driver
(:mod:`rl_pg.runs.driver`), which calls :func:`run_chunk` chunk by chunk, reports
for each run: on the CPU (tested), a run does not depend on the runs beside it,
except that XLA compiles a batch of one as another program than a batch of two or
more (equal up to float rounding); an accelerator may pick kernels per shape.

Hyperparameters. The config is static; its ``SWEEPABLE`` float fields are passed
as ``hparams`` (``{name: float32 scalar}``, :func:`rl_pg.algos.config.hyperparameters`)
and substituted as traced values (:func:`rl_pg.algos.config.with_hyperparameters`).
"""

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rl_pg import evaluate as evaluation
from rl_pg.algos.config import RunConfig, hyperparameters, with_hyperparameters

Params = Any
Metrics = dict[str, jax.Array]


class Algorithm(NamedTuple):
    """An algorithm as a bundle of pure functions (for the driver and ``train``).

    Attributes:
      name: the ``--algo`` name.
      config_cls: its frozen config dataclass (a ``RunConfig``).
      init: ``init(config, key) -> state``.
      steps: ``steps(config, state, n) -> (state, metrics)``: ``n`` units of
        training; ``metrics`` maps each of ``columns`` to a scalar (and may hold
        ``first_nonfinite_update``: -1, or the first update whose loss is not
        finite).
      chunk_sizes: ``chunk_sizes(config) -> (n, n, ..., remainder)``: the units
        of each chunk; one validation after each.
      params: ``params(state) -> params``: what is evaluated and saved.
      env_steps: ``env_steps(state) -> [] int32``.
      make_env: ``make_env(config) -> (env, env_params)`` for evaluation.
      act_fn: ``act_fn(config) -> act_fn(params, obs, env_state, key)``: greedy
        actions (``rl_pg.evaluate.evaluate``, GIFs); one object per config.
      save: ``save(path, config, params, **meta) -> Path``: a checkpoint of
        ``params`` at ``path`` (a policy directory, or ``path.npz``).
      describe: ``describe(config) -> dict``: what ``config.json`` records
        besides the config (network spec, derived sizes).
      columns: the metric names ``steps`` returns, in ``metrics.csv`` order.
      load: ``load(path, greedy=True) -> Agent``: what ``save`` wrote at
        ``path`` (the path ``save`` returned), ready to act; ``greedy=False``
        samples actions (a ValueError where the policy has no sampling form).
      is_checkpoint: ``is_checkpoint(path) -> bool``: whether ``path`` has the
        form of what ``save`` writes (a policy directory, or a ``.npz`` file),
        so that ``rl_pg.algos.registry.load`` finds the reader of any checkpoint.
    """

    name: str
    config_cls: type
    init: Callable[[Any, jax.Array], Any]
    steps: Callable[[Any, Any, int], tuple[Any, Metrics]]
    chunk_sizes: Callable[[Any], tuple[int, ...]]
    params: Callable[[Any], Params]
    env_steps: Callable[[Any], jax.Array]
    make_env: Callable[[Any], tuple[Any, Any]]
    act_fn: Callable[[Any], Callable[..., jax.Array]]
    save: Callable[..., Path]
    describe: Callable[[Any], dict[str, Any]]
    columns: tuple[str, ...]
    load: Callable[..., "Agent"]
    is_checkpoint: Callable[[Path], bool]


class Agent(NamedTuple):
    """A saved policy, ready to act: what :attr:`Algorithm.load` returns.

    Attributes:
      act_fn: ``act_fn(params, obs, env_state, key) -> action`` for one env
        (``rl_pg.evaluate.evaluate``, GIFs).
      params: its parameters (a pytree, or a Q-table).
      env, env_params: the environment it acts in.
      meta: what the checkpoint records besides the parameters (``env_steps``...).
    """

    act_fn: Callable[..., jax.Array]
    params: Params
    env: Any
    env_params: Any
    meta: dict[str, Any]


class RunState(NamedTuple):
    """A run between chunks: the algorithm's state plus keep-best and the stop.

    Attributes:
      train: the algorithm's own state (params, optimizer, envs, buffers, ...).
      best_params: the parameters with the best validation median so far.
      best_median: [] float32 their validation median (-1 before any).
      best_mean: [] float32 their validation mean (the tie-breaker).
      best_env_steps: [] int32 env steps when they were taken.
      evals: [] int32 validations done.
      stopped: [] bool the stop rule fired; the run no longer changes.
    """

    train: Any
    best_params: Params
    best_median: jax.Array
    best_mean: jax.Array
    best_env_steps: jax.Array
    evals: jax.Array
    stopped: jax.Array


class ChunkOut(NamedTuple):
    """What one chunk reports (every field [], or stacked [chunks] by ``train``).

    ``metrics`` holds the algorithm's own columns (:attr:`Algorithm.columns`).
    """

    env_steps: jax.Array  # int32 after the chunk
    val_median: jax.Array  # float32 validation median of the chunk's policy
    val_mean: jax.Array  # float32
    best_median: jax.Array  # float32 after keep-best and the stop rule
    best_env_steps: jax.Array  # int32
    stopped: jax.Array  # bool: stopped (in this or an earlier chunk)
    metrics: Metrics


def init_run(
    algorithm: Algorithm, config: RunConfig, hparams: dict, key: jax.Array
) -> RunState:
    """The algorithm's fresh state, nothing evaluated yet."""
    state = algorithm.init(with_hyperparameters(config, hparams), key)
    return RunState(
        train=state,
        best_params=algorithm.params(state),
        best_median=jnp.asarray(-1.0, jnp.float32),
        best_mean=jnp.asarray(-1.0, jnp.float32),
        best_env_steps=jnp.asarray(0, jnp.int32),
        evals=jnp.asarray(0, jnp.int32),
        stopped=jnp.asarray(False),
    )


def _greedy_scores(
    algorithm: Algorithm,
    config: RunConfig,
    params: Params,
    keys: jax.Array,
    max_score: jax.Array | int | None = None,
    **kw,
) -> evaluation.EvalResult:
    """The greedy policy's scores on the levels of ``keys`` (capped at
    ``max_score``, default ``eval_max_score``)."""
    env, env_params = algorithm.make_env(config)
    return evaluation.evaluate(
        algorithm.act_fn(config),
        params,
        env,
        env_params,
        jax.random.PRNGKey(0),  # greedy: the key is unused
        max_score=config.eval_max_score if max_score is None else max_score,
        reset_keys=keys,
        **kw,
    )


def validate(
    algorithm: Algorithm, config: RunConfig, params: Params
) -> evaluation.EvalResult:
    """Greedy scores on the validation levels (median exact; see ``median_only``)."""
    keys = evaluation.held_out_keys(config.eval_episodes, evaluation.VALIDATION_SEED)
    return _greedy_scores(algorithm, config, params, keys, median_only=True)


def held_out(
    algorithm: Algorithm, config: RunConfig, params: Params
) -> evaluation.EvalResult:
    """Greedy scores on ``final_eval_episodes`` held-out test levels (``eval.json``)."""
    keys = evaluation.held_out_keys(
        config.final_eval_episodes, evaluation.HELD_OUT_SEED
    )
    return _greedy_scores(algorithm, config, params, keys)


def confirmed(
    algorithm: Algorithm, config: RunConfig, params: Params, val_median: jax.Array
) -> jax.Array:
    """Whether ``params`` reach ``stop_at_score`` on at least
    ``stop_confirm_fraction`` of ``stop_confirm_episodes`` fresh validation levels,
    checked only where ``val_median`` reached it (elsewhere the evaluation stops
    at the first pipe, so a vmapped run pays little for it). Jittable."""
    target = config.stop_at_score
    check = val_median >= target
    keys = evaluation.held_out_keys(
        config.stop_confirm_episodes, evaluation.CONFIRMATION_SEED
    )
    max_score = jnp.where(check, config.eval_max_score, 1).astype(jnp.int32)
    result = _greedy_scores(algorithm, config, params, keys, max_score)
    reached = jnp.mean((result.scores >= target).astype(jnp.float32))
    return check & (reached >= config.stop_confirm_fraction)


def stop_rule(
    algorithm: Algorithm,
    config: RunConfig,
    params: Params,
    val_median: jax.Array,
    best_median: jax.Array,
) -> jax.Array:
    """[] bool: stop the run here (see the module docstring). Jittable."""
    if config.stop_at_score is None:
        return jnp.asarray(False)
    if not config.stop_confirm_episodes:
        return best_median >= config.stop_at_score
    return confirmed(algorithm, config, params, val_median)


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def keep_best(
    run: RunState, params: Params, env_steps: jax.Array, median, mean, force=False
) -> RunState:
    """``run`` with ``params`` as the best if their median is higher (ties: the
    mean), or if ``force``."""
    better = (
        (median > run.best_median)
        | ((median == run.best_median) & (mean > run.best_mean))
        | force
    )
    return run._replace(
        best_params=_select(better, params, run.best_params),
        best_median=jnp.where(better, median, run.best_median),
        best_mean=jnp.where(better, mean, run.best_mean),
        best_env_steps=jnp.where(better, env_steps, run.best_env_steps),
    )


def run_chunk(
    algorithm: Algorithm, config: RunConfig, hparams: dict, run: RunState, n: int
) -> tuple[RunState, ChunkOut]:
    """``n`` units of training, validation, keep-best and the stop rule; pure.

    A run that had stopped comes back unchanged (its metrics are those of the
    chunk it would have trained, and are not reported by the driver).
    """
    state, metrics = algorithm.steps(
        with_hyperparameters(config, hparams), run.train, n
    )
    params, env_steps = algorithm.params(state), algorithm.env_steps(state)
    scores = validate(algorithm, config, params).scores.astype(jnp.float32)
    median, mean = jnp.median(scores), jnp.mean(scores)
    new = keep_best(run._replace(train=state), params, env_steps, median, mean)
    stop = stop_rule(algorithm, config, params, median, new.best_median)
    if config.stop_at_score is not None and config.stop_confirm_episodes:
        # The confirmed policy is the one reported.
        new = keep_best(new, params, env_steps, median, mean, force=stop)
    new = new._replace(evals=run.evals + 1, stopped=stop)
    new = _select(run.stopped, run, new)
    out = ChunkOut(
        env_steps=algorithm.env_steps(new.train),
        val_median=median,
        val_mean=mean,
        best_median=new.best_median,
        best_env_steps=new.best_env_steps,
        stopped=new.stopped,
        metrics=metrics,
    )
    return new, out


def train(
    algorithm: Algorithm, config: RunConfig, key: jax.Array, hparams: dict | None = None
) -> tuple[RunState, ChunkOut]:
    """The whole run as one pure function: every chunk of
    ``algorithm.chunk_sizes(config)`` (equal ones in a ``lax.scan``).

    Args:
      algorithm: the algorithm.
      config: its config (static).
      key: the run's key (the driver uses ``PRNGKey(config.seed)``).
      hparams: the sweepable fields' values (default: the config's).

    Returns:
      The final RunState (``best_params`` is the reported policy) and ChunkOut
      stacked over chunks [C].
    """
    if hparams is None:
        hparams = hyperparameters(config)
    run = init_run(algorithm, config, hparams, key)
    outs = []
    for n, count in _runs_of(algorithm.chunk_sizes(config)):
        run, out = jax.lax.scan(
            lambda r, _, n=n: run_chunk(algorithm, config, hparams, r, n),
            run,
            None,
            length=count,
        )
        outs.append(out)
    return run, jax.tree.map(lambda *x: jnp.concatenate(x), *outs)


def _runs_of(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(8, 8, 8, 3)`` -> ``[(8, 3), (3, 1)]``: equal neighbours grouped."""
    groups: list[tuple[int, int]] = []
    for n in sizes:
        if groups and groups[-1][0] == n:
            groups[-1] = (n, groups[-1][1] + 1)
        else:
            groups.append((n, 1))
    return groups


def make_train(algorithm: Algorithm) -> Callable[..., tuple[RunState, ChunkOut]]:
    """``train(config, key, hparams=None)`` for one algorithm (see :func:`train`)."""
    fn = functools.partial(train, algorithm)
    fn.__doc__ = f"The whole {algorithm.name} run; see rl_pg.algos.base.train."
    return fn
