"""The study's outputs, each written once from in-memory results.

``write(out, results)`` writes ``results.csv``, ``slopes.csv``,
``per_trajectory.csv``, ``performance.json``, the figures of
:mod:`rl_pg.figures` as PNG, PDF and SVG (``rel_variance_vs_batch_size``,
``variance_vs_batch_size``, ``cosine_vs_batch_size``, ``along_training`` for
several checkpoints with env steps), ``decomposition.csv``/``.png`` when the job
decomposed, and ``report.md``: every setting a reader needs, the results, a
WARNING for each of its own checks that failed, and the list of files written.
:func:`read_results` reads ``results.csv`` back.
"""

import csv
import io as _io
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rl_pg import figures, io
from rl_pg.variance import decomposition, exact, problems, runners, statistics
from rl_pg.variance.problems import suite_specs
from rl_pg.variance.study import StageResult, StudyConfig

RESULT_COLUMNS = (
    ["checkpoint", "estimator", "batch_size", "num_batches"]
    + list(statistics.METRICS)
    + [f"{m}_{s}" for m in statistics.METRICS for s in ("lo", "hi")]
    + ["bias2_noise", "se_ref"]
    + [f"exact_{m}" for m in exact.EXACT_METRICS]
)
DECOMPOSITION_COLUMNS = [
    "checkpoint",
    "estimator",
    "component",
    "variance",
    "variance_lo",
    "variance_hi",
    "exact_variance",
]


class Decomposition(NamedTuple):
    """The decomposition step's rows (every stage), sizes and seconds."""

    rows: list[dict]
    sizes: dict
    seconds: float
    no_critic: tuple = ()  # labels of the stages without critic (rows left out)


class JobResults(NamedTuple):
    """Everything a study run wrote about, in memory."""

    stages: dict[str, StageResult]  # label -> the stage's study
    config: StudyConfig
    wall: float  # seconds of the study (decomposition excluded)
    matmul: float  # same-run matmul FLOP/s
    exact_mode: bool = False
    env_steps: dict | None = None  # label -> env steps of its checkpoint
    decomposition: Decomposition | None = None
    job: Any = None  # the VarianceJob (its settings go into the report)
    devices: str = ""  # where it ran, in words
    left_out: dict | None = None  # label -> estimators left out (no critic)
    no_critic: tuple = ()  # labels of the stages whose policy has no critic


def write(out: Path, results: JobResults) -> list[str]:
    """Write every output file of a study run into ``out``, each once; returns
    the names of the files in ``out`` (``config.json``, if the caller wrote it,
    and every file written here, ``report.md`` last), which ``report.md`` lists."""
    written = ["config.json"] if (out / "config.json").is_file() else []
    written += _write_tables(out, results.stages)
    written += _write_figures(out, results)
    perf = {
        name: {**res.perf, "matmul_flops_per_s": results.matmul}
        for name, res in results.stages.items()
    }
    performance = {"wall_clock_s": results.wall, "stages": perf}
    job = results.job
    text = report(
        results.stages, results.config, results.wall, results.matmul,
        results.exact_mode, settings=settings_lines(results),
        context={"horizon": job.horizon if job else None,
                 "left_out": results.left_out or {},
                 "no_critic": results.no_critic},
    )  # fmt: skip
    found = results.decomposition
    if found is not None:
        written += _write_decomposition(out, found.rows)
        text += decomposition_report(
            found.rows, found.sizes, found.seconds, results.exact_mode, found.no_critic
        )
        performance["decomposition_seconds"] = found.seconds
    io.write_json(out / "performance.json", performance)
    written += ["performance.json", "report.md"]
    text += _files_lines(written)
    io.atomic_write_bytes(out / "report.md", text.encode())
    return written


