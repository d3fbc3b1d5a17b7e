"""The estimator-variance benchmark as a job: presets, outputs, plots, report.

``rl-pg variance --preset quick|full --out DIR`` runs :mod:`rl_pg.variance` on
policies at several training stages and writes ``results.csv``,
``per_trajectory.csv``, ``report.md``, ``config.json`` and plots.
"""

import csv
import dataclasses
import time
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rl_pg
from rl_pg import checkpoint, io, policies, variance

PRESETS = {
    "quick": dict(
        study=variance.StudyConfig(
            batch_sizes=(4, 16, 64),
            num_batches=32,
            reference_trajectories=16_384,
            chunk=1024,
            steps_per_call=2**14,
            num_bootstrap=200,
        ),
        horizon=128,
        group_size=4,
    ),
    "full": dict(
        study=variance.StudyConfig(
            batch_sizes=(4, 16, 64, 256, 1024),
            num_batches=256,
            reference_trajectories=131_072,
            chunk=2048,
            steps_per_call=2**14,
            num_bootstrap=1000,
        ),
        horizon=256,
        group_size=4,
    ),
}
STAGES = ("initial", "partial", "good")
RESULT_COLUMNS = (
    ["checkpoint", "estimator", "batch_size", "num_batches"]
    + list(variance.METRICS)
    + [f"{m}_{s}" for m in variance.METRICS for s in ("lo", "hi")]
    + ["bias2_noise"]
)


def shipped_checkpoints() -> list[Path]:
    """The policies shipped with rl_pg (initial, partly trained, good), if present."""
    root = resources.files("rl_pg") / "checkpoints"
    found = [Path(str(root / s)) for s in STAGES]
    return [p for p in found if (p / checkpoint.META_FILE).is_file()]


def _initial_policy():
    env_id = "FlappyBird-v0"
    env, env_params = rl_pg.make(env_id)
    policy = policies.mlp_policy(2)
    params = policy.init(
        jax.random.PRNGKey(0), jnp.zeros(env.observation_space(env_params).shape)
    )
    return "initial", policy, params, env, env_params


def load_stages(paths: list[str | Path] | None):
    """(name, policy, params, env, env_params) per stage; validates before compiling."""
    if paths:
        stages = []
        for path in paths:
            policy, params, env, env_params, _ = checkpoint.load_policy(path)
            stages.append((Path(path).name, policy, params, env, env_params))
    else:
        shipped = shipped_checkpoints()
        if shipped:
            stages = [
                (p.name, *_without_meta(checkpoint.load_policy(p))) for p in shipped
            ]
        else:
            stages = [_initial_policy()]
    envs = {(type(s[3]), s[3].obs_mode) for s in stages}
    if len(envs) > 1:
        raise ValueError("all checkpoints must act in the same environment")
    return stages


def _without_meta(loaded):
    policy, params, env, env_params, _ = loaded
    return policy, params, env, env_params


