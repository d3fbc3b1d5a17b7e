"""The one registry: ``--algo`` name -> :class:`rl_pg.algos.base.Algorithm`.

The CLI, the run driver, multi-seed runs and sweeps all look algorithms up here;
nothing dispatches on config class names. Each name is a module
``rl_pg.algos.<name>`` whose ``ALGORITHM`` has that name; the modules are
imported on first use, so :data:`NAMES` costs no JAX import (``rl-pg --help``).
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl_pg.algos import base

NAMES = ("ppo", "a2c", "reinforce", "grpo", "qlearning", "dqn")


@functools.cache
def _algorithms() -> dict[str, base.Algorithm]:
    algorithms = {}
    for name in NAMES:
        algorithm = importlib.import_module(f"rl_pg.algos.{name}").ALGORITHM
        if algorithm.name != name:
            raise RuntimeError(
                f"rl_pg.algos.{name}.ALGORITHM is named {algorithm.name!r}"
            )
        algorithms[name] = algorithm
    return algorithms


def __getattr__(name: str):
    if name == "ALGORITHMS":  # name -> Algorithm, imported on first use
        return _algorithms()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get(name: str) -> base.Algorithm:
    """The algorithm called ``name``.

    Raises:
      ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in NAMES:
        raise ValueError(f"Unknown algo {name!r}; choose one of {list(NAMES)}")
    return _algorithms()[name]


def of(config: object) -> base.Algorithm:
    """The algorithm whose config class ``config`` is an instance of."""
    for algorithm in _algorithms().values():
        if type(config) is algorithm.config_cls:
            return algorithm
    raise TypeError(f"No algorithm takes a {type(config).__name__}")


def load(path: str | Path, greedy: bool = True) -> tuple[Path, base.Agent]:
    """The agent saved at ``path``, whichever algorithm wrote it.

    ``path`` is resolved by :func:`rl_pg.checkpoint.policy_dir` (a run directory
    means its best policy); the first algorithm whose ``is_checkpoint`` accepts
    the checkpoint reads it (the policy-gradient algorithms and DQN share one
    format and one reader).

    Returns:
      ``(checkpoint, agent)``: the checkpoint read and its :class:`base.Agent`.

    Raises:
      rl_pg.checkpoint.CheckpointError: no checkpoint at ``path``, or one that
        no algorithm reads; ValueError from the algorithm's ``load``.
    """
    from rl_pg import checkpoint

    found = checkpoint.policy_dir(path)
    for algorithm in _algorithms().values():
        if algorithm.is_checkpoint(found):
            return found, algorithm.load(found, greedy)
    raise checkpoint.CheckpointError(
        f"{found} is not a checkpoint that any algorithm reads ({', '.join(NAMES)}); "
        + checkpoint.RUN_HINT
    )
