"""Run a :class:`~rl_pg.variance.job.VarianceJob`: stages, runners, the study of
every stage, the decomposition step, then the report writer.

``run(job, out_dir)`` is ``rl-pg variance``; :func:`run_study` the study from
Python. Everything is validated, and every estimator traced, before the output
directory is created; the outputs are written once, at the end, from memory.
"""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import estimators as estimators_lib
from rl_pg import io, policies
from rl_pg.variance import decomposition, report, runners, stages, study
from rl_pg.variance import job as job_lib
from rl_pg.variance.problems import SuiteConfig, suite_specs
from rl_pg.variance.stages import Stage


def run(job: job_lib.VarianceJob, out_dir: str | Path, progress: bool = True) -> Path:
    """Run ``job`` (the ``rl-pg variance`` job) into the new directory ``out_dir``."""
    check_out(out_dir)
    found = stages.job_stages(job)
    if job.lag_kl is not None or job.lag_checkpoints is not None:
        from rl_pg.variance import lag_study

        return lag_study.run(job, found, out_dir, progress)
    mesh = runners.device_mesh(job.devices)
    return execute(job, found, out_dir, progress, mesh)[0]


def rerun(config_file: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Run a previous run's ``config.json`` again (same seed: the same results)."""
    return run(job_lib.load(config_file), out_dir, progress)


def check_out(out_dir: str | Path) -> None:
    """Refuse ``out_dir`` now (before anything compiles) if it is taken; one
    left by a study that was killed (a claim, no ``report.md``) is named as such,
    with the command that frees it (:func:`rl_pg.io.check_owned_out`)."""
    io.check_owned_out(
        out_dir, "a variance study", "report.md", ("variance", "run_study")
    )


def execute(
    job: job_lib.VarianceJob,
    found: list[Stage],
    out_dir: str | Path | None,
    progress: bool = True,
    mesh=None,
    command: str = "variance",
) -> tuple[Path | None, dict]:
    """Study every stage of ``found``, decompose if the job asks, and write the
    outputs into ``out_dir`` (new) if given. Estimators that read a critic are
    left out of stages whose policy has none (refused if named explicitly:
    :func:`~rl_pg.variance.stages.without_critic`). The directory is owned
    (:func:`rl_pg.io.owned_output`): if the study dies or is interrupted,
    everything it wrote there is removed, so the same command may run again.

    Returns the output directory (None without ``out_dir``) and the results
    (label -> :class:`~rl_pg.variance.study.StageResult`).
    """
    config = job.study
    left_out = stages.without_critic(found, config.suite)
    configs = {
        s.label: _config_without(config, left_out.get(s.label, ())) for s in found
    }
    built = _build_runners(found, configs, mesh)
    if out_dir is None:
        return None, _study_stages(found, built, configs, progress)
    owner = "rl-pg variance" if command == "variance" else command
    with io.owned_output(out_dir, owner) as out:
        described = {s.label: s.description for s in found}
        io.write_config(out, job.to_dict(described, command))
        start = time.perf_counter()
        results = _study_stages(found, built, configs, progress)
        wall = time.perf_counter() - start
        found_rows = None
        if job.decompose is not None:
            found_rows = decompose_step(job, found, progress)
        written = report.JobResults(
            stages=results,
            config=config,
            wall=wall,
            matmul=runners.matmul_flops_per_s(),
            exact_mode=job.problem == "enumerable",
            env_steps={s.label: s.description.get("env_steps") for s in found},
            decomposition=found_rows,
            job=job,
            devices=_devices_text(mesh),
            left_out=left_out,
            no_critic=tuple(s.label for s in found if not s.has_critic),
        )
        report.write(out, written)
    return out, results


def _devices_text(mesh) -> str:
    """Where the study ran, for the report."""
    if mesh is not None:
        kinds = sorted({d.platform for d in mesh.devices.flat})
        return f"a mesh of {mesh.size} {'/'.join(kinds)} device(s)"
    local = jax.local_devices()
    return f"{len(local)} local {local[0].platform} device(s), no mesh"


def _config_without(config: study.StudyConfig, names: tuple) -> study.StudyConfig:
    if not names:
        return config
    return dataclasses.replace(config, suite=stages.suite_without(config.suite, names))


def _study_stages(found: list[Stage], built: dict, configs: dict, progress) -> dict:
    """label -> :func:`~rl_pg.variance.study.study_stage` of every stage
    (``configs``: label -> its study config)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        config = next(iter(configs.values()))
        total = study.total_work(config, len(found))
        bar = tqdm(total=total, unit="traj", desc="variance study")
    results = {}
    try:
        for stage in found:
            if bar is not None:
                bar.set_postfix_str(stage.label)
            results[stage.label] = study.study_stage(
                stage.params,
                built[stage.key],
                configs[stage.label],
                stage.horizon,
                bar.update if bar else None,
            )
    finally:  # also on Ctrl-C: what is printed next starts on its own line
        if bar is not None:
            bar.close()
    return results


def _build_runners(found: list[Stage], configs: dict, mesh) -> dict:
    """Runners per distinct stage key (reused across calls with the same problem,
    sizes and mesh, so nothing compiles again); validates sizes and estimators,
    and traces every estimator on one batch (a user loss that cannot be traced
    fails here, before anything is written)."""
    built = {}
    for stage in found:
        if stage.key not in built:
            built[stage.key] = runners.shared_runners(
                stage.problem, configs[stage.label], mesh
            )
            keys = jax.random.split(jax.random.PRNGKey(0), mesh.size if mesh else 1)
            try:
                jax.eval_shape(
                    built[stage.key].batch, stage.params, keys, jnp.float32(0.0)
                )
            except Exception as e:  # noqa: BLE001 (reported with its type)
                raise ValueError(
                    f"the study's estimators fail on stage {stage.label!r}: "
                    f"{type(e).__name__}: {e}"
                ) from e
    return built


def decompose_step(
    job: job_lib.VarianceJob, found: list[Stage], progress: bool = False
) -> report.Decomposition:
    """Variance decomposition rows (Tucker et al. 2018) of every stage, with the
    exact values on the enumerable MDP; see :mod:`rl_pg.variance.decomposition`.
    A stage whose policy has no critic gets no rows of the estimators that read
    one (:data:`~rl_pg.variance.decomposition.LEARNED_CRITIC`: with V = 0 they
    would repeat ``reward_to_go``'s). ``progress``: a bar over the stages."""
    start = time.perf_counter()
    sizes = dataclasses.asdict(job.decompose)
    key = jax.random.fold_in(jax.random.PRNGKey(job.study.seed), 2**20)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(found), unit="policy", desc="variance decomposition")
    rows = []
    try:
        for i, stage in enumerate(found):
            if bar is not None:
                bar.set_postfix_str(stage.label)
            dropped = () if stage.has_critic else decomposition.LEARNED_CRITIC
            for r in _decompose_stage(job, stage, jax.random.fold_in(key, i), sizes):
                if r["estimator"] not in dropped:
                    rows.append({**r, "checkpoint": stage.label})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    no_critic = tuple(s.label for s in found if not s.has_critic)
    return report.Decomposition(rows, sizes, time.perf_counter() - start, no_critic)


def _decompose_stage(job, stage: Stage, key, sizes: dict) -> list[dict]:
    """One stage's decomposition rows, each with its ``exact_variance`` (nan
    unless the enumerable MDP's)."""
    suite = job.study.suite
    common = dict(gamma=suite.gamma, lam=suite.lam, **sizes)
    if job.problem == "enumerable":
        found_rows = decomposition.decompose_enumerable(key, stage.params, **common)
        exact = {
            (r["estimator"], r["component"]): r["variance"]
            for r in decomposition.decompose_exact(
                stage.params, gamma=suite.gamma, lam=suite.lam
            )
        }
    else:
        found_rows = decomposition.decompose(
            key,
            stage.params,
            stage.problem.apply_fn,  # the critic already in raw reward units
            stage.env,
            stage.env_params,
            horizon=stage.horizon,
            **common,
        )
        exact = {}
    return [
        {**r, "exact_variance": exact.get((r["estimator"], r["component"]), np.nan)}
        for r in found_rows
    ]


def run_study(
    policies: "dict[str, Any] | None" = None,
    *,
    policy: "policies.Policy | None" = None,
    checkpoints: "list[str | Path] | None" = None,
    env_id: str | None = None,
    problem: str = "flappy",
    estimators: "list[str | Callable] | None" = None,
    batch_sizes: tuple[int, ...] = (4, 16, 64),
    num_batches: int = 32,
    max_batches_per_size: int = 512,
    reference_trajectories: int = 16_384,
    reference_groups: int = 128,
    chunk: int = 1024,
    horizon: int | None = None,
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
      env_id: the policies' env (default FlappyBird-v0; not with the exact problem).
      horizon: steps per episode (default 128; the enumerable MDP has 4 of its own).
      group_size: G episodes per level.
      mesh: a :func:`rl_pg.distributed.batch_mesh` to shard the study over.
      out_dir: also write the CLI's outputs into this new directory.

    Returns:
      One dict per (policy, estimator, batch size) with the columns of
      ``results.csv``. A second call with the same policy (or problem), sizes
      and mesh compiles nothing again.
    """
    config = study.StudyConfig(
        batch_sizes=tuple(int(n) for n in batch_sizes),
        num_batches=num_batches,
        max_batches_per_size=max_batches_per_size,
        reference_trajectories=reference_trajectories,
        reference_groups=reference_groups,
        chunk=chunk,
        suite=SuiteConfig(names=_estimator_refs(estimators)),
    )
    enumerable_ = problem == "enumerable"
    given = dict(checkpoints=checkpoints, env_id=env_id, horizon=horizon)
    ignored = [k for k, v in given.items() if v is not None and enumerable_]
    if checkpoints is not None and policies is not None:
        ignored.append("checkpoints (with policies)")
    if ignored:
        raise ValueError(
            f"run_study: {', '.join(ignored)} would be ignored: the exact problem "
            "studies its own MDP and policies, and policies= replaces checkpoints="
        )
    horizon = 128 if horizon is None else horizon  # the defaults, once checked
    env_id = "FlappyBird-v0" if env_id is None else env_id
    job = job_lib.VarianceJob(
        preset=None,
        problem=problem,
        study=config,
        horizon=job_lib.ENUMERABLE_HORIZON if enumerable_ else horizon,
        group_size=group_size,
        seed=seed,
        checkpoints=None if enumerable_ or policies is not None else checkpoints,
        env_id=None if enumerable_ else env_id,
    )
    found = stages.job_stages(job, policies, policy)
    _, results = execute(job, found, out_dir, progress, mesh, command="run_study")
    return report.result_rows(results)


def _estimator_refs(estimators) -> tuple[str, ...]:
    """Names / module:function strings for SuiteConfig (functions -> references,
    so that config.json can rerun them)."""
    if estimators is None:
        return SuiteConfig().names
    if isinstance(estimators, str) or callable(estimators):
        estimators = [estimators]
    refs = []
    for e in estimators:
        if callable(e):
            spec = estimators_lib.resolve(e)
            in_registry = estimators_lib.REGISTRY.get(spec.name)
            registered = in_registry is not None and in_registry.loss is e
            refs.append(spec.name if registered else estimators_lib.reference(e))
        else:
            refs.append(e)
    refs = tuple(refs)
    suite_specs(SuiteConfig(names=refs))  # validate now
    return refs