def settings_lines(results: JobResults) -> list[str]:
    """report.md's Settings section: everything needed to read (and redo) the
    study; the estimators with the hyperparameters they were studied with."""
    job, config = results.job, results.config
    if job is None:
        return []
    rows = [
        ("problem, preset", f"{job.problem}, {job.preset or 'none (sizes given)'}"),
        ("horizon H", f"{job.horizon} steps (episodes are cut at H)"),
        ("discount gamma, GAE lambda",
         f"{config.suite.gamma}, {config.suite.lam} (where an estimator uses them)"),
        ("group size G", f"{job.group_size} episodes per level"),
        ("batch sizes n", ", ".join(str(n) for n in config.batch_sizes)),
        ("number of batches M", _batches_text(config)),
        ("reference",
         f"{config.reference_trajectories} trajectories in "
         f"{config.reference_groups} groups of whole levels"),
        ("policies", _policies_text(results)),
        ("seed", str(job.seed)),
        ("devices", results.devices or "not recorded"),
    ]  # fmt: skip
    if job.decompose is not None:
        d = job.decompose
        rows.append(
            ("decomposition", f"{d.num_states} states x {d.num_actions} actions x "
             f"{d.num_continuations} continuations")
        )  # fmt: skip
    lines = ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines + [""] + _estimator_lines(config, job.group_size, results) + [""]


def _batches_text(config: StudyConfig) -> str:
    """ "8 top-level batches of 16, cut into 32 batches of 4 and 8 of 16"."""
    counts = sorted(runners.sub_batch_counts(config).items())
    cut = [f"{config.num_batches * c} of {n}" for n, c in counts]
    cut[0] = cut[0].replace(" of ", " batches of ", 1)
    listed = cut[0] if len(cut) == 1 else ", ".join(cut[:-1]) + f" and {cut[-1]}"
    largest = max(config.batch_sizes)
    return f"{config.num_batches} top-level batches of {largest}, cut into {listed}"


def _policies_text(results: JobResults) -> str:
    steps = results.env_steps or {}
    return ", ".join(
        name + (f" ({steps[name]:,} env steps)" if steps.get(name) is not None else "")
        for name in results.stages
    )


def _estimator_lines(config, group_size: int, results: JobResults) -> list[str]:
    """The studied estimators with their hyperparameters (value and entropy
    terms off everywhere: vf_coef = ent_coef = 0)."""
    studied = problems.studied_hyperparameters(config.suite, group_size)
    left = sorted({e for names in (results.left_out or {}).values() for e in names})
    lines = [
        "Estimators as studied (value and entropy terms off: vf_coef = ent_coef = 0; "
        "`b` = each policy's mean return over its reference sample"
        + (
            f"; left out where a policy has no critic: {', '.join(left)}"
            if left
            else ""
        )
        + "):",
        "",
        "| estimator | hyperparameters | reads a critic | on grad J's scale |",
        "|---|---|---|---|",
    ]
    for name, (spec, kwargs) in studied.items():
        shown = {
            k: ("mean return" if k == "b" else "the whole batch" if v is None else v)
            for k, v in kwargs.items()
            if k not in ("vf_coef", "ent_coef")
        }
        text = ", ".join(f"{k} = {v}" for k, v in shown.items()) or "none"
        lines.append(
            f"| {name} | {text} | {'yes' if spec.needs_critic else 'no'} | "
            f"{'no (*)' if spec.rescaled else 'yes'} |"
        )
    return lines


def _write_figures(out: Path, results: JobResults) -> list[str]:
    """The standard figures (:func:`rl_pg.figures.study_figures`) and, for several
    checkpoints with env steps, ``along_training`` (PNG, PDF and SVG each)."""
    rows = result_rows(results.stages)
    paths = figures.study_figures(rows, out, _rescaled(results.config))
    steps = results.env_steps or {}
    if len(results.stages) > 1 and all(
        steps.get(k) is not None for k in results.stages
    ):
        fig = figures.along_training_figure(rows, {k: steps[k] for k in results.stages})
        paths += figures.save(fig, out / "along_training.png", figures.FORMATS)
        figures.pyplot().close(fig)
    return [p.name for p in paths]


