"""Coverage and width of the policy-lag study's 95% intervals against exact answers.

The lag study in exact mode (`rl-pg variance --problem enumerable --lag-kl ...`:
the enumerable MDP, G = 4, three behaviour policies mu, each moved to targets
pi_theta at the given KL levels once, from ``--target-seed``). Every (seed, mu,
target) is then its own study with its own key (``exact.calibration_seed``), so
the rows of a cell (mu, target, n) are ``--seeds`` independent repeats (the
n = 4 and n = 16 rows of one study share its sample, so the s.e. of a coverage
pooled over both sizes, which counts every row, is optimistic by up to sqrt(2)). Truths:
the exact mean of each per-trajectory estimator on mu's data and its exact batch
variance (``lag_study.exact_lag_values``) against the exact gradient at the
target; for cos_true and cos_pairwise the mean of the other seeds' points.
Coverage and half-widths as in ``experiments/calibration.py`` (whose ``measure``
this uses). Writes ``coverage.csv`` and ``coverage.md``.

    nice python experiments/lag_calibration.py --out runs/lag_calibration --seeds 40
"""

import argparse
import time

from calibration import measure_all, write_tables

from rl_pg import io
from rl_pg.variance import exact, job, lag_study, runners, stages

LEVELS = (0.01, 0.1)


def lag_job(levels: tuple[float, ...], target_seed: int) -> job.VarianceJob:
    """The exact lag study at the calibration's sizes (n = 4, 16; M = 64)."""
    return job.preset(
        "quick",
        problem="enumerable",
        lag_kl=levels,
        seed=target_seed,
        sizes={"batch_sizes": (4, 16), "num_batches": 64},
    )


def calibration_rows(the_job, seeds, progress=None) -> list[dict]:
    """Rows of every (seed, mu, target) study; ``checkpoint`` names mu/target."""
    found = stages.job_stages(the_job)
    built = runners.shared_runners(found[0].problem, the_job.study)
    found = [s._replace(problem=built.problem) for s in found]
    points = lag_study.lag_points(the_job, found)
    rows = []
    for seed in seeds:
        for i, point in enumerate(points):
            one = the_job.replace(seed=exact.calibration_seed(seed, i, 0))
            result = lag_study.study_point(point, built, one)
            for r in result.rows:
                r["checkpoint"] = f"{point.behaviour.label}/{point.target_label}"
                rows.append(r)
        if progress:
            progress(seed)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed .. + seeds - 1"
    )
    parser.add_argument("--lag-kl", default=",".join(map(str, LEVELS)))
    parser.add_argument("--target-seed", type=int, default=0)
    args = parser.parse_args()
    if args.seeds < 3:
        raise SystemExit(f"--seeds must be >= 3, got {args.seeds}")
    levels = tuple(float(x) for x in args.lag_kl.split(","))
    the_job = lag_job(levels, args.target_seed)  # bad levels fail here
    out = io.new_out_dir(args.out)
    io.write_config(out, {"script": "lag_calibration", **vars(args)})
    start = time.perf_counter()
    rows = calibration_rows(
        the_job,
        range(args.first_seed, args.first_seed + args.seeds),
        progress=lambda s: print(f"seed {s} done, {time.perf_counter() - start:.0f} s"),
    )
    results = measure_all(rows, the_job.study.suite.names)
    title = (
        f"Policy lag: 95% intervals, {args.seeds} seeds (from {args.first_seed}) x 3 behaviour policies x KL "
        f"{levels} x batch sizes {the_job.study.batch_sizes} "
        f"(M = {the_job.study.num_batches}), independent keys, exact mode; "
        f"{time.perf_counter() - start:.0f} s."
    )
    print(write_tables(out, results, title))


if __name__ == "__main__":
    main()
