"""Coverage and width of the study's 95% intervals against exact answers.

Runs the exact mode (`rl-pg variance --problem enumerable`: the enumerable MDP, G = 4,
three policies) for ``--seeds`` seeds. Every (seed, policy, batch size) is its own
study with its own key (``exact.calibration_seed``: fold_in of seed, policy, size),
so the K = seeds x policies x sizes rows of an estimator are independent repeats.
Per metric and estimator it reports the coverage p with its standard error
sqrt(p (1 - p) / K) (a calibrated interval: 0.95 +- 2 s.e.), the misses below /
above, and each side's median half-width over the point estimate's standard
deviation across seeds (per policy and size, over the seeds whose point and
interval are finite: an ``inf`` rel_variance has no width; the median over cells,
with its bootstrap s.e. over seeds, and the worst cell), the intervals not
reported (n/a) and, for cosines, the reported intervals outside [-1, 1].
Truths: exact values (bias2, variance, mse, snr, rel_variance, cos_mean); for
cos_true and cos_pairwise, the mean of the other seeds' points (unbiased for
cos_pairwise; for cos_true up to the reference's O(se_ref^2) bias). Writes
``coverage.csv`` and ``coverage.md``.

    nice python experiments/calibration.py --out runs/calibration --seeds 40
"""

import argparse
import time

import numpy as np

from rl_pg import io
from rl_pg.variance import exact, problems, study

METRICS = exact.EXACT_METRICS + ("cos_true", "cos_pairwise")
NAMES = ("reinforce", "reward_to_go", "constant_baseline", "mean_baseline", "rloo")
NAMES += ("optimal_baseline", "value_baseline", "gae", "dr_grpo")
CONFIG = study.StudyConfig(
    batch_sizes=(4, 16),
    num_batches=64,
    max_batches_per_size=64,
    reference_trajectories=2**12,
    reference_groups=32,
    chunk=2**12,
    suite=problems.SuiteConfig(names=NAMES),
)


def _truths(cell: list[dict], m: str) -> np.ndarray:
    if m in exact.EXACT_METRICS:
        return np.array([r.get(f"exact_{m}", np.nan) for r in cell])
    points = np.array([r[m] for r in cell])
    return (np.nansum(points) - points) / (np.sum(np.isfinite(points)) - 1)


def measure(rows: list[dict], metric: str, estimator: str) -> dict | None:
    """Coverage (with s.e.), misses and half-width ratios of one metric's rows."""
    cells = {}
    for r in rows:
        if r["estimator"] == estimator:
            cells.setdefault((r["checkpoint"], r["batch_size"]), []).append(r)
    cov, below, above, widths, ends = [], 0, 0, [], []
    for cell in cells.values():
        truth = _truths(cell, metric)
        if not np.all(np.isfinite(truth)):
            continue
        point = np.array([r[metric] for r in cell])
        lo = np.array([r[f"{metric}_lo"] for r in cell])
        hi = np.array([r[f"{metric}_hi"] for r in cell])
        cov.append((lo <= truth) & (truth <= hi))  # an n/a interval is a miss
        ends.append((lo, hi))
        below, above = below + np.sum(truth < lo), above + np.sum(truth > hi)
        finite = np.isfinite(point) & np.isfinite(lo) & np.isfinite(hi)
        if finite.sum() >= 3:  # widths over the seeds with a finite interval
            widths.append((point[finite], lo[finite], hi[finite]))
    if not cov:
        return None
    hits = np.concatenate(cov)
    p, k = float(hits.mean()), len(hits)
    lower, upper = _width_ratios(widths)
    lo, hi = (np.concatenate(side) for side in zip(*ends, strict=True))
    finite = np.isfinite(lo) & np.isfinite(hi)
    return {
        "metric": metric,
        "estimator": estimator,
        "intervals": k,
        "coverage": p,
        "se": float(np.sqrt(p * (1 - p) / k)),
        "below": int(below),
        "above": int(above),
        **{f"lower_width_{s}": v for s, v in lower.items()},
        **{f"upper_width_{s}": v for s, v in upper.items()},
        # intervals not reported (n/a: e.g. a cosine of a mean estimate that is
        # indistinguishable from 0), and reported cosine intervals outside [-1, 1]
        "not_reported": int(np.sum(~finite)),
        "cos_outside": int(np.sum(finite & ((lo < -1) | (hi > 1))))
        if metric.startswith("cos")
        else 0,
    }