def written_files(out: str | Path) -> list[Path]:
    """The files of a finished study directory (hidden ones aside), sorted."""
    return sorted(p for p in Path(out).iterdir() if not p.name.startswith("."))


def _files_lines(names: list[str]) -> str:
    return "\n".join(
        ["", "## Files", "", "Everything this run wrote into its directory:", ""]
        + [f"- `{name}`" for name in names]
        + [""]
    )


def _write_tables(out: Path, results: dict) -> list[str]:
    """results.csv, slopes.csv and per_trajectory.csv."""
    rows = [
        [name] + [row.get(c, "") for c in RESULT_COLUMNS[1:]]
        for name, res in results.items()
        for row in res.rows
    ]
    io.atomic_write_bytes(out / "results.csv", _csv_bytes(RESULT_COLUMNS, rows))
    slopes = [
        [name, e, *values]
        for name, res in results.items()
        for e, values in res.slopes.items()
    ]
    io.atomic_write_bytes(
        out / "slopes.csv",
        _csv_bytes(
            ["checkpoint", "estimator", "slope", "slope_lo", "slope_hi"], slopes
        ),
    )
    per_traj = [
        [name, label, value]
        for name, res in results.items()
        for label, value in res.per_trajectory.items()
    ]
    io.atomic_write_bytes(
        out / "per_trajectory.csv",
        _csv_bytes(["checkpoint", "estimator", "variance_per_trajectory"], per_traj),
    )
    return ["results.csv", "slopes.csv", "per_trajectory.csv"]


def _write_decomposition(out: Path, rows: list[dict]) -> list[str]:
    """decomposition.csv and decomposition.png (the components, checks left out)."""
    table = [r for r in rows if r["component"] in decomposition.COMPONENTS]
    io.atomic_write_bytes(
        out / "decomposition.csv",
        _csv_bytes(
            DECOMPOSITION_COLUMNS,
            [[r.get(c, "") for c in DECOMPOSITION_COLUMNS] for r in table],
        ),
    )
    paths = decomposition.plot_decomposition(
        table, out / "decomposition.png", figures.FORMATS
    )
    return ["decomposition.csv"] + [p.name for p in paths]


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _rescaled(config) -> frozenset:
    """Names of the studied estimators on another scale than grad J."""
    specs = suite_specs(config.suite)
    return frozenset(name for name, spec in specs.items() if spec.rescaled)


# ------------------------------------------------------------------------ report


def _fmt(x: float, digits: str = ".3g") -> str:
    if np.isnan(x):
        return "n/a"
    return "inf" if x == np.inf else f"{x:{digits}}"


def _ci(r: dict, m: str, digits: str = ".3g") -> str:
    if np.isnan(r[m]):
        return "n/a"
    lo, hi = (_fmt(r[f"{m}_{s}"], digits) for s in ("lo", "hi"))
    return f"{_fmt(r[m], digits)} [{lo}, {hi}]"


