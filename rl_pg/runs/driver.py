"""The one run driver: run directories from any algorithm, one or many at once.

Runs are trained in a batch of ``N`` side by side, through one
``jit(vmap(rl_pg.algos.base.run_chunk))`` per chunk size: a single ``rl-pg train``
is a batch of one, ``rl-pg sweep`` a batch of every (hyperparameters, seed) cell.
Each chunk trains, validates, keeps the best policy and applies the stop rule
inside jit (:mod:`rl_pg.algos.base`), so the driver only writes down what the
pure ``train`` computes: after every chunk it appends a ``metrics.csv`` row per
run, moves the progress bar, checks that the loss stayed finite and writes the
resumable checkpoint (atomically); at the end it saves the best and last
policies, scores the best on held-out test levels (``eval.json``), plots the
learning curve and renders ``agent.gif``. ``resume=True`` continues an
interrupted run and ends with the same state as an uninterrupted one.
"""

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import evaluate as evaluation
from rl_pg import io
from rl_pg.algos import base, registry
from rl_pg.algos.config import hyperparameters
from rl_pg.runs import files, tensorboard


class NonFiniteLossError(ValueError):
    """Training produced a non-finite loss or gradient; the run stops there."""


class RunResult(NamedTuple):
    """What :func:`run` produced, in memory.

    Attributes:
      out_dir: the run directory.
      eval: contents of ``eval.json`` (None if the run stopped before the end).
      metrics: the rows of ``metrics.csv``.
      state: the algorithm's final state (``RunState.train``).
      best_params: the parameters with the best validation median.
      completed: False when ``max_evals`` stopped the run early (resumable).
    """

    out_dir: Path
    eval: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    state: Any
    best_params: Any
    completed: bool


class EvalEvent(NamedTuple):
    """What :func:`run` passes to its ``callback`` after each evaluation."""

    update: int  # the update count (evaluations, for the value-based agents)
    env_steps: int
    wall_clock_s: float  # since the run started, compilation included
    params: Any  # the current policy parameters
    val_median: float  # greedy median on the validation levels
    best_median: float


# ------------------------------------------------------------------ compiled pieces


def static_config(config: Any) -> Any:
    """``config`` with the fields jitted code never reads as static values (the
    seed, the sweepable fields: traced) set to the class defaults, so runs that
    differ only in them share one compilation."""
    default = type(config)()
    fields = {name: getattr(default, name) for name in type(config).SWEEPABLE}
    return dataclasses.replace(config, seed=0, **fields)


@functools.cache
def compiled_init(algorithm: base.Algorithm, config: Any):
    """``jit(vmap(init_run))``: ``(hparams [N], keys [N]) -> RunState [N]``."""

    def init(hparams, key):
        return base.init_run(algorithm, config, hparams, key)

    return jax.jit(jax.vmap(init))


@functools.cache
def compiled_chunk(algorithm: base.Algorithm, config: Any, n: int):
    """``jit(vmap(run_chunk))``: ``(hparams [N], RunState [N]) -> (RunState,
    ChunkOut) [N]``."""

    def chunk(hparams, run):
        return base.run_chunk(algorithm, config, hparams, run, n)

    return jax.jit(jax.vmap(chunk))


def stack(trees: Sequence[Any]) -> Any:
    """Leaves stacked along a new leading (run) axis."""
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def pick(tree: Any, i: int) -> Any:
    """Run ``i`` of a batched pytree."""
    return jax.tree.map(lambda x: x[i], tree)


def _item(value: Any) -> int | float | bool:
    return np.asarray(value).item()


# ------------------------------------------------------------------ one run's host side


