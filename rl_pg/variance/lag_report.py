"""The policy-lag study's outputs (:mod:`rl_pg.variance.lag_study`).

``write`` writes ``results.csv`` (the study's columns plus :data:`LAG_COLUMNS`),
``staleness.csv`` (one row per behaviour/target pair), ``vs_staleness.png``
(+ .pdf, .svg), ``performance.json`` and ``report.md``: the staleness table, at
each KL the estimator with the lowest relative MSE (mse / ||g||^2, g the target's
reference gradient), and the KL at which each biased estimator's bias2 overtakes
its variance, every figure with its 95% interval.
"""

import csv
import io as _io
import math
from pathlib import Path

import numpy as np

from rl_pg import estimators as estimators_lib
from rl_pg import figures, io
from rl_pg.variance import report

LAG_COLUMNS = [
    "target",
    "lag_level",
    "lag_kl",
    "ess",
    "ess_step",
    "max_ratio",
    "clip_fraction",
    "reference_norm2",
]
STALENESS_COLUMNS = [
    "checkpoint",
    "target",
    "lag_level",
    "lag_kl",
    "search_kl",
    "step",
    "max_ratio",
    "ess",
    "ess_step",
    "batch_size",
    "reference_norm",
    "mean_return",
]


def columns(with_checkpoints: bool) -> list[str]:
    """results.csv's columns (``lag_checkpoints`` after ``lag_kl`` with --run)."""
    lag = list(LAG_COLUMNS)
    if with_checkpoints:
        lag.insert(lag.index("lag_kl") + 1, "lag_checkpoints")
    return list(report.RESULT_COLUMNS) + lag


def _csv(header: list[str], rows: list[dict]) -> bytes:
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[r.get(c, "") for c in header] for r in rows])
    return buffer.getvalue().encode()


def result_rows(results) -> list[dict]:
    """Every row of every point, with its behaviour's label as ``checkpoint``."""
    return [
        {"checkpoint": res.point.behaviour.label, **row}
        for res in results
        for row in res.rows
    ]


def write(out: Path, results, job, wall: float, search_seconds: float) -> None:
    """Write the lag study's files into ``out``."""
    rows = result_rows(results)
    with_k = job.lag_checkpoints is not None
    io.atomic_write_bytes(out / "results.csv", _csv(columns(with_k), rows))
    staleness = [r.staleness for r in results]
    io.atomic_write_bytes(out / "staleness.csv", _csv(STALENESS_COLUMNS, staleness))
    plot(out / "vs_staleness.png", rows, with_k)
    text = lag_text(rows, staleness, job, wall)
    io.atomic_write_bytes(out / "report.md", text.encode())
    io.write_json(
        out / "performance.json",
        {"wall_clock_s": wall, "target_search_s": search_seconds},
    )


def _rescaled(name: str) -> bool:
    spec = estimators_lib.REGISTRY.get(name)
    return bool(spec and spec.rescaled)


def plot(path: Path, rows: list[dict], with_k: bool) -> None:
    """vs_staleness.png (.pdf, .svg): :func:`rl_pg.figures.staleness_figure`."""
    rescaled = frozenset(r["estimator"] for r in rows if _rescaled(r["estimator"]))
    fig = figures.staleness_figure(rows, with_k, rescaled)
    figures.save(fig, path, figures.FORMATS)
    figures.pyplot().close(fig)


# ------------------------------------------------------------------ report


def _g(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3g}"  # inf stays inf


def _rel(r: dict, metric: str = "mse") -> str:
    n2 = r["reference_norm2"] if r["reference_norm2"] > 0 else math.nan
    return (
        f"{_g(r[metric] / n2)} [{_g(r[metric + '_lo'] / n2)}, "
        f"{_g(r[metric + '_hi'] / n2)}]"
    )