METHODS = (
    "How to read it. `bias2` is noise-corrected (||mean g_hat - g_ref||^2 minus its "
    "expected noise tr S/M + se_ref^2, so it may be negative; `bias2_noise` is that "
    "noise). Intervals are 95%: delete-one jackknife over the batches and over the "
    "reference's level groups, on the log scale for the variance and mse, with the "
    "jackknife's double count of the degenerate term removed for bias2; cosines "
    "and their intervals are clamped to [-1, 1] (a `cos_mean` interval that lies "
    "wholly outside is reported as [-1, 1]: the data do not fix it); their "
    "coverage is measured against exact answers by `rl-pg variance --problem "
    "enumerable` (`experiments/calibration.py`, `experiments/lag_calibration.py`). "
    "`cos_mean` (direction of the mean "
    "estimate), `rel_variance` (tr Cov / |E g_hat|^2 = 1/SNR^2), `snr`, `cos_true` "
    "and `cos_pairwise` do not change when an estimator is multiplied by a constant; "
    "rankings below use only these. Estimators marked * are on another scale "
    "(group-std or batch normalisation, Dr. GRPO's 1/(B T), the mean baseline's "
    "(G-1)/G): compare them by the scale-free columns only. Smaller batch sizes are "
    "disjoint sub-batches of the same top-level batches (nested common random "
    "numbers), so the variance slope against n is measured on the same trajectories."
)
OBJECTIVES = (
    "Objectives. The true gradient here is that of the finite-horizon J = "
    "E[sum_t r_t] over the study's horizon. `gae` and `ppo_clip` target the "
    "discounted objective (gamma = {gamma}, lambda = {lam}) and bootstrap V at the "
    "horizon cut, so part of their bias is by design; `value_baseline` uses the "
    "critic only as a baseline and stays unbiased for J; `grpo`'s group-std and "
    "1/|o_i| weights change the direction of its mean, not only the scale."
)


def _stage_lines(
    name: str, res, config, exact_mode: bool, rescaled, context: dict
) -> list[str]:
    """The report's section on one stage (``context``: ``horizon``, ``left_out``
    label -> estimators, ``no_critic`` labels, see :func:`report`)."""
    largest = max(config.batch_sizes)
    at_largest = [r for r in res.rows if r["batch_size"] == largest]
    return (
        _stage_header(name, res, context)
        + _stage_table(res.rows, config, exact_mode, rescaled)
        + [""]
        + _stage_summary(at_largest, largest)
        + (exact_check_lines(res.rows) if exact_mode else [])
        + _slope_lines(res.slopes)
        + _per_trajectory_lines(res.per_trajectory)
    )


def _stage_header(name: str, res, context: dict) -> list[str]:
    """The stage's mean return, |g| and its critic: calibrated, or (a policy
    without critic, said once) what was left out."""
    critic, horizon = res.critic, context.get("horizon")
    left_out = context.get("left_out", {})
    cut = f"H = {horizon}" if horizon else "H"
    lines = [
        f"## {name}",
        "",
        f"Mean return {res.mean_return:.2f} (undiscounted, over the study's "
        f"horizon {cut} steps: every episode is cut at {cut}, so this is not the "
        f"policy's full-episode score); |g| = {_fmt(res.reference_norm)} "
        f"(standard error {_fmt(res.reference_se)}, levels as clusters). ",
    ]
    if name in left_out:
        lines[-1] += (
            f"This policy has no critic: left out {', '.join(left_out[name])} "
            "(they read V(s), which would be 0 here); no critic calibration."
        )
    elif name in context.get("no_critic", ()):
        lines[-1] += "This policy has no critic: no critic calibration."
    else:
        lines[-1] += (
            "Critic calibration (value in the study's reward units): mean V(s_t) "
            f"{critic['mean_value']:.3g} vs mean discounted return-to-go "
            f"{critic['mean_return_to_go']:.3g}, correlation "
            f"{critic['correlation']:.2f}."
        )
    return lines + [""]


def _stage_table(rows, config, exact_mode: bool, rescaled) -> list[str]:
    """Rows of the smallest and largest batch sizes, with their intervals."""
    smallest, largest = min(config.batch_sizes), max(config.batch_sizes)
    head = "| estimator | n | batches | cos to g | cos_mean | rel. variance | SNR | bias2 | variance |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if exact_mode:
        head += " exact bias2 | exact variance |"
        sep += "---:|---:|"
    lines = [head, sep]
    for r in rows:
        if r["batch_size"] not in (smallest, largest):
            continue
        mark = "*" if r["estimator"] in rescaled else ""
        line = (
            f"| {r['estimator']}{mark} | {r['batch_size']} | {r['num_batches']} | "
            f"{_ci(r, 'cos_true', '.3f')} | {_ci(r, 'cos_mean', '.3f')} | "
            f"{_ci(r, 'rel_variance')} | {_ci(r, 'snr')} | {_ci(r, 'bias2')} | "
            f"{_ci(r, 'variance')} |"
        )
        if exact_mode:
            line += f" {_fmt(r['exact_bias2'])} | {_fmt(r['exact_variance'])} |"
        lines.append(line)
    return lines