def _width_ratios(widths: list, draws: int = 400) -> tuple[dict, dict]:
    """Each side's median half-width over the points' s.d., per cell: the median
    over cells with its bootstrap s.e. (seeds resampled within each cell), and
    the worst cell."""
    if not widths:
        nan = {"median": np.nan, "median_se": np.nan, "max": np.nan}
        return nan, dict(nan)

    def ratios(point, lo, hi):
        sd = np.std(point, ddof=1, axis=-1)
        return (
            np.median(point - lo, axis=-1) / sd,
            np.median(hi - point, axis=-1) / sd,
        )

    rng = np.random.default_rng(0)
    full = np.array([ratios(*w) for w in widths])  # [cells, side]
    boot = []
    for w in widths:
        idx = rng.integers(0, len(w[0]), (draws, len(w[0])))
        boot.append(ratios(*(x[idx] for x in w)))  # [side, draws]
    boot_median = np.median(np.array(boot), axis=0)  # [side, draws]
    return tuple(
        {
            "median": float(np.median(full[:, side])),
            "median_se": float(np.std(boot_median[side], ddof=1)),
            "max": float(np.max(full[:, side])),
        }
        for side in (0, 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed .. + seeds - 1"
    )
    args = parser.parse_args()
    if args.seeds < 3:
        raise SystemExit(f"--seeds must be >= 3, got {args.seeds}")
    out = io.new_out_dir(args.out)
    io.write_config(out, {"script": "calibration", **vars(args)})
    start = time.perf_counter()
    rows = exact.calibration_rows(
        range(args.first_seed, args.first_seed + args.seeds),
        CONFIG,
        progress=lambda s: print(f"seed {s} done, {time.perf_counter() - start:.0f} s"),
    )
    results = measure_all(rows, NAMES)
    title = (
        f"95% intervals, {args.seeds} seeds (from {args.first_seed}) x 3 policies x batch sizes "
        f"{CONFIG.batch_sizes} (M = {CONFIG.num_batches}), independent keys, exact "
        f"mode; {time.perf_counter() - start:.0f} s."
    )
    print(write_tables(out, results, title))


def measure_all(rows: list[dict], names) -> list[dict]:
    """:func:`measure` of every metric and estimator that has truths."""
    return [r for m in METRICS for e in names if (r := measure(rows, m, e)) is not None]


def write_tables(out, results: list[dict], title: str) -> str:
    """Write ``coverage.csv`` and ``coverage.md`` (``title``, then the table);
    return the markdown."""
    keys = list(results[0])
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in results]
    io.atomic_write_bytes(out / "coverage.csv", ("\n".join(lines) + "\n").encode())
    table = [
        "| metric | estimator | K | coverage +- s.e. | below/above | "
        "lower hw / sd (med +- s.e., max) | upper hw / sd (med +- s.e., max) | "
        "n/a | cos outside |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sides = [
            f"{r[f'{s}_width_median']:.2f} +- {r[f'{s}_width_median_se']:.2f}, "
            f"{r[f'{s}_width_max']:.2f}"
            for s in ("lower", "upper")
        ]
        table.append(
            f"| {r['metric']} | {r['estimator']} | {r['intervals']} | "
            f"{r['coverage']:.3f} +- {r['se']:.3f} | {r['below']}/{r['above']} | "
            f"{sides[0]} | {sides[1]} | {r['not_reported'] or ''} | "
            f"{r['cos_outside'] if r['metric'].startswith('cos') else ''} |"
        )
    text = title + "\n\n" + "\n".join(table) + "\n"
    io.atomic_write_bytes(out / "coverage.md", text.encode())
    return text


if __name__ == "__main__":
    main()