def staleness_lines(staleness: list[dict]) -> list[str]:
    """The staleness table (markdown)."""
    lines = [
        "| behaviour | target | KL level | KL(mu||pi) | max ratio | ESS traj | "
        "ESS step | step alpha |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in staleness:
        lines.append(
            f"| {s['checkpoint']} | {s['target']} | {_g(s['lag_level'])} | "
            f"{_g(s['lag_kl'])} | {_g(s['max_ratio'])} | {s['ess']:.1f} / "
            f"{s['batch_size']} | {s['ess_step']:.0f} | {_g(s['step'])} |"
        )
    return lines


def best_lines(rows: list[dict], key: str) -> list[str]:
    """At each (stage, KL): the non-rescaled estimator with the lowest relative
    MSE at the largest batch size, with its interval."""
    largest = max(r["batch_size"] for r in rows)
    lines = []
    groups: dict = {}
    for r in rows:
        if r["batch_size"] == largest and not _rescaled(r["estimator"]):
            groups.setdefault((r["checkpoint"], r[key]), []).append(r)
    for (stage, kl), found in groups.items():
        best = min(found, key=lambda r: r["mse"] if math.isfinite(r["mse"]) else np.inf)
        lines.append(
            f"- {stage}, KL {_g(kl)}: **{best['estimator']}**, relative MSE "
            f"{_rel(best)}"
        )
    return lines


def crossover_lines(rows: list[dict], key: str) -> list[str]:
    """For each biased, non-rescaled estimator and stage: the first KL at which
    bias2 exceeds the variance (at the largest batch size), with both intervals;
    "significantly" when bias2's lower bound clears the variance's upper one."""
    largest = max(r["batch_size"] for r in rows)
    lines = []
    biased = [
        e
        for e in dict.fromkeys(r["estimator"] for r in rows)
        if not _rescaled(e) and not _unbiased(e)
    ]
    for stage in dict.fromkeys(r["checkpoint"] for r in rows):
        for e in biased:
            mine = sorted(
                (r for r in rows if r["checkpoint"] == stage and r["estimator"] == e
                 and r["batch_size"] == largest),
                key=lambda r: r[key],
            )  # fmt: skip
            over = [r for r in mine if r["bias2"] > r["variance"]]
            if not over:
                lines.append(f"- {stage}, {e}: not within the KLs studied")
                continue
            r = over[0]
            sure = r["bias2_lo"] > r["variance_hi"]
            lines.append(
                f"- {stage}, {e}: KL {_g(r[key])} (bias2 {_g(r['bias2'])} "
                f"[{_g(r['bias2_lo'])}, {_g(r['bias2_hi'])}] > variance "
                f"{_g(r['variance'])} [{_g(r['variance_lo'])}, {_g(r['variance_hi'])}]"
                f"{', significantly' if sure else ', intervals overlap'})"
            )
    return lines


def _unbiased(name: str) -> bool:
    spec = estimators_lib.REGISTRY.get(name)
    return bool(spec and spec.unbiased_off_policy)


def lag_text(rows: list[dict], staleness: list[dict], job, wall: float) -> str:
    """report.md of the lag study."""
    key = "lag_kl" if job.lag_checkpoints is not None else "lag_level"
    largest = max(r["batch_size"] for r in rows)
    how = (
        f"behaviour checkpoint t, target checkpoint t + {job.lag_checkpoints}"
        if job.lag_checkpoints is not None
        else "targets theta = mu + alpha d along PPO's first-epoch direction d, "
        "alpha found for each KL level"
    )
    lines = [
        "# Estimators under policy lag",
        "",
        f"Data from the behaviour mu (each stage), gradient wanted at the target "
        f"pi_theta ({how}); the truth is the on-policy gradient of J at the target "
        f"(reference sample from pi_theta). {len(staleness)} pairs in {wall:.1f} s.",
        "",
        "## Staleness",
        "",
        f"KL(mu||pi): mean per-step KL on mu's states over the study's batches; ESS "
        f"(Kish) of the trajectory weights per batch of {largest} and of the per-step "
        "weights; max ratio over all batches.",
        "",
        *staleness_lines(staleness),
        "",
        f"## Lowest relative MSE (mse / |g|^2, n = {largest}, 95% interval)",
        "",
        "Rescaled estimators (PPO, GRPO, GSPO, CISPO: not on grad J's scale) are "
        "compared by cosine only (vs_staleness.png).",
        "",
        *best_lines(rows, key),
        "",
        f"## Where bias2 overtakes variance (n = {largest})",
        "",
        *crossover_lines(rows, key),
        "",
        "vs_staleness.png: relative MSE and cosine to the true gradient against KL.",
        "",
    ]
    return "\n".join(lines)