def _stage_summary(at_largest: list[dict], largest: int) -> list[str]:
    """Best, worst and closest estimators at the largest size; tilted means."""
    finite = [r for r in at_largest if np.isfinite(r["rel_variance"])]
    lines = []
    if finite:
        best = min(finite, key=lambda r: r["rel_variance"])
        worst = max(finite, key=lambda r: r["rel_variance"])
        closest = max(at_largest, key=lambda r: r["cos_true"])
        lost = [r["estimator"] for r in at_largest if r not in finite]
        lines.append(
            f"At n = {largest}, {best['estimator']} has the lowest relative variance "
            f"({_fmt(best['rel_variance'])}) and {worst['estimator']} the highest "
            f"({_fmt(worst['rel_variance'])})"
            + (
                f"; the mean of {', '.join(lost)} is indistinguishable from 0 here"
                if lost
                else ""
            )
            + f"; {closest['estimator']} points closest to the true gradient (mean "
            f"cosine {closest['cos_true']:.2f})."
        )
    tilted = [
        r["estimator"]
        for r in at_largest
        if np.isfinite(r["cos_mean_hi"]) and r["cos_mean_hi"] < 0.99
    ]
    lines.append(
        "Mean estimate tilted away from g (cos_mean interval below 0.99; n/a where "
        "the mean is indistinguishable from 0): "
        + (", ".join(tilted) if tilted else "none")
        + "."
    )
    return lines


def _slope_lines(slopes: dict) -> list[str]:
    if not slopes:
        return []
    return [
        "",
        "Slope of log variance against log n (an i.i.d. estimator has -1; "
        "jackknife interval over the top-level batches):",
        "",
        "| estimator | slope |",
        "|---|---:|",
    ] + [f"| {e} | {s:.2f} [{lo:.2f}, {hi:.2f}] |" for e, (s, lo, hi) in slopes.items()]


def _per_trajectory_lines(per_trajectory: dict) -> list[str]:
    ref = per_trajectory["reinforce (b = 0)"]
    lines = [
        "",
        "Per-trajectory variance tr Var[g_1] (an i.i.d. batch of n has 1/n of it). "
        "The oracle rows use b* computed from the whole reference sample, which no "
        "batch estimator has: `optimal_baseline` estimates b from the other "
        "trajectories of its batch and can do worse than a fixed constant at small n.",
        "",
        "| estimator / baseline | per-trajectory variance | relative to REINFORCE |",
        "|---|---:|---:|",
    ]
    for label, value in per_trajectory.items():
        lines.append(f"| {label} | {_fmt(value)} | {value / ref:.3f} |")
    lines.append("")
    return lines


