"""The estimator-variance benchmark: how far is each estimate from the true gradient?

Modules, by job: :mod:`~rl_pg.variance.problems` (problems and estimator
suites), :mod:`~rl_pg.variance.moments` (reference sums and gradient),
:mod:`~rl_pg.variance.kernels` and :mod:`~rl_pg.variance.runners` (jitted
functions, devices), :mod:`~rl_pg.variance.study` (the phases, the study of one
policy), :mod:`~rl_pg.variance.job` (:class:`VarianceJob`, presets, config.json),
:mod:`~rl_pg.variance.stages` (the policies studied),
:mod:`~rl_pg.variance.pipeline` (running a job, :func:`run_study`),
:mod:`~rl_pg.variance.report` (the outputs), :mod:`~rl_pg.variance.decomposition`,
:mod:`~rl_pg.variance.statistics` (calibrated metrics and intervals),
:mod:`~rl_pg.variance.exact` (exact answers on the enumerable MDP).
"""

from rl_pg.variance.job import PRESETS, VarianceJob, preset
from rl_pg.variance.kernels import (
    block_size,
    in_blocks,
    score_weight_estimates,
    weighted_column_grads,
)
from rl_pg.variance.moments import (
    ORACLE_PER_PARAMETER,
    ORACLE_SCALAR,
    ChunkSums,
    TrajectoryMoments,
    chunk_sums,
    critic_calibration,
    reference_gradient,
)
from rl_pg.variance.pipeline import run, run_study
from rl_pg.variance.problems import (
    Problem,
    SuiteConfig,
    critic_in_reward_units,
    estimator_suite,
    flappy_problem,
    flat_gradient,
    suite_specs,
    weight_suite,
)
from rl_pg.variance.runners import (
    Runners,
    make_runners,
    matmul_flops_per_s,
    sub_batch_counts,
)
from rl_pg.variance.statistics import METRICS, log_slope, summarize
from rl_pg.variance.study import (
    StageResult,
    StudyConfig,
    batch_estimates,
    study_stage,
    total_work,
    trajectory_moments,
)

__all__ = [
    "METRICS",
    "ORACLE_PER_PARAMETER",
    "ORACLE_SCALAR",
    "PRESETS",
    "ChunkSums",
    "Problem",
    "Runners",
    "StageResult",
    "StudyConfig",
    "SuiteConfig",
    "TrajectoryMoments",
    "VarianceJob",
    "batch_estimates",
    "block_size",
    "chunk_sums",
    "critic_calibration",
    "critic_in_reward_units",
    "estimator_suite",
    "flappy_problem",
    "flat_gradient",
    "in_blocks",
    "log_slope",
    "make_runners",
    "matmul_flops_per_s",
    "preset",
    "reference_gradient",
    "run",
    "run_study",
    "score_weight_estimates",
    "study_stage",
    "sub_batch_counts",
    "suite_specs",
    "summarize",
    "total_work",
    "trajectory_moments",
    "weight_suite",
    "weighted_column_grads",
]
