"""What a run directory holds, and how it is written and read back.

A run directory::

    config.json                      algo, config, what the algorithm derives
    metrics.csv                      one row per evaluation
    checkpoints/train_state.msgpack  the resumable state (flax.serialization)
    checkpoints/best, last           the best and final policies (the
                                     algorithm's checkpoint: a policy directory,
                                     or best.npz / last.npz for Q-learning)
    checkpoints/evaluations/env_steps_<N>  every evaluated policy (--keep-checkpoints all)
    eval.json                        held-out scores (the public contract)
    learning_curve.png/.pdf/.svg, agent.gif

Every file is written atomically (:mod:`rl_pg.io`).
"""

import csv
import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import serialization

from rl_pg import evaluate as evaluation
from rl_pg import io
from rl_pg.algos import base

STATE_FILE = "train_state.msgpack"
EVALUATIONS_DIR = "evaluations"  # checkpoints/evaluations/: every evaluated policy
KEEP_CHECKPOINTS = ("best", "all")
# metrics.csv: these, with the algorithm's own columns between them.
LEADING_COLUMNS = ("env_steps", "wall_clock_s")
TRAILING_COLUMNS = ("val_median", "val_mean", "best_median", "best_env_steps")


def metrics_columns(algorithm: base.Algorithm) -> tuple[str, ...]:
    """The header of ``metrics.csv`` for ``algorithm``."""
    return (*LEADING_COLUMNS, *algorithm.columns, *TRAILING_COLUMNS)


def run_config(algorithm: base.Algorithm, config: Any) -> dict[str, Any]:
    """``config.json``'s contents (the library versions are added on writing)."""
    return dict(
        algo=algorithm.name,
        config=config.to_dict(),
        **algorithm.describe(config),
        held_out_seed=evaluation.HELD_OUT_SEED,
        validation_seed=evaluation.VALIDATION_SEED,
    )


@dataclasses.dataclass
class Progress:
    """What the host knows of a run beyond its :class:`rl_pg.algos.base.RunState`.

    Attributes:
      wall_clock_s: training time so far (across resumes).
      best_wall_clock_s: the time when the best policy was taken.
      best_update: the update (or evaluation) that produced it.
    """

    wall_clock_s: float = 0.0
    best_wall_clock_s: float = 0.0
    best_update: int = 0


def save_train_state(path: Path, run: base.RunState, progress: Progress) -> None:
    """The resumable state, atomically."""
    payload = {
        "run": serialization.to_state_dict(jax.device_get(run)),
        "progress": dataclasses.asdict(progress),
    }
    io.atomic_write_bytes(path, serialization.msgpack_serialize(payload))


def load_train_state(
    path: Path, template: base.RunState
) -> tuple[base.RunState, Progress]:
    """Read what :func:`save_train_state` wrote, shaped like ``template``.

    Raises:
      ValueError: the file is not a train state of this run (names the file).
    """
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        run = serialization.from_state_dict(template, payload["run"])
        progress = Progress(**payload["progress"])
    except Exception as error:  # msgpack and flax raise several unrelated types
        raise ValueError(
            f"{path} is not a readable train state of this run ({error})"
        ) from None
    return jax.tree.map(jnp.asarray, run), progress


def _number(text: str) -> int | float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


def read_metrics(path: Path, up_to_env_steps: int) -> list[dict[str, Any]]:
    """The rows of ``metrics.csv`` up to a checkpoint (ints stay ints)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in rows if r["env_steps"] <= up_to_env_steps]


def write_metrics(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    lines = [",".join(columns)]
    lines += [",".join(str(r[k]) for k in columns) for r in rows]
    io.atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def plot_learning_curve(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Validation median, best so far and training score against env steps
    (:func:`rl_pg.figures.learning_curve_figure`): ``path`` (a PNG) and the same
    figure beside it as PDF and SVG."""
    from rl_pg import figures

    fig = figures.learning_curve_figure(rows, title)
    figures.save(fig, path, figures.FORMATS)
    figures.pyplot().close(fig)
