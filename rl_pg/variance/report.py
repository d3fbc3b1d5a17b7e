"""The estimator-variance benchmark as a job: presets, stages, outputs, plots, report.

``rl-pg variance --preset quick|full --out DIR`` runs :mod:`rl_pg.variance.study`
on policies at several training stages (Flappy Bird checkpoints) or, with
``--problem enumerable``, on a few policies of the exactly solvable MDP, where
``results.csv`` also gets the exact values. Writes ``results.csv``,
``slopes.csv``, ``per_trajectory.csv``, ``report.md``, ``config.json``,
``performance.json`` and plots.
"""

import csv
import dataclasses
import io as _io
import json
import os
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import rl_pg
from rl_pg import checkpoint, enumerable, io, policies
from rl_pg.variance import exact, statistics, study

PROBLEMS = ("flappy", "enumerable")
PRESETS = {
    "quick": dict(
        study=study.StudyConfig(
            batch_sizes=(4, 16, 64),
            num_batches=32,
            max_batches_per_size=512,
            reference_trajectories=16_384,
            reference_groups=128,
            chunk=1024,
            steps_per_call=2**14,
        ),
        horizon=128,
        group_size=4,
        decompose=dict(num_states=256, num_actions=4, num_continuations=4),
    ),
    "full": dict(
        study=study.StudyConfig(
            batch_sizes=(4, 16, 64, 256, 1024),
            num_batches=128,
            max_batches_per_size=1024,
            reference_trajectories=131_072,
            reference_groups=128,
            chunk=2048,
            steps_per_call=2**14,
        ),
        horizon=256,
        group_size=4,
        decompose=dict(num_states=1024, num_actions=8, num_continuations=8),
    ),
}
# the exact mode's sizes (the enumerable MDP's episodes have 4 steps)
ENUMERABLE_STUDY = study.StudyConfig(
    batch_sizes=(4, 16, 64),
    num_batches=64,
    max_batches_per_size=1024,
    reference_trajectories=2**15,
    reference_groups=128,
    chunk=2**13,
)
STAGES = ("initial", "partial", "good")
RESULT_COLUMNS = (
    ["checkpoint", "estimator", "batch_size", "num_batches"]
    + list(statistics.METRICS)
    + [f"{m}_{s}" for m in statistics.METRICS for s in ("lo", "hi")]
    + ["bias2_noise", "se_ref"]
    + [f"exact_{m}" for m in exact.EXACT_METRICS]
)


class Stage(NamedTuple):
    """One policy of the study with everything needed to study it on its own."""

    label: str  # unique among the stages
    params: Any
    problem: study.Problem
    horizon: int
    key: str  # stages with equal keys share compiled runners
    description: dict
    env: Any = None  # the gymnax env and params (Flappy Bird stages)
    env_params: Any = None


def shipped_checkpoints() -> list[Path]:
    """The policies shipped with rl_pg (initial, partly trained, good), if present."""
    root = resources.files("rl_pg") / "checkpoints"
    found = [Path(str(root / s)) for s in STAGES]
    return [p for p in found if (p / checkpoint.META_FILE).is_file()]