def run(
    preset: str,
    out_dir: str | Path,
    checkpoints: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Run the study and write every output into a new directory."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    setting = PRESETS[preset]
    study = dataclasses.replace(setting["study"], seed=seed)
    stages = load_stages(checkpoints)
    out = io.new_out_dir(out_dir)
    start = time.perf_counter()
    policy, _, env, env_params = stages[0][1:]
    problem = variance.flappy_problem(
        policy.apply, env, env_params, setting["horizon"], setting["group_size"]
    )
    runners = variance.make_runners(problem, study)
    io.write_config(
        out,
        {
            "command": "variance",
            "preset": preset,
            "checkpoints": [s[0] for s in stages],
            "horizon": setting["horizon"],
            "group_size": setting["group_size"],
            "study": dataclasses.asdict(study),
            "env": env.name,
        },
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = variance.total_work(study, len(stages))
        bar = tqdm(total=total, unit="traj", desc="variance study")
    results = {}
    for name, _, params, _, _ in stages:
        if bar is not None:
            bar.set_postfix_str(name)
        results[name] = variance.study_stage(
            params, runners, study, setting["horizon"], bar.update if bar else None
        )
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    matmul = variance.matmul_flops_per_s()
    write_outputs(out, results, study, wall, matmul)
    return out


def write_outputs(out: Path, results: dict, study, wall: float, matmul: float) -> None:
    rows = [
        {"checkpoint": name, **row} for name, res in results.items() for row in res.rows
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "per_trajectory.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "estimator", "variance_per_trajectory"])
        for name, res in results.items():
            for label, value in res.per_trajectory.items():
                writer.writerow([name, label, value])
    perf = {
        name: {**res.perf, "matmul_flops_per_s": matmul}
        for name, res in results.items()
    }
    io.write_json(out / "performance.json", {"wall_clock_s": wall, "stages": perf})
    plot(out, results)
    (out / "report.md").write_text(report(results, study, wall, matmul))


def plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    estimators = list(dict.fromkeys(r["estimator"] for r in results[names[0]].rows))
    cmap = plt.get_cmap("tab20")
    colors = {e: cmap(i % 20) for i, e in enumerate(estimators)}
    for metric, ylabel, fname, log in (
        ("variance", "tr Cov(g_hat)", "variance_vs_batch_size.png", True),
        ("cos_true", "cos(g_hat, g)", "cosine_vs_batch_size.png", False),
    ):
        fig, axes = plt.subplots(
            1, len(names), figsize=(5 * len(names) + 2, 4.5), squeeze=False
        )
        for ax, name in zip(axes[0], names, strict=True):
            rows = results[name].rows
            for e in estimators:
                sel = [r for r in rows if r["estimator"] == e]
                n = np.array([r["batch_size"] for r in sel])
                y = np.array([r[metric] for r in sel])
                lo = np.array([r[f"{metric}_lo"] for r in sel])
                hi = np.array([r[f"{metric}_hi"] for r in sel])
                ax.plot(n, y, "o-", color=colors[e], label=e, ms=3)
                ax.fill_between(n, lo, hi, color=colors[e], alpha=0.15)
            if log:
                ax.set_yscale("log")
                first = [r for r in rows if r["estimator"] == "reinforce"]
                if first:
                    n0, v0 = first[0]["batch_size"], first[0]["variance"]
                    grid = np.array([r["batch_size"] for r in first])
                    ax.plot(grid, v0 * n0 / grid, "k--", lw=1, label="1/n")
            else:
                ax.set_ylim(-0.1, 1.0)
                ax.axhline(0, color="gray", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size n (trajectories)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name}: |g| = {results[name].reference_norm:.3g}")
            ax.grid(alpha=0.3)
        axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def report(results: dict, study, wall: float, matmul: float) -> str:
    lines = [
        "# Policy-gradient estimator study",
        "",
        f"{len(results)} policies, batch sizes {list(study.batch_sizes)}, "
        f"{study.num_batches} batches each, reference gradient from "
        f"{study.reference_trajectories} trajectories (REINFORCE with the mean-return "
        "baseline). "
        f"Wall-clock {wall:.0f} s. Plots: `variance_vs_batch_size.png`, "
        "`cosine_vs_batch_size.png`.",
        "",
    ]
    largest = max(study.batch_sizes)
    for name, res in results.items():
        lines += [
            f"## {name}",
            "",
            f"Mean return {res.mean_return:.2f}; |g| = {_fmt(res.reference_norm)} "
            f"(standard error {_fmt(res.reference_se)}).",
            "",
            "| estimator | n | bias2 (noise) | variance | cos to g | pairwise cos | SNR |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res.rows:
            if r["batch_size"] in (min(study.batch_sizes), largest):
                lines.append(
                    f"| {r['estimator']} | {r['batch_size']} | {_fmt(r['bias2'])} "
                    f"({_fmt(r['bias2_noise'])}) | {_fmt(r['variance'])} | "
                    f"{r['cos_true']:.3f} [{r['cos_true_lo']:.3f}, {r['cos_true_hi']:.3f}] "
                    f"| {r['cos_pairwise']:.3f} | {_fmt(r['snr'])} |"
                )
        at_largest = [r for r in res.rows if r["batch_size"] == largest]
        best = max(at_largest, key=lambda r: r["cos_true"])
        worst = min(at_largest, key=lambda r: r["cos_true"])
        biased = [
            r["estimator"] for r in at_largest if r["bias2_lo"] > 3 * r["bias2_noise"]
        ]
        base = next(r for r in at_largest if r["estimator"] == "reinforce")
        lines += [
            "",
            f"At n = {largest}, {best['estimator']} points closest to the true gradient "
            f"(mean cosine {best['cos_true']:.2f}) and {worst['estimator']} furthest "
            f"({worst['cos_true']:.2f}); vanilla REINFORCE reaches {base['cos_true']:.2f}. "
            + (
                f"Bias clearly above the noise floor: {', '.join(biased)}."
                if biased
                else "No estimator shows bias above the noise floor."
            ),
            "",
            "Per-trajectory variance tr Var[g_1] (an i.i.d. batch of n has 1/n of it):",
            "",
            "| estimator / baseline | per-trajectory variance | relative to REINFORCE |",
            "|---|---:|---:|",
        ]
        ref = res.per_trajectory["reinforce (b = 0)"]
        for label, value in res.per_trajectory.items():
            lines.append(f"| {label} | {_fmt(value)} | {value / ref:.3f} |")
        iid = [
            (r["batch_size"], r["variance"] * r["batch_size"] / ref)
            for r in res.rows
            if r["estimator"] == "reinforce"
        ]
        lines += [
            "",
            "REINFORCE batch variance x n / per-trajectory variance (1 for i.i.d. "
            "batches; above 1 when the G rollouts of a level are correlated): "
            + ", ".join(f"n={n}: {ratio:.2f}" for n, ratio in iid)
            + ".",
            "",
        ]
    perf = next(iter(results.values())).perf
    lines += [
        "## Performance",
        "",
        f"Gradient phase: {perf['trajectory_gradients_per_s']:,.0f} trajectory "
        f"gradients/s, {perf['gradient_flops_per_s'] / 1e9:.2f} GFLOP/s = "
        f"{perf['gradient_flops_per_s'] / matmul:.1%} of a same-run 1024x1024 float32 "
        f"matmul ({matmul / 1e9:.1f} GFLOP/s).",
        "",
    ]
    return "\n".join(lines)
