"""The estimator-variance benchmark: how far is each estimate from the true gradient?

Modules: :mod:`~rl_pg.variance.study` (sampling, per-trajectory and batch
gradients, the study of one policy), :mod:`~rl_pg.variance.statistics`
(calibrated metrics and intervals), :mod:`~rl_pg.variance.exact` (exact answers on
the enumerable MDP), :mod:`~rl_pg.variance.report` (presets, the CLI job, outputs,
and :func:`run_study`, the study from Python).
"""

from rl_pg.variance.report import run_study
from rl_pg.variance.statistics import METRICS, log_slope, summarize
from rl_pg.variance.study import (
    ORACLE_PER_PARAMETER,
    ORACLE_SCALAR,
    ChunkSums,
    Problem,
    Runners,
    StageResult,
    StudyConfig,
    SuiteConfig,
    TrajectoryMoments,
    batch_estimates,
    block_size,
    chunk_sums,
    critic_calibration,
    critic_in_reward_units,
    estimator_suite,
    flappy_problem,
    flat_gradient,
    in_blocks,
    make_runners,
    matmul_flops_per_s,
    reference_gradient,
    score_weight_estimates,
    study_stage,
    sub_batch_counts,
    suite_specs,
    total_work,
    trajectory_moments,
    weight_suite,
    weighted_column_grads,
)

__all__ = [
    "METRICS",
    "ORACLE_PER_PARAMETER",
    "ORACLE_SCALAR",
    "ChunkSums",
    "Problem",
    "Runners",
    "StageResult",
    "StudyConfig",
    "SuiteConfig",
    "TrajectoryMoments",
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
    "reference_gradient",
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
