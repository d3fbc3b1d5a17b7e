"""Variance of score-function, pathwise and measure-valued gradient estimators.

The toy of Mohamed, Rosca, Figurnov, Mnih 2020 (JMLR 21(132), "Monte Carlo Gradient
Estimation in Machine Learning"), section 3 and Figure 2: the variance of one-draw
estimates of grad_theta E_{N(x | mu, sigma^2)}[f(x; k)] at mu = sigma = 1, against k,
for f = (x - k)^2, exp(-k x^2), cos(k x). Library: ``rl_pg.score_function``.

    python experiments/score_function_toy.py --out runs/score_function_toy

Writes into --out (which must not exist, or be empty):

    variance.csv            cost,k,estimator,param,variance (exact, by quadrature)
    variance_<cost>.png     variance against k, panels d/dmu and d/dsigma, log scale
    convergence.csv/.png    |mean of n draws - exact gradient| and its standard error
    naive_vs_score.csv/.png the seed's warning: (1/n) sum f(x_i) grad p(x_i) converges
                            to the wrong number; (1/n) sum f(x_i) grad log p(x_i) to
                            the gradient
    config.json             arguments, grids and library versions

k grid: -3 to 10 in steps of 0.25 (53 values; includes -3, 0.5, 1, 5 and 10 exactly).
The exp cost has E[f] infinite for 1 + 2 k sigma^2 <= 0, so its rows with k <= -0.5 are
omitted; for -0.5 < k <= -0.25 (1 + 4 k sigma^2 <= 0) the gradient exists but every
estimator has infinite variance, written as ``inf`` (on this grid only k = -0.25).
"""

import argparse
import csv
import importlib.metadata
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np

from rl_pg import score_function as sf

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

