"""Runs: one driver for every algorithm, seeds, sweeps, CLI overrides.

* :mod:`rl_pg.runs.overrides`: ``--field value`` options -> a validated config.
* :mod:`rl_pg.runs.driver`: :func:`~rl_pg.runs.driver.run`, the one run driver
  (progress, metrics, evaluation, keep-best, checkpoints, resume, plots, GIF).
* :mod:`rl_pg.runs.files`: what a run directory holds and how it is written.
* :mod:`rl_pg.runs.seeds`: several seeds side by side, for experiments.
* :mod:`rl_pg.runs.sweep`: ``rl-pg sweep``, a grid x seeds in one ``jit(vmap)``.
* :mod:`rl_pg.runs.commands`: ``rl-pg train`` and ``rl-pg eval``.
"""
