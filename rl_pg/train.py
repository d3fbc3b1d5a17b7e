"""The training driver: a run directory from an algorithm and a config.

``run(config, out_dir)`` trains in jitted chunks of ``config.updates_per_eval``
updates (one ``lax.scan`` each); between chunks it scores the greedy policy on
validation levels (:data:`rl_pg.evaluate.VALIDATION_SEED`), keeps the best
parameters, writes a ``metrics.csv`` row, shows the score on a tqdm bar and
checkpoints the whole train state atomically, so that ``resume=True`` continues an
interrupted run and ends with the same parameters as an uninterrupted one. At the
end the best policy is scored on held-out test levels (``eval.json``).

A run directory holds::

    config.json                    algo, config, policy spec, versions
    metrics.csv                    one row per evaluation
    checkpoints/train_state.msgpack  the resumable state (flax.serialization)
    checkpoints/best/              best policy so far (rl_pg.checkpoint), kept
                                   up to date at every resumable checkpoint
    checkpoints/last/              final policy
    eval.json                      held-out scores (the public contract)
    learning_curve.png, agent.gif

CLI-facing entry points: :func:`train_main` (``rl-pg train``), :func:`eval_main`
(``rl-pg eval``), :func:`overrides_from_argv` (``--lr 1e-3 --num-envs 64`` ->
overrides). :func:`train_seeds` trains several seeds side by side (``vmap``) for
the experiments.
"""

import csv
import dataclasses
import functools
import json
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

import rl_pg
from rl_pg import checkpoint, io
from rl_pg import evaluate as evaluation
from rl_pg.algos import a2c, grpo, loop, ppo, reinforce

ALGORITHMS: dict[str, loop.Algorithm] = {
    a.name: a
    for a in (ppo.ALGORITHM, a2c.ALGORITHM, reinforce.ALGORITHM, grpo.ALGORITHM)
}
ALGO_NAMES = (*ALGORITHMS, "qlearning", "dqn")

STATE_FILE = "train_state.msgpack"
EVALUATIONS_DIR = "evaluations"  # checkpoints/evaluations/: every evaluated policy
KEEP_CHECKPOINTS = ("best", "all")
METRICS_COLUMNS = (
    "update",
    "env_steps",
    "live_env_steps",
    "wall_clock_s",
    "lr",
    "loss",
    "pg_loss",
    "value_loss",
    "entropy",
    "kl",
    "approx_kl",
    "clip_fraction",
    "grad_norm",
    "train_episodes",
    "train_score_mean",
    "train_score_max",
    "val_median",
    "val_mean",
    "best_median",
    "best_env_steps",
)
INT_COLUMNS = frozenset(
    (
        "update",
        "env_steps",
        "live_env_steps",
        "train_episodes",
        "train_score_max",
        "best_env_steps",
    )
)


class NonFiniteLossError(ValueError):
    """Training produced a non-finite loss or gradient; the run stops there."""


# ------------------------------------------------------------------------- configs


def config_class(algo: str) -> type:
    """The config dataclass of ``algo`` (one of :data:`ALGO_NAMES`)."""
    if algo == "qlearning":
        from rl_pg.algos.qlearning import QLearningConfig

        return QLearningConfig
    if algo == "dqn":
        from rl_pg.algos.dqn import DQNConfig

        return DQNConfig
    if algo not in ALGORITHMS:
        raise ValueError(f"Unknown algo {algo!r}; choose one of {list(ALGO_NAMES)}")
    return ALGORITHMS[algo].config_cls


def algorithm_of(config: Any) -> loop.Algorithm:
    """The algorithm whose config class ``config`` is."""
    for algorithm in ALGORITHMS.values():
        if type(config) is algorithm.config_cls:
            return algorithm
    raise TypeError(f"No policy-gradient algorithm takes a {type(config).__name__}")


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_value(text: str, hint: Any, name: str) -> Any:
    """Parse ``text`` as type ``hint`` (int, float, bool, str, tuples, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_value(text, inner, name)
    if origin is tuple:
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(p, args[0], name) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"--{name} takes {len(args)} comma-separated values")
        return tuple(_parse_value(p, a, name) for p, a in zip(parts, args, strict=True))
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"--{name} takes true or false, got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            value = float(text)  # "1e6"
            if not value.is_integer():
                raise ValueError(f"--{name} takes an int, got {text!r}") from None
            return int(value)
    if hint is float:
        return float(text)
    if hint is str:
        return text
    raise ValueError(f"--{name}: cannot parse values of type {hint}")


def parse_overrides(config_cls: type, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Typed config fields from ``{"num-envs": "64", "lr": "1e-3", ...}``.

    Keys may use dashes or underscores; string values are parsed to the field's
    type (ints accept ``1e6``, bools ``true/false``, tuples ``64,64``, optional
    fields ``none``); non-string values are passed through.

    Raises:
      ValueError: for an unknown field or an unparsable value.
    """
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    parsed = {}
    for key, value in overrides.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in fields:
            known = ", ".join("--" + f.replace("_", "-") for f in sorted(fields))
            raise ValueError(
                f"Unknown option --{key.lstrip('-')} for {config_cls.__name__}; "
                f"known options: {known}"
            )
        if isinstance(value, str):
            try:
                value = _parse_value(value, hints[name], name)
            except ValueError as error:
                raise ValueError(
                    f"--{name.replace('_', '-')}: cannot parse {value!r}: {error}"
                ) from None
        parsed[name] = value
    return parsed