def stage_labels(paths: list[Path]) -> list[str]:
    """Unique labels: the fewest trailing path parts that tell the stages apart
    (``a/best`` and ``b/best`` -> ``a/best``, ``b/best``; ``a/best`` and ``a/last``
    -> ``best``, ``last``)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise ValueError(f"the same checkpoint is given twice: {[str(p) for p in paths]}")


def _checkpoint_stage(path: Path, label: str, horizon: int, group_size: int) -> Stage:
    if not Path(path).is_dir():
        raise ValueError(f"checkpoint {path} is not a directory")
    policy, params, env, env_params, meta = checkpoint.load_policy(path)
    scale = float(meta.get("reward_scale", 1.0))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"{path}/meta.json: reward_scale must be > 0, got {scale}")
    apply_fn = study.critic_in_reward_units(policy.apply, scale)
    problem = study.flappy_problem(apply_fn, env, env_params, horizon, group_size)
    description = {
        "path": str(path),
        "policy": meta["policy"],
        "env_id": meta["env_id"],
        "env_kwargs": meta.get("env_kwargs", {}),
        "critic_reward_scale": scale,
        "env_steps": meta.get("env_steps"),
    }
    # stages that share policy, env and critic scale share compiled runners
    shared = ("policy", "env_id", "env_kwargs", "critic_reward_scale")
    key = json.dumps({k: description[k] for k in shared}, sort_keys=True)
    return Stage(label, params, problem, horizon, key, description, env, env_params)


def _initial_stage(horizon: int, group_size: int, env_id: str) -> Stage:
    """A freshly initialised policy (CNN for pixels, else an MLP) in ``env_id``."""
    env, env_params = rl_pg.make(env_id)
    kind = "cnn" if env.obs_mode == "pixels" else "mlp"
    policy = policies.cnn_policy(2) if kind == "cnn" else policies.mlp_policy(2)
    obs = jnp.zeros(env.observation_space(env_params).shape)
    params = policy.init(jax.random.PRNGKey(0), obs)
    problem = study.flappy_problem(policy.apply, env, env_params, horizon, group_size)
    description = {"policy": kind, "env_id": env_id}
    key = f"initial-{env_id}"
    return Stage("initial", params, problem, horizon, key, description, env, env_params)


def flappy_stages(
    paths: list[str | Path] | None,
    horizon: int,
    group_size: int,
    env_id: str | None = None,
) -> list[Stage]:
    """One stage per checkpoint (default: the shipped ones, or a freshly
    initialised policy for another ``env_id``); every path, and every
    checkpoint's env against ``env_id``, is checked before anything compiles."""
    if paths:
        paths = [Path(p) for p in paths]
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise ValueError(f"checkpoint(s) not found: {', '.join(missing)}")
    else:
        paths = shipped_checkpoints()
        if env_id not in (None, "FlappyBird-v0") or not paths:
            return [_initial_stage(horizon, group_size, env_id or "FlappyBird-v0")]
    labels = stage_labels(paths)
    stages = [
        _checkpoint_stage(p, label, horizon, group_size)
        for p, label in zip(paths, labels, strict=True)
    ]
    if env_id is not None:
        wrong = [s.label for s in stages if s.description["env_id"] != env_id]
        if wrong:
            raise ValueError(f"checkpoint(s) {wrong} do not act in --env-id {env_id}")
    return stages


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The policies a training run kept at every evaluation
    (``rl-pg train --keep-checkpoints all``), in training order. A run of a
    value-based agent (Q-learning table, DQN Q-network) is refused: its
    policies are not policy-gradient policies."""
    root = Path(run_dir) / "checkpoints" / "evaluations"
    if not Path(run_dir).is_dir():
        raise ValueError(f"--run {run_dir}: no such directory")
    try:
        algo = json.loads((Path(run_dir) / "config.json").read_text())["algo"]
    except (OSError, ValueError, KeyError, TypeError):
        algo = None  # not a training run: the message below
    qualify = ("reinforce", "a2c", "ppo", "grpo")  # runs of policy gradients
    if algo is not None and algo not in qualify:
        raise ValueError(
            f"{run_dir} is a {algo} run, whose policies are not policy-gradient "
            f"policies: the variance study needs a run of {', '.join(qualify)} "
            "(trained with --keep-checkpoints all)"
        )
    found = (
        sorted(p for p in root.glob("env_steps_*") if p.is_dir())
        if root.is_dir()
        else []
    )
    if not found:
        raise ValueError(
            f"{run_dir} kept no evaluated policies (train it with "
            "--keep-checkpoints all)"
        )
    return found


def enumerable_stages(group_size: int, policies_: dict | None = None) -> list[Stage]:
    """The exact mode's policies (or label -> tabular params) on the enumerable MDP."""
    problem = exact.enumerable_problem(group_size)
    horizon = enumerable.DEFAULT_MDP.horizon
    chosen = exact.enumerable_policies() if policies_ is None else policies_
    return [
        Stage(str(label), params, problem, horizon, "enumerable", {"policy": label})
        for label, params in chosen.items()
    ]