MU = 1.0
SIGMA = 1.0
K_GRID = np.arange(-12, 41) / 4.0  # -3, -2.75, ..., 10: exact binary fractions
CONVERGENCE_CASES = (("square", 5.0), ("exp", 1.0), ("cos", 1.0))
NAIVE_CASE = ("square", 5.0)
COST_LABELS = {
    "square": r"$f(x;k)=(x-k)^2$",
    "exp": r"$f(x;k)=\exp(-kx^2)$",
    "cos": r"$f(x;k)=\cos(kx)$",
}
STYLES = {
    "score_function": dict(color="tab:blue", ls="-", marker="o"),
    "score_function_baseline": dict(color="tab:cyan", ls="--", marker="v"),
    "pathwise": dict(color="tab:red", ls="-", marker="s"),
    "measure_valued": dict(color="tab:green", ls="-", marker="^"),
    "measure_valued_coupled": dict(color="tab:olive", ls="--", marker="D"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=10**6,
        help="largest n for the convergence and naive-vs-score runs (default 10^6)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} exists and is not empty; refusing to overwrite")
    if args.num_samples < 10:
        parser.error("--num-samples must be at least 10")
    return args


def k_values(cost: str) -> np.ndarray:
    """The grid, less the k where E[f] is infinite (exp cost, 1 + 2 k sigma^2 <= 0)."""
    keep = [sf.expectation_defined(cost, k, sigma=SIGMA) for k in K_GRID]
    return K_GRID[np.array(keep)]


def variance_rows(cost: str) -> list[dict]:
    ks = k_values(cost)
    rows = []
    for estimator in sf.ESTIMATORS:
        variances = sf.estimator_variances(cost, ks, estimator, mu=MU, sigma=SIGMA)
        for k, pair in zip(ks, variances, strict=True):
            for param, variance in zip(sf.PARAMS, pair, strict=True):
                rows.append(
                    dict(
                        cost=cost,
                        k=float(k),
                        estimator=estimator,
                        param=param,
                        variance=float(variance),
                    )
                )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_variance(path: Path, cost: str, rows: list[dict]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    for ax, param in zip(axes, sf.PARAMS, strict=True):
        for estimator, style in STYLES.items():
            chosen = [
                r for r in rows if r["estimator"] == estimator and r["param"] == param
            ]
            ks = np.array([r["k"] for r in chosen])
            variance = np.array([r["variance"] for r in chosen])
            # Zero (k = 0: constant cost) and infinite variances cannot be drawn on a
            # log axis; leave gaps.
            variance = np.where(
                (variance > 0) & np.isfinite(variance), variance, np.nan
            )
            ax.plot(ks, variance, ms=3.5, lw=1.4, label=estimator, **style)
        if cost == "exp":
            ax.axvspan(-3, -0.5, color="0.85", label=r"$E[f]=\infty$ ($k\leq-1/2$)")
            ax.axvspan(
                -0.5, -0.25, color="0.93", label=r"variance $=\infty$ ($k\leq-1/4$)"
            )
        ax.set_yscale("log")
        ax.set_xlim(K_GRID[0], K_GRID[-1])
        ax.set_xlabel("k")
        ax.set_title(rf"$\partial/\partial\{param}$")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("variance of a one-draw estimate")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, fontsize=9)
    fig.suptitle(
        f"{COST_LABELS[cost]},  $x\\sim N(\\mu,\\sigma^2)$, $\\mu=\\sigma=1$ "
        "(exact, by quadrature; zero variance not drawn)"
    )
    fig.tight_layout(rect=(0, 0.12 if cost == "exp" else 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_sizes(num_samples: int) -> np.ndarray:
    sizes = np.logspace(1, math.log10(num_samples), 25).round().astype(np.int64)
    return np.unique(np.append(sizes, num_samples))


def convergence_rows(key: jax.Array, num_samples: int) -> list[dict]:
    rows = []
    case_keys = jax.random.split(key, len(CONVERGENCE_CASES))
    for (cost, k), key_case in zip(CONVERGENCE_CASES, case_keys, strict=True):
        estimator_keys = jax.random.split(key_case, len(sf.ESTIMATORS))
        for estimator, key_estimator in zip(sf.ESTIMATORS, estimator_keys, strict=True):
            result = sf.mean_convergence(
                estimator,
                cost,
                k,
                key=key_estimator,
                sample_sizes=sample_sizes(num_samples),
                mu=MU,
                sigma=SIGMA,
            )
            for i, n in enumerate(result.sample_sizes):
                for j, param in enumerate(sf.PARAMS):
                    rows.append(
                        dict(
                            cost=cost,
                            k=k,
                            estimator=estimator,
                            param=param,
                            n=int(n),
                            mean=result.mean[i, j],
                            abs_error=result.abs_error[i, j],
                            stderr=result.stderr[i, j],
                            analytic=result.analytic[j],
                        )
                    )
    return rows


def plot_convergence(path: Path, rows: list[dict]) -> None:
    fig, axes = plt.subplots(
        2, len(CONVERGENCE_CASES), figsize=(14, 7.5), sharex=True, squeeze=False
    )
    for col, (cost, k) in enumerate(CONVERGENCE_CASES):
        for row, param in enumerate(sf.PARAMS):
            ax = axes[row, col]
            for estimator, style in STYLES.items():
                chosen = [
                    r
                    for r in rows
                    if (r["cost"], r["estimator"], r["param"])
                    == (cost, estimator, param)
                ]
                n = np.array([r["n"] for r in chosen])
                error = np.array([r["abs_error"] for r in chosen])
                stderr = np.array([r["stderr"] for r in chosen])
                color = style["color"]
                ax.plot(n, error, color=color, lw=1.2, label=estimator)
                ax.plot(n, stderr, color=color, lw=1.0, ls=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(
                f"{COST_LABELS[cost]}, k={k:g}:  " + rf"$\partial/\partial\{param}$"
            )
            if row == 1:
                ax.set_xlabel("n (draws averaged)")
            if col == 0:
                ax.set_ylabel("|mean of n draws - exact|")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="k", ls=":", lw=1.0))
    labels.append("standard error (dotted, same colour)")
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(r"Monte Carlo error of the mean estimate, $\mu=\sigma=1$")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def naive_rows(
    key: jax.Array, num_samples: int
) -> tuple[list[dict], sf.NaiveComparison]:
    cost, k = NAIVE_CASE
    result = sf.naive_vs_score(
        cost, k, key=key, sample_sizes=sample_sizes(num_samples), mu=MU, sigma=SIGMA
    )
    rows = [
        dict(
            cost=cost,
            k=k,
            param=param,
            n=int(n),
            naive_mean=result.naive_mean[i, j],
            score_mean=result.score_mean[i, j],
            analytic=result.analytic[j],
            naive_limit=result.naive_limit[j],
        )
        for i, n in enumerate(result.sample_sizes)
        for j, param in enumerate(sf.PARAMS)
    ]
    return rows, result


def plot_naive(path: Path, result: sf.NaiveComparison) -> None:
    cost, k = NAIVE_CASE
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for j, (ax, param) in enumerate(zip(axes, sf.PARAMS, strict=True)):
        n = result.sample_sizes
        ax.plot(
            n,
            result.score_mean[:, j],
            color="tab:blue",
            marker="o",
            ms=3,
            label=r"$\frac{1}{n}\sum f(x_i)\,\nabla_\theta\log p(x_i)$",
        )
        ax.plot(
            n,
            result.naive_mean[:, j],
            color="tab:red",
            marker="s",
            ms=3,
            label=r"$\frac{1}{n}\sum f(x_i)\,\nabla_\theta p(x_i)$ (naive)",
        )
        ax.axhline(
            result.analytic[j],
            color="tab:blue",
            ls="--",
            lw=1,
            label=rf"$\nabla_\theta E_p[f]$ = {result.analytic[j]:.3f}",
        )
        ax.axhline(
            result.naive_limit[j],
            color="tab:red",
            ls="--",
            lw=1,
            label=rf"$E_p[f\,\nabla_\theta p]$ = {result.naive_limit[j]:.3f}",
        )
        ax.set_xscale("log")
        ax.set_xlabel("n")
        ax.set_title(rf"$\partial/\partial\{param}$")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(
        f"The seed's warning, {COST_LABELS[cost]}, k={k:g}, "
        r"$\mu=\sigma=1$: only the score-function average converges to the gradient"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(variances: list[dict], naive: sf.NaiveComparison) -> str:
    lines = ["variance of one-draw estimates at mu = sigma = 1 (d/dmu, d/dsigma):"]
    for cost, k in (("square", 5.0), ("exp", 1.0), ("cos", 5.0)):
        lines.append(f"  {cost}, k={k:g}:")
        for estimator in sf.ESTIMATORS:
            pair = [
                r["variance"]
                for r in variances
                if (r["cost"], r["k"], r["estimator"]) == (cost, k, estimator)
            ]
            lines.append(f"    {estimator:<24} {pair[0]:>11.4g} {pair[1]:>11.4g}")
    cost, k = NAIVE_CASE
    n = int(naive.sample_sizes[-1])
    lines.append(
        f"seed's warning, {cost} k={k:g}, n={n}: naive mean {naive.naive_mean[-1]} -> "
        f"E[f grad p] = {naive.naive_limit}; score-function mean "
        f"{naive.score_mean[-1]} -> grad E[f] = {naive.analytic}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(args.seed)
    key_convergence, key_naive = jax.random.split(key)

    variances = [row for cost in sf.COSTS for row in variance_rows(cost)]
    write_csv(args.out / "variance.csv", variances)
    for cost in sf.COSTS:
        plot_variance(
            args.out / f"variance_{cost}.png",
            cost,
            [r for r in variances if r["cost"] == cost],
        )

    convergence = convergence_rows(key_convergence, args.num_samples)
    write_csv(args.out / "convergence.csv", convergence)
    plot_convergence(args.out / "convergence.png", convergence)

    naive, naive_result = naive_rows(key_naive, args.num_samples)
    write_csv(args.out / "naive_vs_score.csv", naive)
    plot_naive(args.out / "naive_vs_score.png", naive_result)

    elapsed = time.perf_counter() - start
    config = dict(
        args=dict(out=str(args.out), num_samples=args.num_samples, seed=args.seed),
        mu=MU,
        sigma=SIGMA,
        k_grid=K_GRID.tolist(),
        exp_cost_k_omitted=[float(k) for k in K_GRID if k not in k_values("exp")],
        exp_cost_k_infinite_variance=[
            float(k)
            for k in k_values("exp")
            if not sf.second_moment_finite("exp", k, sigma=SIGMA)
        ],
        variance_method=(
            f"Gauss quadrature in float64, {sf.NUM_NODES} Gauss-Hermite nodes, "
            f"cross-checked against {round(0.8 * sf.NUM_NODES)} nodes to relative "
            f"{sf.VARIANCE_RTOL}"
        ),
        convergence_cases=[list(case) for case in CONVERGENCE_CASES],
        naive_case=list(NAIVE_CASE),
        versions=dict(
            python=platform.python_version(),
            jax=jax.__version__,
            jaxlib=importlib.metadata.version("jaxlib"),
            numpy=np.__version__,
            matplotlib=matplotlib.__version__,
        ),
        elapsed_seconds=round(elapsed, 1),
    )
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(summary(variances, naive_result))
    print(f"wrote {args.out} in {elapsed:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
