"""TensorBoard logs of training runs (``rl-pg train --log tensorboard``).

Each run directory gets ``tensorboard/`` with one event file: every
``metrics.csv`` column as a scalar at step ``env_steps`` (the CSV itself is
unchanged), and the run's hyperparameters (the hparams plugin, linked to the
``val_median`` and ``best_median`` scalars). Written with tensorboardX (no
TensorFlow; ``pip install 'rl_pg[viz]'``).

View: ``tensorboard --logdir RUN_OR_SWEEP_DIR``. Weights & Biases:
``wandb sync --sync-tensorboard RUN_OR_SWEEP_DIR``, or
``wandb.init(sync_tensorboard=True)`` before training in Python.
"""

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rl_pg import extras

LOGS = ("tensorboard",)
LOG_DIR = "tensorboard"
HPARAM_METRICS = ("val_median", "best_median")


def check_log(log: str | None) -> None:
    """ValueError for an unknown ``--log``; MissingExtraError without tensorboardX."""
    if log is None:
        return
    if log not in LOGS:
        raise ValueError(f"--log must be one of {list(LOGS)}, got {log!r}")
    extras.require("tensorboardX", f"rl-pg train --log {log}")


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config dict flattened to the hparams plugin's types (bool, int, float,
    str): nested dicts as ``a/b``, anything else (tuples, None) as its repr."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flat_hparams(value, f"{name}/")
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = repr(value)
    return out


class TensorBoardLog:
    """A run's event file: :meth:`write` one ``metrics.csv`` row at a time.

    Written in the calling thread, each row flushed: tensorboardX's
    ``SummaryWriter`` would start a thread and a ``multiprocessing.Queue`` (and
    its feeder thread) per run, to save microseconds per row.
    """

    def __init__(self, run_dir: str | Path, hparams: Mapping[str, Any]):
        extras.require("tensorboardX", "rl-pg train --log tensorboard")
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        log_dir = Path(run_dir) / LOG_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        self._events = EventsWriter(str(log_dir / "events"))
        self._scalar, self._event = summary.scalar, event_pb2.Event
        experiment, start, self._end = summary.hparams(
            flat_hparams(hparams), {m: math.nan for m in HPARAM_METRICS}
        )
        for event in (experiment, start):
            self._add(event)
        self._events.flush()

    def _add(self, summary, step: int | None = None) -> None:
        event = self._event(summary=summary, wall_time=time.time())
        if step is not None:
            event.step = step
        self._events.write_event(event)

    def write(self, row: Mapping[str, Any]) -> None:
        """Every column of ``row`` but ``env_steps``, at step ``env_steps``."""
        step = int(row["env_steps"])
        for key, value in row.items():
            if key != "env_steps":
                self._add(self._scalar(key, float(value)), step)
        self._events.flush()

    def close(self) -> None:
        """End the hparams session and close the file."""
        self._add(self._end)
        self._events.close()