def make_config(algo: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """``algo``'s config with the defaults replaced by ``overrides`` (validated)."""
    config_cls = config_class(algo)
    return config_cls(**parse_overrides(config_cls, overrides or {}))


def config_help(algo: str) -> str:
    """One line per config field of ``algo``: ``--name TYPE (default: value)``."""
    config_cls = config_class(algo)
    hints = typing.get_type_hints(config_cls)
    lines = []
    for field in dataclasses.fields(config_cls):
        hint = hints[field.name]
        hint = hint.__name__ if isinstance(hint, type) else str(hint)
        option = "--" + field.name.replace("_", "-")
        lines.append(f"  {option} {hint} (default: {field.default!r})")
    return "\n".join(lines)


def overrides_from_argv(argv: Sequence[str]) -> dict[str, str]:
    """``["--lr", "1e-3", "--anneal-lr", "--hidden=32,32"]`` -> overrides.

    A flag followed by another flag (or by nothing) means ``true``.

    Raises:
      ValueError: for a value that does not follow a ``--name``.
    """
    out: dict[str, str] = {}
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) < 3:
            raise ValueError(f"Expected an option --name, got {token!r}")
        if "=" in token:
            name, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            name, value = token[2:], argv[i + 1]
            i += 2
        else:
            name, value = token[2:], "true"
            i += 1
        out[name] = value
    return out


# ------------------------------------------------------------------- jitted pieces


@functools.cache
def _jit_init(algorithm: loop.Algorithm, vmapped: bool = False):
    fn = algorithm.init
    if vmapped:
        fn = jax.vmap(fn, in_axes=(None, 0))
    return jax.jit(fn, static_argnums=0)


@functools.cache
def _jit_chunk(algorithm: loop.Algorithm, num_updates: int, vmapped: bool = False):
    def chunk(config, state):
        return loop.run_updates(algorithm, config, state, num_updates)

    if vmapped:
        chunk = jax.vmap(chunk, in_axes=(None, 0))
    return jax.jit(chunk, static_argnums=0)


def _validate(config: Any, params: Any, *, seed: int, num_episodes: int) -> Any:
    """Greedy scores on validation (``seed=VALIDATION_SEED``) or test levels."""
    env, env_params = loop.make_env(config)
    act_fn = loop.greedy_act_fn(loop.make_policy(config))
    return evaluation.evaluate(
        act_fn,
        params,
        env,
        env_params,
        jax.random.PRNGKey(0),
        max_score=config.eval_max_score,
        reset_keys=evaluation.held_out_keys(num_episodes, seed),
        median_only=seed == evaluation.VALIDATION_SEED,
    )


def _stop_rule(config: Any, params: Any, val_median: float, best: float) -> bool:
    """Stop once a validation median reaches ``stop_at_score`` and, unless
    ``stop_confirm_episodes`` is 0, the same policy reaches it on at least
    ``stop_confirm_fraction`` of that many fresh validation levels (one lucky
    validation round does not stop the run)."""
    target = config.stop_at_score
    if target is None:
        return False
    if not config.stop_confirm_episodes:
        return best >= target
    if val_median < target:
        return False
    env, env_params = loop.make_env(config)
    result = evaluation.evaluate(
        loop.greedy_act_fn(loop.make_policy(config)),
        params,
        env,
        env_params,
        jax.random.PRNGKey(0),
        max_score=config.eval_max_score,
        reset_keys=evaluation.held_out_keys(
            config.stop_confirm_episodes, evaluation.CONFIRMATION_SEED
        ),
    )
    reached = np.mean(np.asarray(result.scores) >= target)
    return bool(reached >= config.stop_confirm_fraction)


def _current_lr(config: Any, update: int) -> float:
    if not config.anneal_lr:
        return float(config.lr)
    return float(config.lr) * max(0.0, 1.0 - update / config.num_updates)