@dataclasses.dataclass
class Member:
    """The host side of one run of a batch: its config, directory and rows.

    Attributes:
      algorithm: the algorithm.
      config: the run's own config (seed and hyperparameters included).
      out_dir: its run directory (created by the caller).
      keep_checkpoints: "best", or "all" (every evaluated policy).
      rows: ``metrics.csv`` rows so far.
      progress: host bookkeeping (times), checkpointed with the state.
      clock: ``time.perf_counter()`` when this call started, minus the time
        spent before (a resume).
      log: where rows are also logged (:class:`rl_pg.runs.tensorboard.
        TensorBoardLog`), or None.
    """

    algorithm: base.Algorithm
    config: Any
    out_dir: Path
    keep_checkpoints: str = "best"
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    progress: files.Progress = dataclasses.field(default_factory=files.Progress)
    clock: float = dataclasses.field(default_factory=time.perf_counter)
    log: Any = None  # a tensorboard.TensorBoardLog, or None

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def elapsed(self) -> float:
        return time.perf_counter() - self.clock

    def record(self, out: base.ChunkOut, run: base.RunState) -> dict[str, Any]:
        """Append the chunk's row, note a new best, keep the policy if asked."""
        metrics = {k: _item(v) for k, v in out.metrics.items()}
        env_steps = _item(out.env_steps)
        previous = self.rows[-1] if self.rows else None
        self.progress.wall_clock_s = self.elapsed()
        row = dict(
            env_steps=env_steps,
            wall_clock_s=round(self.progress.wall_clock_s, 3),
            **{k: metrics[k] for k in self.algorithm.columns},
            val_median=_item(out.val_median),
            val_mean=_item(out.val_mean),
            best_median=_item(out.best_median),
            best_env_steps=_item(out.best_env_steps),
        )
        if previous is None or (row["best_median"], row["best_env_steps"]) != (
            previous["best_median"],
            previous["best_env_steps"],
        ):
            self.progress.best_wall_clock_s = self.progress.wall_clock_s
            self.progress.best_update = metrics.get("update", _item(run.evals))
        self.rows.append(row)
        if self.keep_checkpoints == "all":
            self.save(
                self.ckpt_dir / files.EVALUATIONS_DIR / f"env_steps_{env_steps:012d}",
                self.algorithm.params(run.train),
                env_steps=env_steps,
                validation_median=row["val_median"],
            )
        files.write_metrics(
            self.out_dir / "metrics.csv",
            files.metrics_columns(self.algorithm),
            self.rows,
        )
        if self.log is not None:
            self.log.write(row)
        return row

    def save(self, path: Path, params: Any, **meta: Any) -> None:
        self.algorithm.save(
            path,
            self.config,
            jax.device_get(params),
            algo=self.algorithm.name,
            seed=self.config.seed,
            **meta,
        )

    def checkpoint(self, run: base.RunState) -> None:
        """The resumable state and the best policy so far."""
        files.save_train_state(self.ckpt_dir / files.STATE_FILE, run, self.progress)
        self.save(
            self.ckpt_dir / "best",
            run.best_params,
            update=self.progress.best_update,
            env_steps=_item(run.best_env_steps),
            validation_median=_item(run.best_median),
        )

    def keep(self, run: base.RunState) -> None:
        """The trained run's last and best policies and resumable state (seconds;
        :meth:`finish` does it first unless told it is done)."""
        self.save(
            self.ckpt_dir / "last",
            self.algorithm.params(run.train),
            update=self.rows[-1].get("update", _item(run.evals)) if self.rows else 0,
            env_steps=_item(self.algorithm.env_steps(run.train)),
        )
        self.checkpoint(run)

    def finish(
        self, run: base.RunState, gif: bool, kept: bool = False
    ) -> dict[str, Any]:
        """Last and best policies (unless ``kept``), ``eval.json``, the learning
        curve, the GIF."""
        algorithm, config = self.algorithm, self.config
        train_wall_clock = self.progress.wall_clock_s
        trained_steps = _item(algorithm.env_steps(run.train))
        if not kept:
            self.keep(run)
        eval_start = time.perf_counter()
        result = base.held_out(algorithm, config, run.best_params)
        data = evaluation.write_eval_json(
            self.out_dir / "eval.json",
            jax.device_get(result),
            wall_clock_s=train_wall_clock,
            env_steps=_item(run.best_env_steps),
            algo=algorithm.name,
            max_score=config.eval_max_score,
            held_out_seed=evaluation.HELD_OUT_SEED,
            best_update=self.progress.best_update,
            best_validation_median=_item(run.best_median),
            best_wall_clock_s=self.progress.best_wall_clock_s,
            trained_env_steps=trained_steps,
            eval_wall_clock_s=time.perf_counter() - eval_start,
        )
        if self.rows:
            files.plot_learning_curve(
                self.out_dir / "learning_curve.png",
                self.rows,
                f"{algorithm.name}, seed {config.seed}: held-out median "
                f"{data['median_score']:g}",
            )
        if gif:
            env, env_params = algorithm.make_env(config)
            evaluation.agent_gif(
                algorithm.act_fn(config),
                run.best_params,
                env,
                env_params,
                self.out_dir / "agent.gif",
                jax.random.PRNGKey(0),
            )
        if self.log is not None:
            self.log.close()
        return data


