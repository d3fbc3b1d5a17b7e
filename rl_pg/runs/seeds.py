"""Several seeds of one config, side by side (one ``jit(vmap)``) or one by one.

For experiments that compare algorithms and time them (``experiments/
compare_algorithms.py``); no run directories. The chunks are the run driver's
(:func:`rl_pg.runs.driver.compiled_chunk`), so each seed's curve and best policy
are those ``rl-pg train`` reports for it.
"""

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import evaluate as evaluation
from rl_pg.algos import base, registry
from rl_pg.algos.config import hyperparameters
from rl_pg.runs.driver import compiled_chunk, compiled_init, pick, stack, static_config


class SeedsResult(NamedTuple):
    """What :func:`train_seeds` measured.

    Attributes:
      curves: per seed, rows ``{update, env_steps, train_time_s, train_score_mean,
        val_median, best_median}`` at every evaluation (no ``val_*`` without
        ``evaluate``).
      final: per seed, the held-out summary (``rl_pg.evaluate.summarize``) of its
        best parameters (empty when ``evaluate=False``).
      best_params: per seed, the parameters with the best validation median (the
        last ones when ``evaluate=False``).
      train_time_s: training wall-clock, compilation and validation included,
        the final held-out evaluation not.
      compile_time_s: time of the first chunk beyond a later chunk's (estimate).
      env_steps: env steps per seed.
      total_time_s: everything, the held-out evaluations included.
    """

    curves: list[list[dict[str, Any]]]
    final: list[dict[str, Any]]
    best_params: list[Any]
    train_time_s: float
    compile_time_s: float
    env_steps: int
    total_time_s: float


def _curve_row(out: Any, chunk: int, train_time: float, evaluate: bool) -> dict:
    row = dict(
        update=int(out.metrics["update"]) if "update" in out.metrics else chunk + 1,
        env_steps=int(out.env_steps),
        train_time_s=train_time,
        train_score_mean=float(out.metrics["train_score_mean"]),
    )
    if evaluate:
        row.update(val_median=float(out.val_median), best_median=float(out.best_median))
    return row


def _reported(algorithm: base.Algorithm, config: Any, finals: list, evaluate: bool):
    """Each run's reported parameters (the best, or the last without ``evaluate``)
    and held-out summary (none without ``evaluate``)."""
    if not evaluate:
        return [algorithm.params(run.train) for run in finals], []
    best = [run.best_params for run in finals]
    final = [
        evaluation.summarize(base.held_out(algorithm, config, params))
        for params in best
    ]
    return best, final


def _compile_time(chunk_times: list[float], sizes: list[int]) -> float:
    """The first chunk's time beyond the median later chunk of the same size."""
    steady = [t for t, n in zip(chunk_times, sizes, strict=True) if n == sizes[0]]
    return chunk_times[0] - (np.median(steady[1:]) if len(steady) > 1 else 0.0)


def train_seeds(
    config: Any,
    seeds: Sequence[int],
    *,
    vmap: bool = True,
    evaluate: bool = True,
    progress: bool = False,
) -> SeedsResult:
    """Train one run per seed under the same config, side by side or one by one.

    Any registered algorithm's config. With ``vmap`` the seeds train in one
    ``jit(vmap(chunk))`` (one compilation); otherwise one after another through
    the same jitted chunk (a batch of one). Every chunk validates and keeps the
    best policy inside jit; the stop rule applies as in ``rl-pg train`` (a
    stopped seed stops changing). ``evaluate=False`` skips the held-out
    evaluation and reports the last parameters.
    """
    from tqdm.auto import tqdm

    algorithm = registry.of(config)
    configs = [dataclasses.replace(config, seed=int(s)) for s in seeds]
    static = static_config(config)
    sizes = algorithm.chunk_sizes(static)
    groups = [list(range(len(seeds)))] if vmap else [[i] for i in range(len(seeds))]
    curves: list[list[dict[str, Any]]] = [[] for _ in seeds]
    finals: list[base.RunState | None] = [None for _ in seeds]
    train_time, chunk_times = 0.0, []
    start = time.perf_counter()
    bar = tqdm(
        total=len(groups) * len(sizes), disable=not progress, desc=algorithm.name
    )
    for group in groups:
        hparams = stack([hyperparameters(configs[i]) for i in group])
        keys = jnp.stack([jax.random.PRNGKey(configs[i].seed) for i in group])
        tic = time.perf_counter()
        runs = jax.block_until_ready(compiled_init(algorithm, static)(hparams, keys))
        train_time += time.perf_counter() - tic
        for chunk, n in enumerate(sizes):
            tic = time.perf_counter()
            runs, out = compiled_chunk(algorithm, static, n)(hparams, runs)
            jax.block_until_ready(runs)
            chunk_times.append(time.perf_counter() - tic)
            train_time += chunk_times[-1]
            out = jax.device_get(out)
            for j, i in enumerate(group):
                curves[i].append(_curve_row(pick(out, j), chunk, train_time, evaluate))
            bar.update(1)
        for j, i in enumerate(group):
            finals[i] = pick(runs, j)
    bar.close()
    best, final = _reported(algorithm, config, finals, evaluate)
    compile_time = _compile_time(chunk_times, sizes * len(groups))
    return SeedsResult(
        curves=curves,
        final=final,
        best_params=best,
        train_time_s=train_time,
        compile_time_s=float(max(0.0, compile_time)),
        env_steps=int(curves[0][-1]["env_steps"]),
        total_time_s=time.perf_counter() - start,
    )