def study_config_from_dict(data: dict) -> study.StudyConfig:
    """A :class:`StudyConfig` from its ``dataclasses.asdict`` form (config.json)."""
    data = dict(data)
    suite = dict(data.pop("suite", {}))
    if "names" in suite:
        suite["names"] = tuple(suite["names"])
    data["batch_sizes"] = tuple(data.get("batch_sizes", ()))
    known = {f.name for f in dataclasses.fields(study.StudyConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown study settings {unknown}; known: {sorted(known)}")
    return study.StudyConfig(**data, suite=study.SuiteConfig(**suite))


def override_study(
    base: study.StudyConfig,
    estimators: str | None = None,
    group_size: int = 1,
    **sizes,
) -> study.StudyConfig:
    """``base`` with CLI overrides: ``estimators`` (comma-separated names and/or
    module:function), batch sizes, number of batches, reference trajectories
    (the chunk and reference groups follow so that they still divide it)."""
    changes = dict(sizes)
    if "batch_sizes" in changes:
        changes["batch_sizes"] = tuple(int(n) for n in changes["batch_sizes"])
    if "num_batches" in changes:
        changes["max_batches_per_size"] = max(
            base.max_batches_per_size, changes["num_batches"]
        )
    if "reference_trajectories" in changes:
        n = int(changes["reference_trajectories"])
        if n < 4 * group_size:
            raise ValueError(
                f"reference_trajectories must be >= 4 groups of {group_size}, got {n}"
            )
        chunk = min(base.chunk, n)
        while n % chunk:
            chunk -= 1
        changes["chunk"] = chunk
        groups = min(base.reference_groups, n)
        while groups > 4 and (
            n % groups or chunk % (n // groups) or (n // groups) % group_size
        ):
            groups -= 1
        changes["reference_groups"] = groups
    if estimators:
        names = tuple(e.strip() for e in estimators.split(",") if e.strip())
        changes["suite"] = dataclasses.replace(base.suite, names=names)
    config = dataclasses.replace(base, **changes)
    study.suite_specs(config.suite)  # unknown names fail here, before compiling
    return config


def device_mesh(devices: "int | str | None"):
    """None (no mesh), an int N (the first N local devices) or "all"."""
    if devices is None:
        return None
    from rl_pg import distributed

    local = jax.local_devices()
    if devices == "all":
        count = len(local)
    else:
        try:
            count = int(devices)
        except (TypeError, ValueError):
            raise ValueError(
                f"devices must be a positive int or 'all', got {devices!r}"
            ) from None
        if not 1 <= count <= len(local):
            raise ValueError(
                f"devices must be between 1 and {len(local)} (local devices), got {count}"
            )
    return distributed.batch_mesh(local[:count])


def run(
    preset: str,
    out_dir: str | Path,
    checkpoints: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    problem: str = "flappy",
    config: study.StudyConfig | None = None,
    horizon: int | None = None,
    group_size: int | None = None,
    env_id: str | None = None,
    devices: "int | str | None" = None,
    decompose: bool = False,
) -> Path:
    """Run the study (the ``rl-pg variance`` job) into a new directory.

    ``config`` replaces the preset's (or the exact mode's) study sizes;
    ``horizon`` and ``group_size`` the preset's. Everything is validated, and
    every stage's runners built, before the directory is created.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {list(PROBLEMS)}, got {problem!r}")
    setting = PRESETS[preset]
    group_size = setting["group_size"] if group_size is None else int(group_size)
    horizon = setting["horizon"] if horizon is None else int(horizon)
    if group_size < 1 or horizon < 1:
        raise ValueError(
            f"horizon and group_size must be >= 1, got {horizon}, {group_size}"
        )
    if problem == "enumerable":
        if checkpoints or env_id:
            raise ValueError(
                "--checkpoints and --env-id apply to --problem flappy only"
            )
        config = dataclasses.replace(config or ENUMERABLE_STUDY, seed=seed)
        stages = enumerable_stages(group_size)
    else:
        config = dataclasses.replace(config or setting["study"], seed=seed)
        stages = flappy_stages(checkpoints, horizon, group_size, env_id)
    if decompose and problem == "flappy" and any(s.env is None for s in stages):
        raise ValueError("--decompose needs every stage's environment")
    mesh = device_mesh(devices)
    settings = {
        "command": "variance",
        "preset": preset,
        "problem": problem,
        "seed": seed,
        "checkpoints": [str(p) for p in checkpoints] if checkpoints else None,
        "env_id": env_id,
        "devices": devices,
        "stages": {s.label: s.description for s in stages},
        "horizon": stages[0].horizon,
        "group_size": group_size,
        "study": dataclasses.asdict(config),
        "decompose": setting["decompose"] if decompose else None,
    }
    return execute(stages, config, out_dir, settings, progress, mesh)[0]


def rerun(config_file: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Run a previous run's ``config.json`` again (same seed: the same results)."""
    path = Path(config_file)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        saved = json.loads(path.read_text())
        return run(
            saved["preset"],
            out_dir,
            checkpoints=saved.get("checkpoints"),
            seed=int(saved["seed"]),
            progress=progress,
            problem=saved.get("problem", "flappy"),
            config=study_config_from_dict(saved["study"]),
            horizon=saved.get("horizon"),
            group_size=saved.get("group_size"),
            env_id=saved.get("env_id"),
            devices=saved.get("devices"),
            decompose=bool(saved.get("decompose")),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"--config {path} is not a variance run's config.json: {e}"
        ) from e


def _build_runners(stages: list[Stage], config, mesh) -> dict:
    """Runners per distinct stage key; validates sizes and estimators, and traces
    every estimator on one batch (a user loss that cannot be traced fails here,
    before anything is written)."""
    runners = {}
    for stage in stages:
        if stage.key not in runners:
            runners[stage.key] = study.make_runners(stage.problem, config, mesh)
            keys = jax.random.split(jax.random.PRNGKey(0), mesh.size if mesh else 1)
            try:
                jax.eval_shape(
                    runners[stage.key].batch, stage.params, keys, jnp.float32(0.0)
                )
            except Exception as e:  # noqa: BLE001 (reported with its type)
                raise ValueError(
                    f"the study's estimators fail on stage {stage.label!r}: "
                    f"{type(e).__name__}: {e}"
                ) from e
    return runners


def execute(
    stages: list[Stage],
    config: study.StudyConfig,
    out_dir: str | Path | None,
    settings: dict,
    progress: bool = True,
    mesh=None,
) -> tuple["Path | None", dict]:
    """Study every stage; write the outputs into ``out_dir`` (new) if given.

    Everything is validated, and every estimator traced, before the directory is
    created. Returns the output directory (None without ``out_dir``) and the
    results (label -> StageResult).
    """
    runners = _build_runners(stages, config, mesh)
    out = io.new_out_dir(out_dir) if out_dir is not None else None
    if out is not None:
        io.write_config(out, settings)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = study.total_work(config, len(stages))
        bar = tqdm(total=total, unit="traj", desc="variance study")
    results = {}
    for stage in stages:
        if bar is not None:
            bar.set_postfix_str(stage.label)
        results[stage.label] = study.study_stage(
            stage.params,
            runners[stage.key],
            config,
            stage.horizon,
            bar.update if bar else None,
        )
    if bar is not None:
        bar.close()
    if out is None:
        return None, results
    wall = time.perf_counter() - start
    matmul = study.matmul_flops_per_s()
    exact_mode = settings.get("problem") == "enumerable"
    write_outputs(out, results, config, wall, matmul, exact_mode=exact_mode)
    if settings.get("decompose"):
        decomposition_outputs(out, stages, settings["decompose"], config, exact_mode)
    steps = {s.label: s.description.get("env_steps") for s in stages}
    if len(stages) > 1 and all(v is not None for v in steps.values()):
        plot_along_training(out / "along_training.png", results, steps, config)
    return out, results


DECOMPOSITION_COLUMNS = [
    "checkpoint",
    "estimator",
    "component",
    "variance",
    "variance_lo",
    "variance_hi",
    "exact_variance",
]


def decompose_stages(stages: list[Stage], sizes: dict, config, exact_mode: bool):
    """Variance decomposition rows (Tucker et al. 2018) of every stage, and the
    exact values in exact mode; see :mod:`rl_pg.variance.decomposition`."""
    from rl_pg.variance import decomposition

    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**20)
    rows = []
    for i, stage in enumerate(stages):
        k = jax.random.fold_in(key, i)
        common = dict(gamma=config.suite.gamma, lam=config.suite.lam, **sizes)
        if exact_mode:
            found = decomposition.decompose_enumerable(k, stage.params, **common)
            exact = {
                (r["estimator"], r["component"]): r["variance"]
                for r in decomposition.decompose_exact(
                    stage.params, gamma=config.suite.gamma, lam=config.suite.lam
                )
            }
        else:
            found = decomposition.decompose(
                k,
                stage.params,
                stage.problem.apply_fn,  # the critic already in raw reward units
                stage.env,
                stage.env_params,
                horizon=stage.horizon,
                **common,
            )
            exact = {}
        for r in found:
            exact_value = exact.get((r["estimator"], r["component"]), np.nan)
            rows.append({**r, "checkpoint": stage.label, "exact_variance": exact_value})
    return rows


def decomposition_outputs(out: Path, stages, sizes: dict, config, exact_mode) -> None:
    """``decomposition.csv``, ``decomposition.png`` and a section of ``report.md``."""
    from rl_pg.variance import decomposition

    start = time.perf_counter()
    rows = decompose_stages(stages, sizes, config, exact_mode)
    seconds = time.perf_counter() - start
    table = [r for r in rows if r["component"] in decomposition.COMPONENTS]
    io.atomic_write_bytes(
        out / "decomposition.csv",
        _csv_bytes(
            DECOMPOSITION_COLUMNS,
            [[r.get(c, "") for c in DECOMPOSITION_COLUMNS] for r in table],
        ),
    )
    decomposition.plot_decomposition(table, out / "decomposition.png")
    text = (out / "report.md").read_text()
    text += decomposition_report(rows, sizes, seconds, exact_mode)
    io.atomic_write_bytes(out / "report.md", text.encode())
    perf_path = out / "performance.json"
    perf = json.loads(perf_path.read_text())
    perf["decomposition_seconds"] = seconds
    io.write_json(perf_path, perf)


def decomposition_report(rows, sizes, seconds, exact_mode) -> str:
    """The report's paragraph on the decomposition."""
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
        head = "| estimator | state | action | trajectory | total | sum - total |"
        lines += [f"### {stage}", "", head, "|---|---:|---:|---:|---:|---:|"]
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
        shares = []
        for e in ("reward_to_go", "value_baseline"):
            t, tot = sel.get((e, "trajectory")), sel.get((e, "total"))
            if t and tot and tot["variance"] > 0:
                shares.append(f"{e} {t['variance'] / tot['variance']:.0%}")
        base = sel.get(("reinforce", "total"))
        ideal = sel.get(("oracle_advantage", "total"))
        learned = sel.get(("value_baseline", "total"))
        lines.append("")
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


def plot_along_training(path: Path, results: dict, steps: dict, config) -> None:
    """Cosine to the true gradient, SNR and relative variance of each estimator at
    the largest batch size against env steps (Ilyas et al. 2020, figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(config.batch_sizes)
    labels = sorted(results, key=lambda k: steps[k])
    x = np.array([steps[k] for k in labels], float)
    names = list(dict.fromkeys(r["estimator"] for r in results[labels[0]].rows))
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, metric, ylabel in zip(
        axes,
        ("cos_true", "snr", "rel_variance"),
        ("cos(g_hat, g)", "SNR", "tr Cov / |E g_hat|^2"),
        strict=True,
    ):
        for i, e in enumerate(names):
            rows = [
                next(
                    r
                    for r in results[k].rows
                    if r["estimator"] == e and r["batch_size"] == n
                )
                for k in labels
            ]
            y = np.array([r[metric] for r in rows], float)
            lo = np.array([r[f"{metric}_lo"] for r in rows], float)
            hi = np.array([r[f"{metric}_hi"] for r in rows], float)
            ax.plot(x, y, "o-", color=cmap(i % 20), label=e, ms=3)
            ax.fill_between(
                x,
                lo,
                np.where(np.isfinite(hi), hi, np.nan),
                color=cmap(i % 20),
                alpha=0.12,
            )
        if metric == "rel_variance":
            _log_y(ax)
        ax.set_xlabel("env steps")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{metric}, n = {n}")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    io.atomic_write_bytes(path, buffer.getvalue())


def result_rows(results: dict) -> list[dict]:
    """The rows of ``results.csv`` (as dicts) from ``execute``'s results."""
    return [
        {"checkpoint": name, **{c: row.get(c, np.nan) for c in RESULT_COLUMNS[1:]}}
        for name, res in results.items()
        for row in res.rows
    ]


def run_study(
    policies: "dict[str, Any] | None" = None,
    *,
    policy: "policies.Policy | None" = None,
    checkpoints: "list[str | Path] | None" = None,
    env_id: str = "FlappyBird-v0",
    problem: str = "flappy",
    estimators: "list[str | Callable] | None" = None,
    batch_sizes: tuple[int, ...] = (4, 16, 64),
    num_batches: int = 32,
    max_batches_per_size: int = 512,
    reference_trajectories: int = 16_384,
    reference_groups: int = 128,
    chunk: int = 1024,
    horizon: int = 128,
    group_size: int = 4,
    seed: int = 0,
    mesh=None,
    out_dir: "str | Path | None" = None,
    progress: bool = False,
) -> list[dict]:
    """The estimator study from Python; returns the rows of ``results.csv``.

    Args:
      policies: label -> params of ``policy`` (a :class:`rl_pg.policies.Policy`)
        acting in ``env_id``; or None with ``checkpoints``, or neither (the
        shipped checkpoints). With ``problem="enumerable"`` the exact mode's
        policies are used (or label -> tabular params) and rows get exact values.
      estimators: registered names, ``module:function`` references and/or loss
        functions ``loss(params, batch, *, apply_fn, **hyperparameters) -> (loss,
        aux)`` (named in the outputs by their function name); default: every
        registered estimator marked ``in_study``.
      batch_sizes ... chunk: the :class:`~rl_pg.variance.study.StudyConfig`.
      horizon: steps per Flappy Bird episode (the enumerable MDP has 4).
      group_size: G episodes per level.
      mesh: a :func:`rl_pg.distributed.batch_mesh` to shard the study over.
      out_dir: also write the CLI's outputs into this new directory.

    Returns:
      One dict per (policy, estimator, batch size) with the columns of
      ``results.csv``.
    """
    names = _estimator_refs(estimators)
    config = study.StudyConfig(
        batch_sizes=tuple(int(n) for n in batch_sizes),
        num_batches=num_batches,
        max_batches_per_size=max_batches_per_size,
        reference_trajectories=reference_trajectories,
        reference_groups=reference_groups,
        chunk=chunk,
        seed=seed,
        suite=study.SuiteConfig(names=names),
    )
    if problem == "enumerable":
        stages = enumerable_stages(group_size, policies)
    elif problem == "flappy":
        if policies is not None:
            if policy is None:
                raise ValueError("params given without their policy (policy=...)")
            stages = _param_stages(policies, policy, env_id, horizon, group_size)
        else:
            stages = flappy_stages(checkpoints, horizon, group_size, env_id)
    else:
        raise ValueError(f"problem must be one of {list(PROBLEMS)}, got {problem!r}")
    settings = {
        "command": "run_study",
        "problem": problem,
        "seed": seed,
        "stages": {s.label: s.description for s in stages},
        "horizon": stages[0].horizon,
        "group_size": group_size,
        "study": dataclasses.asdict(config),
    }
    _, results = execute(stages, config, out_dir, settings, progress, mesh)
    return result_rows(results)


def _estimator_refs(estimators) -> tuple[str, ...]:
    """Names / module:function strings for SuiteConfig (functions -> references,
    so that config.json can rerun them)."""
    if estimators is None:
        return study.SuiteConfig().names
    if isinstance(estimators, str) or callable(estimators):
        estimators = [estimators]
    refs = []
    for e in estimators:
        if callable(e):
            from rl_pg import estimators as estimators_lib

            spec = estimators_lib.resolve(e)
            in_registry = estimators_lib.REGISTRY.get(spec.name)
            registered = in_registry is not None and in_registry.loss is e
            refs.append(spec.name if registered else estimators_lib.reference(e))
        else:
            refs.append(e)
    refs = tuple(refs)
    study.suite_specs(study.SuiteConfig(names=refs))  # validate now
    return refs


def _param_stages(policies_, policy, env_id, horizon, group_size) -> list[Stage]:
    env, env_params = rl_pg.make(env_id)
    problem = study.flappy_problem(policy.apply, env, env_params, horizon, group_size)
    return [
        Stage(
            str(label),
            params,
            problem,
            horizon,
            "params",
            {"env_id": env_id},
            env,
            env_params,
        )
        for label, params in policies_.items()
    ]


# ----------------------------------------------------------------------- outputs


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def write_outputs(
    out: Path, results: dict, config, wall: float, matmul: float, exact_mode=False
) -> None:
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
    perf = {
        name: {**res.perf, "matmul_flops_per_s": matmul}
        for name, res in results.items()
    }
    io.write_json(out / "performance.json", {"wall_clock_s": wall, "stages": perf})
    plot(out, results, _rescaled(config))
    text = report(results, config, wall, matmul, exact_mode)
    io.atomic_write_bytes(out / "report.md", text.encode())


def _rescaled(config) -> frozenset:
    """Names of the studied estimators on another scale than grad J."""
    specs = study.suite_specs(config.suite)
    return frozenset(name for name, spec in specs.items() if spec.rescaled)


def _log_y(ax) -> None:
    """Log y scale with limits from the lines' finite positive values (linear if
    there are none: e.g. every relative variance infinite)."""
    values = np.concatenate(
        [np.asarray(line.get_ydata(), float) for line in ax.get_lines()] or [[]]
    )
    values = values[np.isfinite(values) & (values > 0)]
    if values.size:
        ax.set_yscale("log")
        ax.set_ylim(values.min() / 2, values.max() * 2)


def plot(out: Path, results: dict, rescaled: frozenset = frozenset()) -> None:
    """Relative variance (scale-free), variance (other scales marked) and cosine
    against batch size, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    estimators = list(dict.fromkeys(r["estimator"] for r in results[names[0]].rows))
    cmap = plt.get_cmap("tab20")
    colors = {e: cmap(i % 20) for i, e in enumerate(estimators)}
    for metric, ylabel, fname, log in (
        (
            "rel_variance",
            "tr Cov(g_hat) / |E g_hat|^2",
            "rel_variance_vs_batch_size.png",
            True,
        ),
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
                y = np.array([r[metric] for r in sel], float)
                lo = np.array([r[f"{metric}_lo"] for r in sel], float)
                hi = np.array([r[f"{metric}_hi"] for r in sel], float)
                other = metric == "variance" and e in rescaled
                label = f"{e} (other scale)" if other else e
                style = "o--" if other else "o-"
                ax.plot(n, y, style, color=colors[e], label=label, ms=3)
                ax.fill_between(n, lo, hi, color=colors[e], alpha=0.15)
            if log:
                first = [r for r in rows if r["estimator"] == "reinforce"]
                if first and np.isfinite(first[0][metric]):
                    n0, v0 = first[0]["batch_size"], first[0][metric]
                    grid = np.array([r["batch_size"] for r in first])
                    ax.plot(grid, v0 * n0 / grid, "k:", lw=1, label="1/n")
                _log_y(ax)
            else:
                ax.set_ylim(-0.1, 1.0)
                ax.axhline(0, color="gray", lw=0.5)
            ax.set_xscale("log", base=2)
            sizes = [r["batch_size"] for r in rows]
            ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.3)  # also when y is all nan
            ax.set_xlabel("batch size n (trajectories)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name}: |g| = {results[name].reference_norm:.3g}")
            ax.grid(alpha=0.3)
        axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        buffer = _io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        io.atomic_write_bytes(out / fname, buffer.getvalue())


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
    "reference's level groups, normal on the log scale for the variance, with the "
    "jackknife's double count of the degenerate term removed for bias2; their "
    "coverage is measured against exact answers by `rl-pg variance --problem "
    "enumerable` (`experiments/calibration.py`); `cos_mean`'s is nearer 90% "
    "(bias-corrected by the jackknife and not clipped, so it may exceed 1 by noise). "
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


def _stage_lines(name: str, res, config, exact_mode: bool, rescaled) -> list[str]:
    smallest, largest = min(config.batch_sizes), max(config.batch_sizes)
    critic = res.critic
    lines = [
        f"## {name}",
        "",
        f"Mean return {res.mean_return:.2f}; |g| = {_fmt(res.reference_norm)} "
        f"(standard error {_fmt(res.reference_se)}, levels as clusters). Critic "
        f"calibration (value in the study's reward units): mean V(s_t) "
        f"{critic['mean_value']:.3g} vs mean discounted return-to-go "
        f"{critic['mean_return_to_go']:.3g}, correlation {critic['correlation']:.2f}.",
        "",
    ]
    head = "| estimator | n | batches | cos to g | cos_mean | rel. variance | SNR | bias2 | variance |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if exact_mode:
        head += " exact bias2 | exact variance |"
        sep += "---:|---:|"
    lines += [head, sep]
    for r in res.rows:
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
    at_largest = [r for r in res.rows if r["batch_size"] == largest]
    finite = [r for r in at_largest if np.isfinite(r["rel_variance"])]
    lines.append("")
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
    if res.slopes:
        lines += [
            "",
            "Slope of log variance against log n (an i.i.d. estimator has -1; "
            "jackknife interval over the top-level batches):",
            "",
            "| estimator | slope |",
            "|---|---:|",
        ]
        lines += [
            f"| {e} | {s:.2f} [{lo:.2f}, {hi:.2f}] |"
            for e, (s, lo, hi) in res.slopes.items()
        ]
    ref = res.per_trajectory["reinforce (b = 0)"]
    lines += [
        "",
        "Per-trajectory variance tr Var[g_1] (an i.i.d. batch of n has 1/n of it). "
        "The oracle rows use b* computed from the whole reference sample, which no "
        "batch estimator has: `optimal_baseline` estimates b from the other "
        "trajectories of its batch and can do worse than a fixed constant at small n.",
        "",
        "| estimator / baseline | per-trajectory variance | relative to REINFORCE |",
        "|---|---:|---:|",
    ]
    for label, value in res.per_trajectory.items():
        lines.append(f"| {label} | {_fmt(value)} | {value / ref:.3f} |")
    lines.append("")
    return lines


def report(results: dict, config, wall: float, matmul: float, exact_mode=False) -> str:
    lines = [
        "# Policy-gradient estimator study",
        "",
        f"{len(results)} policies, batch sizes {list(config.batch_sizes)} "
        f"({config.num_batches} top-level batches of {max(config.batch_sizes)}, cut "
        f"into up to {config.max_batches_per_size} sub-batches per size), reference "
        f"gradient from {config.reference_trajectories} trajectories in "
        f"{config.reference_groups} groups of whole levels (REINFORCE with the "
        f"mean-return baseline). Wall-clock {wall:.0f} s. Plots: "
        "`rel_variance_vs_batch_size.png`, `variance_vs_batch_size.png`, "
        "`cosine_vs_batch_size.png`."
        + (
            " Exact mode: the enumerable MDP, exact values beside the estimates."
            if exact_mode
            else ""
        ),
        "",
        METHODS,
        "",
        OBJECTIVES.format(gamma=config.suite.gamma, lam=config.suite.lam),
        "",
    ]
    for name, res in results.items():
        lines += _stage_lines(name, res, config, exact_mode, _rescaled(config))
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
        + f". Batch phase "
        f"{perf['batch_phase_seconds']:.1f} s per stage.",
        "",
    ]
    return "\n".join(lines)


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