def _chunk_row(metrics: loop.UpdateMetrics) -> dict[str, float]:
    """Means of the loss terms, sums of the episode counts over a chunk [n]."""
    m = jax.device_get(metrics)
    episodes = int(np.sum(m.episodes))
    row = {
        name: float(np.mean(getattr(m, name)))
        for name in (
            "loss",
            "pg_loss",
            "value_loss",
            "entropy",
            "kl",
            "approx_kl",
            "clip_fraction",
            "grad_norm",
        )
    }
    row.update(
        train_episodes=episodes,
        train_score_mean=float(np.sum(m.score_sum)) / max(episodes, 1),
        train_score_max=int(np.max(m.score_max)),
        live_steps=int(np.sum(m.live_steps, dtype=np.int64)),
    )
    return row


# ------------------------------------------------------------------------ run files


class RunResult(NamedTuple):
    """What :func:`run` produced, in memory.

    Attributes:
      out_dir: the run directory.
      eval: contents of ``eval.json`` (None if the run stopped before the end).
      metrics: the rows of ``metrics.csv``.
      state: the final TrainState.
      best_params: the parameters with the best validation median.
      completed: False when ``max_evals`` stopped the run early (resumable).
    """

    out_dir: Path
    eval: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    state: loop.TrainState
    best_params: Any
    completed: bool


class EvalEvent(NamedTuple):
    """What :func:`run` passes to its ``callback`` after each evaluation."""

    update: int
    env_steps: int
    wall_clock_s: float  # since the run started, compilation included
    params: Any  # the current policy parameters
    val_median: float  # greedy median on the validation levels
    best_median: float


class _Progress(NamedTuple):
    best_median: float
    best_update: int
    best_env_steps: int
    best_wall_clock_s: float
    live_env_steps: int
    wall_clock_s: float
    evals: int
    stopped: bool = False  # ended early (stop_at_score or the callback)


def _run_config(algorithm: loop.Algorithm, config: Any) -> dict[str, Any]:
    return dict(
        algo=algorithm.name,
        config=config.to_dict(),
        policy=loop.policy_spec(config),
        steps_per_update=config.steps_per_update,
        num_updates=config.num_updates,
        updates_per_eval=config.updates_per_eval,
        held_out_seed=evaluation.HELD_OUT_SEED,
        validation_seed=evaluation.VALIDATION_SEED,
    )


def _save_train_state(
    path: Path, state: loop.TrainState, best_params: Any, progress: _Progress
) -> None:
    payload = {
        "train_state": serialization.to_state_dict(jax.device_get(state)),
        "best_params": serialization.to_state_dict(jax.device_get(best_params)),
        "progress": progress._asdict(),
    }
    io.atomic_write_bytes(path, serialization.msgpack_serialize(payload))


def _load_train_state(
    path: Path, template: loop.TrainState
) -> tuple[loop.TrainState, Any, _Progress]:
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        state = serialization.from_state_dict(template, payload["train_state"])
        best = serialization.from_state_dict(template.params, payload["best_params"])
        progress = _Progress(**payload["progress"])
    except Exception as error:  # msgpack and flax raise several unrelated types
        raise ValueError(
            f"{path} is not a readable train state of this run ({error})"
        ) from None
    state = jax.tree.map(jnp.asarray, state)
    return state, jax.tree.map(jnp.asarray, best), progress


def _read_metrics(path: Path, up_to_update: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [dict(r) for r in csv.DictReader(f)]
    rows = [r for r in rows if int(r["update"]) <= up_to_update]
    for r in rows:
        for k, v in r.items():
            r[k] = int(v) if k in INT_COLUMNS else float(v)
    return rows


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [",".join(METRICS_COLUMNS)]
    lines += [",".join(str(r[k]) for k in METRICS_COLUMNS) for r in rows]
    io.atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


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
        policy=loop.policy_spec(config),
        env_id=config.env_id,
        env_kwargs={
            "max_steps_in_episode": int(loop.make_env(config)[1].max_steps_in_episode)
        },
        **critic,
        **extra,
    )


def _save_best(
    directory: Path, config: Any, algorithm: loop.Algorithm, params: Any, prog
) -> None:
    save_policy(
        directory,
        config,
        params,
        algo=algorithm.name,
        seed=config.seed,
        update=prog.best_update,
        env_steps=prog.best_env_steps,
        validation_median=prog.best_median,
    )