# ------------------------------------------------------------------ the batch loop


class Batch(NamedTuple):
    """Runs of one algorithm trained side by side under one static config.

    Attributes:
      algorithm: the algorithm.
      static: the shared static config (:func:`static_config`).
      hparams: each run's sweepable values, ``{name: [N]}``.
      members: the host side of each run.
    """

    algorithm: base.Algorithm
    static: Any
    hparams: dict[str, jax.Array]
    members: list[Member]

    @classmethod
    def of(cls, members: list[Member]) -> "Batch":
        configs = [m.config for m in members]
        statics = {static_config(c) for c in configs}
        if len(statics) != 1:
            raise ValueError(
                "runs trained together may differ only in seed and sweepable fields"
            )
        hparams = stack([hyperparameters(c) for c in configs])
        return cls(members[0].algorithm, statics.pop(), hparams, members)

    def init(self) -> base.RunState:
        keys = jnp.stack([jax.random.PRNGKey(m.config.seed) for m in self.members])
        return compiled_init(self.algorithm, self.static)(self.hparams, keys)


def _check_finite(out: base.ChunkOut, active: np.ndarray) -> None:
    first = np.asarray(out.metrics.get("first_nonfinite_update", -1))
    first = np.broadcast_to(first, active.shape)
    bad = np.flatnonzero(active & (first >= 0))
    if bad.size:
        update = int(first[bad[0]])
        error = NonFiniteLossError(
            f"non-finite loss at update {update} (loss or gradient "
            "norm inf or nan): training stopped; the run keeps its last "
            "checkpoint. Lower --reward-scale or --lr"
        )
        error.run, error.update = int(bad[0]), update  # which run of the batch
        raise error


def train_batch(
    batch: Batch,
    runs: base.RunState,
    *,
    max_evals: int | None = None,
    callback: Callable[[EvalEvent], bool | None] | None = None,
    progress: bool = False,
) -> tuple[base.RunState, bool]:
    """Train every run of ``batch`` from ``runs`` [N] to the end of the budget
    (or its stop), recording each chunk. Returns (runs, completed): False when
    ``max_evals`` chunks ended this call early."""
    from tqdm.auto import tqdm

    sizes = batch.algorithm.chunk_sizes(batch.static)
    first = int(np.max(np.asarray(runs.evals)))
    bar = tqdm(
        total=batch.static.total_env_steps,
        initial=int(np.min(np.asarray(batch.algorithm.env_steps(runs.train)))),
        unit="step",
        unit_scale=True,
        disable=not progress,
        desc=batch.algorithm.name,
    )
    try:  # the bar ends its line, also on an error or Ctrl-C
        return _train_chunks(batch, runs, sizes[first:], bar, max_evals, callback)
    finally:
        bar.close()


