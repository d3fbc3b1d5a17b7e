"""Training entry points, gathered from :mod:`rl_pg.runs` (one import for scripts).

``run`` trains any algorithm's config into a run directory (the one driver),
``train_main`` / ``eval_main`` / ``sweep_main`` are the CLI commands,
``train_seeds`` trains several seeds side by side, and ``make_config`` /
``overrides_from_argv`` turn ``--field value`` options into a config.
"""

from rl_pg.algos.loop import save_policy
from rl_pg.algos.registry import ALGORITHMS
from rl_pg.algos.registry import NAMES as ALGO_NAMES
from rl_pg.algos.registry import of as algorithm_of
from rl_pg.runs.commands import eval_main, train_main
from rl_pg.runs.driver import EvalEvent, NonFiniteLossError, RunResult, run
from rl_pg.runs.files import STATE_FILE, plot_learning_curve
from rl_pg.runs.overrides import (
    config_class,
    config_help,
    make_config,
    overrides_from_argv,
    parse_overrides,
)
from rl_pg.runs.seeds import SeedsResult, train_seeds
from rl_pg.runs.sweep import sweep_main

__all__ = [
    "ALGORITHMS",
    "ALGO_NAMES",
    "STATE_FILE",
    "EvalEvent",
    "NonFiniteLossError",
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
    "sweep_main",
    "train_main",
    "train_seeds",
]
