"""Coverage of the study's 95% intervals against exact answers (the calibration).

Runs the exact mode (`rl-pg variance --problem enumerable`: the enumerable MDP, G = 4,
three policies, batch sizes 4, 16, 64) with ``--seeds`` independent seeds and
counts, per metric and per estimator, how often the interval holds the exact value.
A calibrated 95% interval covers in 95% +- 2 sqrt(0.95 0.05 / K) of K independent
repeats (rows of one seed share trajectories across batch sizes, so K is between
the number of seeds x policies and the number of rows). Writes ``coverage.csv``
and ``coverage.md``.

    python experiments/calibration.py --out runs/calibration --seeds 20
"""

import argparse
import time

from rl_pg import io
from rl_pg.variance import exact, job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    out = io.new_out_dir(args.out)
    io.write_config(out, {"script": "calibration", **vars(args)})
    start = time.perf_counter()
    rows = exact.calibration_rows(
        range(args.seeds),
        job.ENUMERABLE_STUDY,
        progress=lambda s: print(f"seed {s} done, {time.perf_counter() - start:.0f} s"),
    )
    lines = ["metric,estimator,covered,intervals,coverage"]
    table = ["| estimator | " + " | ".join(exact.EXACT_METRICS) + " |"]
    table.append("|---" * (1 + len(exact.EXACT_METRICS)) + "|")
    estimators = ["all"] + sorted({r["estimator"] for r in rows})
    for name in estimators:
        sub = rows if name == "all" else [r for r in rows if r["estimator"] == name]
        cov = exact.coverage(sub)
        cells = []
        for m, (hits, known) in cov.items():
            if known:
                lines.append(f"{m},{name},{hits},{known},{hits / known:.4f}")
                cells.append(f"{hits / known:.1%} ({known})")
            else:
                cells.append("")
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    io.atomic_write_bytes(out / "coverage.csv", ("\n".join(lines) + "\n").encode())
    text = (
        f"Coverage of the 95% intervals, {args.seeds} seeds x 3 policies x 3 batch "
        f"sizes, exact mode; {time.perf_counter() - start:.0f} s.\n\n"
        + "\n".join(table)
        + "\n"
    )
    io.atomic_write_bytes(out / "coverage.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