def report(
    results: dict,
    config,
    wall: float,
    matmul: float,
    exact_mode=False,
    settings: list[str] = (),
    context: dict | None = None,
) -> str:
    """report.md's text less the decomposition and the file list: header,
    ``settings`` lines, methods, one section per stage (``context``: the
    ``horizon`` and, label -> estimators, what was ``left_out``), performance."""
    context = context or {}
    lines = [
        "# Policy-gradient estimator study",
        "",
        f"{len(results)} policies, batch sizes {list(config.batch_sizes)} "
        f"({_batches_text(config)}), reference "
        f"gradient from {config.reference_trajectories} trajectories in "
        f"{config.reference_groups} groups of whole levels (REINFORCE with the "
        f"mean-return baseline). Wall-clock {wall:.0f} s. Figures and every other "
        "file: listed under Files at the end."
        + (
            " Exact mode: the enumerable MDP, exact values beside the estimates."
            if exact_mode
            else ""
        ),
        "",
        *settings,
        METHODS,
        "",
        OBJECTIVES.format(gamma=config.suite.gamma, lam=config.suite.lam),
        "",
    ]
    for name, res in results.items():
        lines += _stage_lines(name, res, config, exact_mode, _rescaled(config), context)
    perf = next(iter(results.values())).perf
    lines += [
        "## Performance",
        "",
        f"Gradient phase: {perf['trajectory_gradients_per_s']:,.0f} trajectory "
        f"gradients/s, {perf['gradient_flops_per_s'] / 1e9:.2f} GFLOP/s"
        f"{' per device' if perf['gradient_flops_per_device'] else ''} = "
        f"{perf['gradient_flops_per_s'] / matmul:.1%} of a same-run 1024x1024 float32 "
        f"matmul ({matmul / 1e9:.1f} GFLOP/s), "
        + (
            f"on a mesh of {perf['gradient_devices']} devices"
            if perf["gradient_flops_per_device"]
            else f"{perf['gradient_devices']} device(s) at once"
        )
        + f". Batch phase {perf['batch_phase_seconds']:.1f} s per stage"
        + _batch_rate(perf, matmul)
        + ".",
        "",
    ]
    return "\n".join(lines)


def _batch_rate(perf: dict, matmul: float) -> str:
    """The batch calls' seconds and FLOP/s (XLA's count of the estimates, sampling
    excluded) against the matmul, if measured."""
    if "batch_flops_per_s" not in perf:
        return ""
    rate = perf["batch_flops_per_s"]
    return (
        f", {perf['batch_call_seconds']:.1f} s of it in the batch calls (sampling "
        f"included): {rate / 1e9:.2f} GFLOP/s of estimates"
        f"{' per device' if perf['gradient_flops_per_device'] else ''} = "
        f"{rate / matmul:.1%} of the matmul, {perf['batch_devices']} device(s) at once"
    )


def _total_variance_check(sel: dict, names: list[str], sizes: dict) -> list[str]:
    """A WARNING line if some estimator's ``sum - total`` interval excludes 0."""
    failed = []
    for e in names:
        r = sel.get((e, "sum_minus_total"))
        if r is not None and (r["variance_lo"] > 0 or r["variance_hi"] < 0):
            failed.append(f"{e} ({_ci(r, 'variance')})")
    if not failed:
        return []
    return [
        "**WARNING: the law of total variance check failed** for "
        + ", ".join(failed)
        + ": the interval of `sum - total` excludes 0, so at these sizes "
        f"({sizes['num_states']} states x {sizes['num_actions']} actions x "
        f"{sizes['num_continuations']} continuations) the state, action and "
        "trajectory parts do not add up to the separately measured total; read "
        "them as rough. Rerun with more states, actions and continuations (e.g. "
        "`--preset full --decompose`: 1024 x 8 x 8) before relying on them.",
        "",
    ]


def exact_check_lines(rows: list[dict]) -> list[str]:
    """Exact mode: how many 95% intervals of bias2 and variance miss the exact
    value (about 5% may), with a WARNING above 20%."""
    checked = missed = 0
    for r in rows:
        for m in ("bias2", "variance"):
            value = r.get(f"exact_{m}", np.nan)
            if np.isfinite(value) and np.isfinite(r[f"{m}_lo"]):
                checked += 1
                missed += not r[f"{m}_lo"] <= value <= r[f"{m}_hi"]
    if not checked:
        return []
    share = missed / checked
    line = (
        f"Intervals against the exact values: {missed} of {checked} bias2 and "
        f"variance intervals miss the exact value ({share:.0%}; about 5% may)."
    )
    if share > 0.2:
        line = (
            f"**WARNING: {line}** The intervals are too narrow at these sizes: "
            "use more batches (--num-batches) and a larger reference."
        )
    return ["", line]