def _train_chunks(batch, runs, sizes, bar, max_evals, callback):
    """:func:`train_batch`'s loop over the chunks ``sizes`` left."""
    completed = True
    for done, n in enumerate(sizes):
        # A run stops at its stop rule, or once its budget is spent (an episodic
        # run may spend it before its last possible chunk: see loop.chunk_sizes).
        spent = np.asarray(batch.algorithm.env_steps(runs.train)) >= (
            batch.static.total_env_steps
        )
        active = ~np.asarray(runs.stopped) & ~spent
        if not active.any():
            break
        if max_evals is not None and done >= max_evals:
            completed = False
            break
        runs, out = compiled_chunk(batch.algorithm, batch.static, n)(
            batch.hparams, runs
        )
        out = jax.device_get(out)
        _check_finite(out, active)
        last = done + 1 == len(sizes)
        runs = _record(batch, runs, out, active, callback, last)
        steps = int(np.max(out.env_steps))
        # an episodic run's last batch overshoots its budget: the bar then ends at
        # steps/steps (tqdm would drop a total that n exceeds)
        bar.total = max(bar.total, steps)
        bar.update(max(0, steps - bar.n))
        bar.set_postfix(
            val=float(np.max(out.val_median)),
            best=float(np.max(out.best_median)),
            refresh=False,
        )
    return runs, completed


def _record(batch, runs, out, active, callback, last) -> base.RunState:
    """Rows, callbacks and checkpoints of one chunk, for its active runs."""
    for i, member in enumerate(batch.members):
        if not active[i]:
            continue
        run, out_i = pick(runs, i), pick(out, i)
        row = member.record(out_i, run)
        stop = bool(out_i.stopped)
        if callback is not None:
            event = EvalEvent(
                update=row.get("update", _item(run.evals)),
                env_steps=row["env_steps"],
                wall_clock_s=member.progress.wall_clock_s,
                params=batch.algorithm.params(run.train),
                val_median=row["val_median"],
                best_median=row["best_median"],
            )
            if callback(event) and not stop:
                stop = True
                runs = runs._replace(stopped=runs.stopped.at[i].set(True))
                run = pick(runs, i)
            member.progress.wall_clock_s = member.elapsed()
        evals = _item(run.evals)
        if last or stop or evals % member.config.checkpoint_every_evals == 0:
            member.checkpoint(run)
    return runs


# ------------------------------------------------------------------ one run


def _claim(out_dir: Path, run_config: dict[str, Any], resume: bool) -> str:
    """Prepare ``out_dir``; returns "new", "continue" or "finished"."""
    ckpt_dir = out_dir / "checkpoints"
    if resume and not (out_dir / "config.json").is_file():
        if out_dir.is_dir() and [p.name for p in out_dir.iterdir()] == [io.CLAIM_FILE]:
            resume = False  # killed before it wrote anything: start it here
            (out_dir / io.CLAIM_FILE).unlink()
        else:
            raise ValueError(
                f"Nothing to resume: {out_dir / 'config.json'} does not exist"
            )
    if resume:
        saved = json.loads((out_dir / "config.json").read_text())
        saved.pop("versions", None)
        if saved != json.loads(json.dumps(run_config)):
            raise ValueError(
                f"--resume: the config differs from the one in {out_dir}/config.json; "
                "resume with the same options (or none)"
            )
        if (out_dir / "eval.json").is_file():
            return "finished"
        if (ckpt_dir / files.STATE_FILE).is_file():
            return "continue"
        (out_dir / "metrics.csv").unlink(missing_ok=True)  # killed before a checkpoint
        ckpt_dir.mkdir(exist_ok=True)
        return "new"
    try:
        io.new_out_dir(out_dir)
    except FileExistsError as error:
        if (out_dir / "config.json").is_file():
            raise FileExistsError(
                f"{error} (or continue the run in it with --resume)"
            ) from None
        raise
    io.write_config(out_dir, run_config)
    ckpt_dir.mkdir()
    return "new"


