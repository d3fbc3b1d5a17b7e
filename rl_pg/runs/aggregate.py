"""Seed statistics that reviewers trust (Agarwal et al. 2021, "Deep RL at the
edge of the statistical precipice", NeurIPS), computed with rliable.

A group (a sweep cell, an algorithm) has one held-out score per run (seed):
the median over the held-out levels. Over its runs we report the interquartile
mean (IQM: the mean of the middle 50% of the runs, robust to outlier seeds) and
the median, each with a 95% stratified-bootstrap percentile interval (a single
task here, so the strata are the task's runs), and the performance profile
P(score > tau) over runs with its bootstrap band. ``pip install 'rl_pg[viz]'``.
"""

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rl_pg import extras

STAT_COLUMNS = (
    "num_runs",
    "iqm",
    "iqm_lo",
    "iqm_hi",
    "median",
    "median_lo",
    "median_hi",
)
REPS = 2000  # bootstrap resamples (rliable's default for profiles)


def _rliable(feature: str):
    extras.require("rliable", feature)
    from rliable import library, metrics

    return library, metrics


@contextlib.contextmanager
def _seeded(seed: int):
    """rliable 1.2 draws its bootstrap indices from numpy's global RNG (its
    ``random_state`` only reaches arch): seed it here, restore it afterwards."""
    saved = np.random.get_state()  # noqa: NPY002
    np.random.seed(seed)  # noqa: NPY002
    try:
        with warnings.catch_warnings():  # arch deprecates rliable's random_state
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        np.random.set_state(saved)  # noqa: NPY002


def _score_dict(scores: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """name -> (num_runs, 1) arrays (ValueError for an empty or non-finite group)."""
    out = {}
    for name, values in scores.items():
        array = np.asarray(values, float).reshape(-1, 1)
        if array.size == 0 or not np.isfinite(array).all():
            raise ValueError(f"group {name!r} needs finite scores, got {values}")
        out[str(name)] = array
    return out


def interval_estimates(
    scores: Mapping[str, Sequence[float]],
    reps: int = REPS,
    seed: int = 0,
    feature: str = "seed statistics",
) -> dict[str, dict[str, float]]:
    """IQM and median over each group's runs (scores pooled over runs and
    tasks) with 95% stratified-bootstrap percentile intervals (``rliable.library.get_interval_estimates``, ``reps`` resamples
    drawn from ``np.random.RandomState(seed)``).

    Returns:
      name -> {num_runs, iqm, iqm_lo, iqm_hi, median, median_lo, median_hi}.
    """
    library, metrics = _rliable(feature)
    score_dict = _score_dict(scores)
    # rliable's aggregate_median is the median over tasks of the mean over
    # runs: with one task, a mean; the median over the runs is taken instead
    aggregate = lambda x: np.array([metrics.aggregate_iqm(x), np.median(x)])
    with _seeded(seed):
        points, intervals = library.get_interval_estimates(
            score_dict,
            aggregate,
            reps=reps,
            random_state=np.random.RandomState(seed),
        )
    out = {}
    for name, array in score_dict.items():
        (iqm, median), ((iqm_lo, median_lo), (iqm_hi, median_hi)) = (
            points[name],
            intervals[name],
        )
        out[name] = dict(
            num_runs=int(array.shape[0]),
            iqm=float(iqm),
            iqm_lo=float(iqm_lo),
            iqm_hi=float(iqm_hi),
            median=float(median),
            median_lo=float(median_lo),
            median_hi=float(median_hi),
        )
    return out


def performance_profiles(
    scores: Mapping[str, Sequence[float]],
    taus: Sequence[float] | None = None,
    reps: int = REPS,
    seed: int = 0,
    feature: str = "performance profiles",
) -> dict[str, Any]:
    """The fraction of runs scoring above each tau, with a 95% bootstrap band
    (``rliable.library.create_performance_profile``).

    Returns:
      {"taus": (K,), "profiles": name -> (K,), "lo": name -> (K,), "hi": ...};
      default taus: 101 points from 0 to the largest score.
    """
    library, _ = _rliable(feature)
    score_dict = _score_dict(scores)
    if taus is None:
        top = max(float(a.max()) for a in score_dict.values())
        taus = np.linspace(0.0, max(top, 1.0), 101)
    taus = np.asarray(taus, float)
    with _seeded(seed):
        profiles, bands = library.create_performance_profile(
            score_dict, taus, reps=reps
        )
    return dict(
        taus=taus,
        profiles={k: np.asarray(v) for k, v in profiles.items()},
        lo={k: np.asarray(v)[0] for k, v in bands.items()},
        hi={k: np.asarray(v)[1] for k, v in bands.items()},
    )


def markdown_table(stats: Mapping[str, Mapping[str, float]], header: str) -> str:
    """A table of :func:`interval_estimates`' output."""
    lines = [
        f"| {header} | runs | IQM [95% CI] | median [95% CI] |",
        "|---|---:|---:|---:|",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['num_runs']} | {s['iqm']:.3g} [{s['iqm_lo']:.3g}, "
            f"{s['iqm_hi']:.3g}] | {s['median']:.3g} [{s['median_lo']:.3g}, "
            f"{s['median_hi']:.3g}] |"
        )
    return "\n".join(lines)