def decomposition_report(rows, sizes, seconds, exact_mode, no_critic=()) -> str:
    """The report's paragraph on the decomposition (``no_critic``: the labels of
    stages without critic, whose learned-critic rows were left out)."""
    lines = [
        "## Variance decomposed (Tucker et al. 2018)",
        "",
        f"Per-step term y = A_hat grad log pi(a|s) at a state drawn uniformly over the "
        f"live steps of on-policy episodes: {sizes['num_states']} states, "
        f"{sizes['num_actions']} actions each, {sizes['num_continuations']} "
        "continuations of each; method-of-moments parts of tr Var(y) with jackknife "
        "95% intervals over states; `total` is measured separately (one fresh draw "
        "per state), so `sum - total` (its interval should hold 0) checks the law of "
        "total variance. Oracle rows: a perfect critic (true V and Q from the "
        f"branches). {seconds:.1f} s.",
        "",
    ]
    stages = list(dict.fromkeys(r["checkpoint"] for r in rows))
    for stage in stages:
        sel = {
            (r["estimator"], r["component"]): r
            for r in rows
            if r["checkpoint"] == stage
        }
        names = list(dict.fromkeys(e for e, _ in sel))
        lines += [f"### {stage}", ""] + _decomposition_table(sel, names, exact_mode)
        shares = []
        for e in ("reward_to_go", "value_baseline"):
            t, tot = sel.get((e, "trajectory")), sel.get((e, "total"))
            if t and tot and tot["variance"] > 0:
                shares.append(f"{e} {t['variance'] / tot['variance']:.0%}")
        base = sel.get(("reinforce", "total"))
        ideal = sel.get(("oracle_advantage", "total"))
        learned = sel.get(("value_baseline", "total"))
        lines.append("")
        if stage in no_critic:
            lines += [
                f"{stage} has no critic: no rows of "
                f"{', '.join(decomposition.LEARNED_CRITIC)} (they read V(s), which "
                "would be 0 here); the oracle rows are a perfect critic's.",
                "",
            ]
        lines += _total_variance_check(sel, names, sizes)
        if shares:
            lines.append("Trajectory part of the total: " + ", ".join(shares) + ".")
        if base and ideal and learned and base["variance"] > 0:
            lines.append(
                f"Relative to REINFORCE's per-step variance, the learned critic "
                f"(value_baseline) leaves {learned['variance'] / base['variance']:.1%} "
                f"and a perfect critic's advantage {ideal['variance'] / base['variance']:.1%}."
            )
        lines.append("")
    return "\n".join(lines)


def _decomposition_table(sel: dict, names: list[str], exact_mode) -> list[str]:
    """One stage's decomposition table (``sel``: (estimator, component) -> row)."""
    head = "| estimator | state | action | trajectory | total | sum - total |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for e in names:
        cells = []
        for c in ("state", "action", "trajectory", "total", "sum_minus_total"):
            r = sel.get((e, c))
            if r is None:
                cells.append("")
                continue
            cell = _ci(r, "variance")
            if exact_mode and np.isfinite(r.get("exact_variance", np.nan)):
                cell += f" (exact {_fmt(r['exact_variance'])})"
            cells.append(cell)
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines


def result_rows(results: dict) -> list[dict]:
    """The rows of ``results.csv`` (as dicts) from ``execute``'s results."""
    return [
        {"checkpoint": name, **{c: row.get(c, np.nan) for c in RESULT_COLUMNS[1:]}}
        for name, res in results.items()
        for row in res.rows
    ]


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """``results.csv`` as dicts with numbers parsed (empty cells -> nan)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed = {}
        for k, v in row.items():
            if k in ("checkpoint", "estimator"):
                parsed[k] = v
            else:
                parsed[k] = float(v) if v not in ("", None) else float("nan")
        out.append(parsed)
    return out