def _restore(member: "Member", runs: base.RunState) -> base.RunState:
    """A run's last checkpoint as a batch of one; its metrics rows and clock into
    ``member``."""
    state, member.progress = files.load_train_state(
        member.ckpt_dir / files.STATE_FILE, pick(runs, 0)
    )
    member.rows = files.read_metrics(
        member.out_dir / "metrics.csv", _item(member.algorithm.env_steps(state.train))
    )
    member.clock -= member.progress.wall_clock_s
    return stack([state])


def run(
    config: Any,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    max_evals: int | None = None,
    gif: bool = True,
    callback: Callable[[EvalEvent], bool | None] | None = None,
    keep_checkpoints: str = "best",
    log: str | None = None,
) -> RunResult:
    """Train ``config``'s algorithm and write a run directory.

    Args:
      config: any registered algorithm's config (``rl_pg.algos.registry``).
      out_dir: a new (or empty) directory; with ``resume``, an interrupted run's.
      resume: continue from ``out_dir/checkpoints/train_state.msgpack``; the
        config must equal the one in ``out_dir/config.json``. A finished run
        (``eval.json`` written, also after an early stop) is left as it is and
        returned; a run killed before its first checkpoint starts again in place.
      progress: show a tqdm bar with the validation score.
      max_evals: stop after this many evaluations in this call (the run stays
        resumable; no ``eval.json``). For time-sliced jobs and tests.
      gif: write ``agent.gif`` at the end.
      callback: called after every evaluation with an :class:`EvalEvent`; a
        true return value ends training there (the run completes as usual).
      keep_checkpoints: ``"best"`` (and ``last``), or ``"all"``: also the policy
        of every evaluation, in ``checkpoints/evaluations/env_steps_<N>/`` (for
        ``rl-pg variance --run``: estimator quality along training).
      log: ``"tensorboard"``: also log every metrics row and the
        hyperparameters to ``out_dir/tensorboard/`` (:mod:`rl_pg.runs.tensorboard`).

    Returns:
      RunResult.

    Raises:
      FileExistsError: ``out_dir`` is not empty and ``resume`` is False.
      ValueError: nothing to resume, or a config that differs from the run's.
      NonFiniteLossError: a loss or gradient norm became inf or NaN (the update
        is named; the last checkpoint is kept).
    """
    algorithm = registry.of(config)
    if keep_checkpoints not in files.KEEP_CHECKPOINTS:
        raise ValueError(
            f"keep_checkpoints must be one of {files.KEEP_CHECKPOINTS}, "
            f"got {keep_checkpoints!r}"
        )
    tensorboard.check_log(log)
    out_dir = Path(out_dir)
    mode = _claim(out_dir, files.run_config(algorithm, config), resume)
    member = Member(algorithm, config, out_dir, keep_checkpoints)
    if log is not None and mode != "finished":
        member.log = tensorboard.TensorBoardLog(
            out_dir, files.run_config(algorithm, config)
        )
    batch = Batch.of([member])
    runs = batch.init()
    if mode != "new":
        runs = _restore(member, runs)
    if mode == "finished":
        data = json.loads((out_dir / "eval.json").read_text())
        state = pick(runs, 0)
        return RunResult(
            out_dir, data, member.rows, state.train, state.best_params, True
        )
    if mode == "continue":
        files.write_metrics(
            out_dir / "metrics.csv", files.metrics_columns(algorithm), member.rows
        )
    runs, completed = train_batch(
        batch, runs, max_evals=max_evals, callback=callback, progress=progress
    )
    final = pick(runs, 0)
    if not completed:
        member.checkpoint(final)
        return RunResult(
            out_dir, None, member.rows, final.train, final.best_params, False
        )
    data = member.finish(final, gif)
    return RunResult(out_dir, data, member.rows, final.train, final.best_params, True)