def plot_learning_curve(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Validation median, best so far and training score against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["env_steps"] for r in rows], dtype=float) / 1e6
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        steps, [r["val_median"] for r in rows], "o-", ms=3, label="validation median"
    )
    ax.plot(steps, [r["best_median"] for r in rows], "--", label="best so far")
    ax.plot(
        steps,
        [r["train_score_mean"] for r in rows],
        ".-",
        label="training mean (sampled)",
    )
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("env steps (millions)")
    ax.set_ylabel("score (pipes)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    io.save_figure(fig, path, dpi=100)
    plt.close(fig)


def _check_finite(metrics: loop.UpdateMetrics, first_update: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first update whose loss or
    gradient norm is not finite (``metrics`` holds a chunk's [n] updates)."""
    loss, grad_norm = jax.device_get((metrics.loss, metrics.grad_norm))
    bad = ~(np.isfinite(loss) & np.isfinite(grad_norm))
    if bad.any():
        i = int(np.argmax(bad))
        raise NonFiniteLossError(
            f"non-finite loss at update {first_update + i} (loss {loss[i]}, "
            f"gradient norm {grad_norm[i]}): training stopped; the run keeps its "
            "last checkpoint. Lower --reward-scale or --lr"
        )


def _is_finished(out_dir: Path) -> bool:
    return (out_dir / "eval.json").is_file()


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
) -> RunResult:
    """Train ``config``'s algorithm and write a run directory.

    Args:
      config: a ``PPOConfig``, ``A2CConfig``, ``ReinforceConfig`` or ``GRPOConfig``.
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

    Returns:
      RunResult.

    Raises:
      FileExistsError: ``out_dir`` is not empty and ``resume`` is False.
      ValueError: nothing to resume, or a config that differs from the run's.
      NonFiniteLossError: a loss or gradient norm became inf or NaN (the update
        is named; the last checkpoint is kept).
    """
    algorithm = algorithm_of(config)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    state_path = ckpt_dir / STATE_FILE
    run_config = _run_config(algorithm, config)
    start = time.perf_counter()
    key = jax.random.PRNGKey(config.seed)
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
    if resume and _is_finished(out_dir):
        # A finished run stays as it is: nothing is trained, nothing rewritten.
        template = _jit_init(algorithm)(config, key)
        state, best_params, _ = _load_train_state(state_path, template)
        rows = _read_metrics(out_dir / "metrics.csv", int(state.update))
        eval_data = json.loads((out_dir / "eval.json").read_text())
        return RunResult(out_dir, eval_data, rows, state, best_params, True)
    if resume and state_path.is_file():
        template = _jit_init(algorithm)(config, key)
        state, best_params, prog = _load_train_state(state_path, template)
        rows = _read_metrics(out_dir / "metrics.csv", int(state.update))
        _write_metrics(out_dir / "metrics.csv", rows)
        elapsed_before = prog.wall_clock_s
    else:
        if resume:  # killed before its first checkpoint: start again in place
            (out_dir / "metrics.csv").unlink(missing_ok=True)
            ckpt_dir.mkdir(exist_ok=True)
        else:
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
        state = _jit_init(algorithm)(config, key)
        best_params = state.params
        rows = []
        prog = _Progress(-1.0, 0, 0, 0.0, 0, 0.0, 0)
        elapsed_before = 0.0

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    from tqdm.auto import tqdm

    total = config.num_updates * config.steps_per_update
    bar = tqdm(
        total=total,
        initial=int(state.env_steps),
        unit="step",
        unit_scale=True,
        disable=not progress,
        desc=algorithm.name,
    )
    evals_here = 0
    completed = True
    while int(state.update) < config.num_updates and not prog.stopped:
        if max_evals is not None and evals_here >= max_evals:
            completed = False
            break
        n = min(config.updates_per_eval, config.num_updates - int(state.update))
        first_update = int(state.update) + 1
        state, metrics = _jit_chunk(algorithm, n)(config, state)
        _check_finite(metrics, first_update)
        row = _chunk_row(metrics)
        update, env_steps = int(state.update), int(state.env_steps)
        result = _validate(
            config,
            state.params,
            seed=evaluation.VALIDATION_SEED,
            num_episodes=config.eval_episodes,
        )
        val_median = float(np.median(np.asarray(result.scores)))
        val_mean = float(np.mean(np.asarray(result.scores)))
        live = prog.live_env_steps + row.pop("live_steps")
        if val_median > prog.best_median:
            best_params = state.params
            prog = prog._replace(
                best_median=val_median,
                best_update=update,
                best_env_steps=env_steps,
                best_wall_clock_s=elapsed(),
            )
        prog = prog._replace(
            live_env_steps=live, wall_clock_s=elapsed(), evals=prog.evals + 1
        )
        evals_here += 1
        if keep_checkpoints == "all":
            save_policy(
                ckpt_dir / EVALUATIONS_DIR / f"env_steps_{env_steps:012d}",
                config,
                state.params,
                algo=algorithm.name,
                seed=config.seed,
                update=update,
                env_steps=env_steps,
                validation_median=val_median,
            )
        rows.append(
            dict(
                update=update,
                env_steps=env_steps,
                live_env_steps=live,
                wall_clock_s=round(prog.wall_clock_s, 3),
                lr=_current_lr(config, update),
                **row,
                val_median=val_median,
                val_mean=val_mean,
                best_median=prog.best_median,
                best_env_steps=prog.best_env_steps,
            )
        )
        _write_metrics(out_dir / "metrics.csv", rows)
        bar.update(env_steps - bar.n)
        bar.set_postfix(
            val=val_median,
            best=prog.best_median,
            train=round(row["train_score_mean"], 1),
            refresh=False,
        )
        finished = update >= config.num_updates
        stop = _stop_rule(config, state.params, val_median, prog.best_median)
        if stop and config.stop_confirm_episodes:  # the confirmed policy is the best
            best_params = state.params
            now = elapsed()  # the confirmation's evaluation included
            prog = prog._replace(
                best_median=val_median,
                best_update=update,
                best_env_steps=env_steps,
                best_wall_clock_s=now,
                wall_clock_s=now,
            )
            rows[-1].update(best_median=val_median, best_env_steps=env_steps)
            _write_metrics(out_dir / "metrics.csv", rows)
        if callback is not None:
            event = EvalEvent(
                update,
                env_steps,
                prog.wall_clock_s,
                state.params,
                val_median,
                prog.best_median,
            )
            stop = bool(callback(event)) or stop
            prog = prog._replace(wall_clock_s=elapsed())
        prog = prog._replace(stopped=stop)
        if finished or stop or prog.evals % config.checkpoint_every_evals == 0:
            _save_train_state(state_path, state, best_params, prog)
            _save_best(ckpt_dir / "best", config, algorithm, best_params, prog)
        if stop:
            break
    bar.close()
    if not completed:
        _save_train_state(state_path, state, best_params, prog)
        return RunResult(out_dir, None, rows, state, best_params, False)

    train_wall_clock = prog.wall_clock_s
    meta = dict(algo=algorithm.name, seed=config.seed)
    save_policy(
        ckpt_dir / "last",
        config,
        state.params,
        **meta,
        update=int(state.update),
        env_steps=int(state.env_steps),
    )
    _save_best(ckpt_dir / "best", config, algorithm, best_params, prog)
    eval_start = time.perf_counter()
    result = _validate(
        config,
        best_params,
        seed=evaluation.HELD_OUT_SEED,
        num_episodes=config.final_eval_episodes,
    )
    result = jax.block_until_ready(result)
    eval_data = evaluation.write_eval_json(
        out_dir / "eval.json",
        result,
        wall_clock_s=train_wall_clock,
        env_steps=prog.best_env_steps,
        algo=algorithm.name,
        max_score=config.eval_max_score,
        held_out_seed=evaluation.HELD_OUT_SEED,
        best_update=prog.best_update,
        best_validation_median=prog.best_median,
        best_wall_clock_s=prog.best_wall_clock_s,
        trained_env_steps=int(state.env_steps),
        trained_live_env_steps=prog.live_env_steps,
        eval_wall_clock_s=time.perf_counter() - eval_start,
    )
    if rows:
        plot_learning_curve(
            out_dir / "learning_curve.png",
            rows,
            f"{algorithm.name}, seed {config.seed}: held-out median "
            f"{eval_data['median_score']:g}",
        )
    if gif:
        env, env_params = loop.make_env(config)
        evaluation.agent_gif(
            loop.greedy_act_fn(loop.make_policy(config)),
            best_params,
            env,
            env_params,
            out_dir / "agent.gif",
            jax.random.PRNGKey(0),
        )
    return RunResult(out_dir, eval_data, rows, state, best_params, True)


# ------------------------------------------------------------------ CLI entry points


def train_main(
    algo: str,
    out_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    keep_checkpoints: str = "best",
) -> dict[str, Any] | None:
    """``rl-pg train --algo ALGO --out DIR [--resume] [--field value ...]``.

    Args:
      algo: one of :data:`ALGO_NAMES` (``qlearning`` runs
        ``rl_pg.algos.qlearning.train_qlearning``, ``dqn``
        ``rl_pg.algos.dqn.train_dqn``).
      out_dir: the run directory (new, or the interrupted run's with ``resume``).
      overrides: config fields as strings (``{"num-envs": "64"}``), see
        :func:`overrides_from_argv`. With ``resume`` and no overrides, the
        config is read from ``out_dir/config.json``.
      resume: continue an interrupted run.
      progress: show a progress bar.
      keep_checkpoints: ``"best"`` or ``"all"`` (every evaluated policy; see
        :func:`run`).

    Returns:
      The contents of ``eval.json``.
    """
    overrides = dict(overrides or {})
    if keep_checkpoints not in KEEP_CHECKPOINTS:
        raise ValueError(
            f"keep_checkpoints must be one of {KEEP_CHECKPOINTS}, got {keep_checkpoints!r}"
        )
    if algo in ("qlearning", "dqn") and keep_checkpoints != "best":
        raise ValueError(
            f"--keep-checkpoints all is for policy-gradient runs, not {algo}"
        )
    if algo in ("qlearning", "dqn"):
        if resume:
            raise ValueError(f"--resume is not supported for --algo {algo}")
        config = make_config(algo, overrides)
        if algo == "dqn":
            from rl_pg.algos.dqn import train_dqn

            return train_dqn(config, out_dir, progress).eval
        from rl_pg.algos.qlearning import train_qlearning

        return train_qlearning(config, out_dir, progress).eval
    config_path = Path(out_dir) / "config.json"
    if resume and config_path.is_file():
        saved = json.loads(config_path.read_text())
        if saved.get("algo") != algo:
            raise ValueError(f"{out_dir} is a {saved.get('algo')!r} run, not {algo!r}")
        saved_config = saved["config"]
        saved_config = {
            k: tuple(v) if isinstance(v, list) else v for k, v in saved_config.items()
        }
        config = config_class(algo)(
            **{**saved_config, **parse_overrides(config_class(algo), overrides)}
        )
    else:  # a new run (or one killed before it wrote its config)
        config = make_config(algo, overrides)
    if resume and _is_finished(Path(out_dir)):
        print(f"{out_dir} is a finished run (eval.json exists): left as it is")
    return run(
        config,
        out_dir,
        resume=resume,
        progress=progress,
        keep_checkpoints=keep_checkpoints,
    ).eval


def eval_main(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    num_episodes: int = 32,
    max_score: int = 10_000,
    greedy: bool = True,
    seed: int = 0,
    gif: bool = False,
) -> dict[str, Any]:
    """``rl-pg eval --checkpoint DIR --out DIR2``: held-out scores -> ``eval.json``.

    Args:
      checkpoint_dir: a policy checkpoint (``meta.json`` + ``params.msgpack``), a
        training run directory (its ``checkpoints/best``), or a Q-learning run
        directory (its ``checkpoints/best.npz``).
      out_dir: a new (or empty) directory for ``eval.json`` (and ``agent.gif``).
      num_episodes: held-out test levels.
      max_score: an episode stops at this many pipes.
      greedy: argmax actions (else sampled, with ``seed``).
      seed: action-sampling seed (levels do not depend on it).
      gif: also render ``agent.gif``.

    Returns:
      The contents of ``eval.json`` (``wall_clock_s`` is the evaluation's own
      time; ``env_steps`` the checkpoint's training steps when it records them).
    """
    path = Path(checkpoint_dir)
    if not (isinstance(num_episodes, int) and num_episodes >= 1):
        raise ValueError(f"--episodes must be an int >= 1, got {num_episodes!r}")
    limit = evaluation.MAX_SCORE_LIMIT
    if not (isinstance(max_score, int) and 1 <= max_score <= limit):
        raise ValueError(
            f"--max-score must be an int in [1, {limit}], got {max_score!r}"
        )
    if not path.exists():
        raise ValueError(f"--checkpoint {path} does not exist")
    policy_dir = checkpoint.find_policy_checkpoint(path)
    qtable = path / "checkpoints" / "best.npz"
    if policy_dir is None and not qtable.is_file():
        raise ValueError(
            f"{path} is neither a policy checkpoint nor a training run directory"
        )
    io.check_out_dir(out_dir)
    start = time.perf_counter()
    if policy_dir is not None:
        _, params, env, env_params, meta = checkpoint.load_policy(policy_dir)
        # The cached policy object for this spec: evaluations share one compile.
        policy = loop.policy_from_spec(meta["policy"])
        act_fn = loop.greedy_act_fn(policy) if greedy else _sampling_act_fn(policy)
        source = str(policy_dir)
    else:
        from rl_pg.algos import qlearning

        q, qconfig = qlearning.load_checkpoint(qtable)
        params = jnp.asarray(q)
        env, env_params = rl_pg.make(qlearning.ENV_ID)
        act_fn = qlearning.GreedyPolicy(qconfig.binning)
        meta, source = {}, str(qtable)
    out = io.new_out_dir(out_dir)  # only once the checkpoint has been read
    io.write_config(
        out,
        dict(
            command="eval",
            checkpoint=source,
            num_episodes=num_episodes,
            max_score=max_score,
            greedy=greedy,
            seed=seed,
            held_out_seed=evaluation.HELD_OUT_SEED,
        ),
    )
    result = evaluation.evaluate(
        act_fn,
        params,
        env,
        env_params,
        jax.random.PRNGKey(seed),
        num_episodes,
        max_score,
    )
    result = jax.block_until_ready(result)
    data = evaluation.write_eval_json(
        out / "eval.json",
        result,
        wall_clock_s=time.perf_counter() - start,
        env_steps=int(meta.get("env_steps", 0)),
        checkpoint=source,
        max_score=max_score,
        held_out_seed=evaluation.HELD_OUT_SEED,
        greedy=greedy,
    )
    if gif:
        evaluation.agent_gif(
            act_fn, params, env, env_params, out / "agent.gif", jax.random.PRNGKey(seed)
        )
    return data


@functools.cache
def _sampling_act_fn(policy):
    def act(params, obs, state, key):
        del state
        logits, _ = policy.apply(params, obs)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    return act


# ---------------------------------------------------------------- several seeds


class SeedsResult(NamedTuple):
    """What :func:`train_seeds` measured.

    Attributes:
      curves: per seed, rows ``{update, env_steps, train_time_s, val_median,
        best_median, train_score_mean}`` at every evaluation.
      final: per seed, the held-out summary (``rl_pg.evaluate.summarize``) of its
        best parameters (empty when ``evaluate=False``).
      best_params: per seed, the parameters with the best validation median.
      train_time_s: training wall-clock, compilation included, evaluations not.
      compile_time_s: time of the first chunk beyond a later chunk's (estimate).
      env_steps: env steps per seed.
      total_time_s: everything, evaluations included.
    """

    curves: list[list[dict[str, Any]]]
    final: list[dict[str, Any]]
    best_params: list[Any]
    train_time_s: float
    compile_time_s: float
    env_steps: int
    total_time_s: float


def train_seeds(
    config: Any,
    seeds: Sequence[int],
    *,
    vmap: bool = True,
    evaluate: bool = True,
    progress: bool = False,
) -> SeedsResult:
    """Train one run per seed under the same config, side by side or one by one.

    ``config`` is a policy-gradient config, a ``QLearningConfig`` or a
    ``DQNConfig`` (for these an "update" is a chunk of ``eval_every_steps``).
    With ``vmap`` the seeds train in one ``jit(vmap(chunk))`` (one compilation);
    otherwise one after another through the same jitted chunk. Every
    ``config.updates_per_eval`` updates each seed's greedy policy is scored on
    validation levels (unless ``evaluate=False``), and the best one is kept; no
    early stop, every seed gets the whole budget. Timing excludes evaluation.
    """
    if type(config).__name__ in ("QLearningConfig", "DQNConfig"):
        return _value_based_seeds(config, seeds, vmap, evaluate, progress)
    algorithm = algorithm_of(config)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    per_eval = config.updates_per_eval
    sizes = [per_eval] * (config.num_updates // per_eval)
    if config.num_updates % per_eval:
        sizes.append(config.num_updates % per_eval)
    start = time.perf_counter()
    groups = [list(range(len(seeds)))] if vmap else [[i] for i in range(len(seeds))]
    curves: list[list[dict[str, Any]]] = [[] for _ in seeds]
    best = [(-1.0, None) for _ in seeds]
    train_time = 0.0
    chunk_times: list[float] = []
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(groups) * len(sizes), disable=not progress, desc=algorithm.name
    )
    for group in groups:
        tic = time.perf_counter()
        if vmap:
            state = _jit_init(algorithm, True)(config, keys)
        else:
            state = _jit_init(algorithm)(config, keys[group[0]])
        jax.block_until_ready(state)
        train_time += time.perf_counter() - tic
        for n in sizes:
            tic = time.perf_counter()
            state, metrics = _jit_chunk(algorithm, n, vmap)(config, state)
            jax.block_until_ready(state)
            dt = time.perf_counter() - tic
            train_time += dt
            chunk_times.append(dt)
            for j, i in enumerate(group):
                pick = (lambda x, j=j: x[j]) if vmap else (lambda x: x)
                params = jax.tree.map(pick, state.params)
                m = jax.tree.map(pick, metrics)
                row = _chunk_row(m)
                entry = dict(
                    update=int(pick(state.update)),
                    env_steps=int(pick(state.env_steps)),
                    train_time_s=train_time,
                    train_score_mean=row["train_score_mean"],
                )
                if evaluate:
                    result = _validate(
                        config,
                        params,
                        seed=evaluation.VALIDATION_SEED,
                        num_episodes=config.eval_episodes,
                    )
                    median = float(np.median(np.asarray(result.scores)))
                    if median > best[i][0]:
                        best[i] = (median, params)
                    entry.update(val_median=median, best_median=best[i][0])
                else:
                    best[i] = (best[i][0], params)
                curves[i].append(entry)
            bar.update(1)
    bar.close()
    final = []
    if evaluate:
        for _, params in best:
            result = _validate(
                config,
                params,
                seed=evaluation.HELD_OUT_SEED,
                num_episodes=config.final_eval_episodes,
            )
            final.append(evaluation.summarize(result))
    steady = [
        t
        for t, n in zip(chunk_times, sizes * len(groups), strict=True)
        if n == per_eval
    ]
    compile_time = max(
        0.0, chunk_times[0] - (np.median(steady[1:]) if len(steady) > 1 else 0.0)
    )
    return SeedsResult(
        curves=curves,
        final=final,
        best_params=[p for _, p in best],
        train_time_s=train_time,
        compile_time_s=float(compile_time),
        env_steps=config.num_updates * config.steps_per_update,
        total_time_s=time.perf_counter() - start,
    )


class _ValueBased(NamedTuple):
    """What :func:`train_seeds` needs of a value-based algorithm's module."""

    module: Any  # rl_pg.algos.qlearning or rl_pg.algos.dqn
    act_fn: Any  # greedy ``act_fn`` for rl_pg.evaluate.evaluate
    best: Callable[[Any], Any]  # state -> the parameters with the best median
    current: Callable[[Any], Any]  # state -> the parameters being trained
    env: Any
    env_params: Any


def _value_based(config: Any) -> _ValueBased:
    if type(config).__name__ == "DQNConfig":
        from rl_pg.algos import dqn

        env, env_params = dqn.make_env(config)
        return _ValueBased(
            dqn,
            dqn.greedy_act_fn(config),
            lambda s: s.best_params,
            lambda s: s.params,
            env,
            env_params,
        )
    from rl_pg.algos import qlearning

    env, env_params = qlearning._env(config)
    return _ValueBased(
        qlearning,
        qlearning.GreedyPolicy(config.binning),
        lambda s: s.best_q,
        lambda s: s.q,
        env,
        env_params,
    )


@functools.cache
def _jit_value_based(module: Any, name: str, vmapped: bool):
    fn = getattr(module, name)
    if vmapped:
        fn = jax.vmap(fn, in_axes=(None, 0))
    return jax.jit(fn, static_argnums=0)


def _value_based_seeds(
    config: Any, seeds: Sequence[int], vmap: bool, evaluate: bool, progress: bool
) -> SeedsResult:
    """:func:`train_seeds` for Q-learning and DQN: their own ``init``,
    ``train_steps`` (one chunk) and ``validate`` (keeps the best), jitted (and
    vmapped over seeds); the timing excludes ``validate``."""
    algo = _value_based(config)
    traced = algo.module._traced_config(config)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    groups = [list(range(len(seeds)))] if vmap else [[i] for i in range(len(seeds))]
    curves: list[list[dict[str, Any]]] = [[] for _ in seeds]
    best_params: list[Any] = [None for _ in seeds]
    train_time, chunk_times = 0.0, []
    start = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(groups) * config.num_chunks,
        disable=not progress,
        desc=type(config).__name__,
    )
    init, steps, validate = (
        _jit_value_based(algo.module, name, vmap)
        for name in ("init", "train_steps", "validate")
    )
    for group in groups:
        tic = time.perf_counter()
        state = init(traced, keys if vmap else keys[group[0]])
        jax.block_until_ready(state)
        train_time += time.perf_counter() - tic
        for chunk in range(config.num_chunks):
            tic = time.perf_counter()
            state, stats = steps(traced, state)
            jax.block_until_ready(state)
            chunk_times.append(time.perf_counter() - tic)
            train_time += chunk_times[-1]
            if evaluate:
                state, result = validate(traced, state)
            for j, i in enumerate(group):
                pick = (lambda x, j=j: x[j]) if vmap else (lambda x: x)
                episodes = int(pick(stats.episodes))
                entry = dict(
                    update=chunk + 1,
                    env_steps=int(pick(state.env_steps)),
                    train_time_s=train_time,
                    train_score_mean=float(pick(stats.score_sum)) / episodes
                    if episodes
                    else float("nan"),
                )
                if evaluate:
                    entry.update(
                        val_median=float(np.median(np.asarray(pick(result.scores)))),
                        best_median=float(pick(state.best_median)),
                    )
                curves[i].append(entry)
                chosen = algo.best(state) if evaluate else algo.current(state)
                best_params[i] = jax.tree.map(pick, chosen)
            bar.update(1)
    bar.close()
    final = []
    if evaluate:
        for params in best_params:
            result = evaluation.evaluate(
                algo.act_fn,
                params,
                algo.env,
                algo.env_params,
                jax.random.PRNGKey(0),
                max_score=config.eval_max_score,
                reset_keys=evaluation.held_out_keys(
                    config.final_eval_episodes, evaluation.HELD_OUT_SEED
                ),
            )
            final.append(evaluation.summarize(result))
    steady = np.median(chunk_times[1:]) if len(chunk_times) > 1 else 0.0
    return SeedsResult(
        curves=curves,
        final=final,
        best_params=best_params,
        train_time_s=train_time,
        compile_time_s=float(max(0.0, chunk_times[0] - steady)),
        env_steps=int(curves[0][-1]["env_steps"]),
        total_time_s=time.perf_counter() - start,
    )


__all__ = [
    "ALGORITHMS",
    "ALGO_NAMES",
    "EvalEvent",
    "METRICS_COLUMNS",
    "RunResult",
    "SeedsResult",
    "algorithm_of",
    "config_class",
    "config_help",
    "eval_main",
    "make_config",
    "overrides_from_argv",
    "parse_overrides",
    "plot_learning_curve",
    "run",
    "save_policy",
    "train_main",
    "train_seeds",
]
