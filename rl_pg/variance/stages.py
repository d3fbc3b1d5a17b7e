"""The policies a study looks at ("stages") and how to get them.

A :class:`Stage` is one policy with its problem: a Flappy Bird checkpoint
(:func:`flappy_stages`, default the shipped initial, partial and good policies,
or every policy a training run kept, :func:`run_checkpoints`), a freshly
initialised policy, params given from Python, or a tabular policy of the
enumerable MDP (:func:`enumerable_stages`). :func:`job_stages` builds a
:class:`~rl_pg.variance.job.VarianceJob`'s.
"""

import dataclasses
import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rl_pg import checkpoint, enumerable, envs, policies
from rl_pg import estimators as estimators_lib
from rl_pg.variance import exact, problems

STAGES = ("initial", "partial", "good")


class Stage(NamedTuple):
    """One policy of the study with everything needed to study it on its own."""

    label: str  # unique among the stages
    params: Any
    problem: problems.Problem
    horizon: int
    key: str  # stages with equal keys share compiled runners
    description: dict
    env: Any = None  # the gymnax env and params (Flappy Bird stages)
    env_params: Any = None
    has_critic: bool = True  # whether apply_fn returns a learned V (else zeros)


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
    apply_fn = problems.critic_in_reward_units(policy.apply, scale)
    problem = problems.flappy_problem(apply_fn, env, env_params, horizon, group_size)
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
    return Stage(
        label,
        params,
        problem,
        horizon,
        key,
        description,
        env,
        env_params,
        has_critic=policy.has_value,
    )


def _initial_stage(horizon: int, group_size: int, env_id: str) -> Stage:
    """A freshly initialised policy (CNN for pixels, else an MLP) in ``env_id``."""
    env, env_params = envs.make(env_id)
    kind = "cnn" if env.obs_mode == "pixels" else "mlp"
    policy = policies.cnn_policy(2) if kind == "cnn" else policies.mlp_policy(2)
    obs = jnp.zeros(env.observation_space(env_params).shape)
    params = policy.init(jax.random.PRNGKey(0), obs)
    problem = problems.flappy_problem(
        policy.apply, env, env_params, horizon, group_size
    )
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
    initialised policy for another ``env_id``); a training run directory means
    its best policy (:func:`rl_pg.checkpoint.policy_dir`), labelled by the path
    given. Every path, and every checkpoint's env against ``env_id``, is checked
    before anything compiles."""
    if paths:
        paths = [Path(p) for p in paths]
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise ValueError(f"checkpoint(s) not found: {', '.join(missing)}")
        labels = stage_labels(paths)
        for p in paths:
            check_policy_gradient(p, *_written_by(p))
        given, paths = paths, [checkpoint.policy_dir(p) for p in paths]
        resolved = [os.path.realpath(p) for p in paths]
        if len(set(resolved)) < len(resolved):
            raise ValueError(
                "the same policy is given twice: "
                f"{', '.join(map(str, given))} name {', '.join(resolved)}"
            )
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
    (``rl-pg train --keep-checkpoints all``), in training order. Runs of
    value-based algorithms (Q-learning, DQN) are refused: no policy gradient."""
    root = Path(run_dir) / "checkpoints" / "evaluations"
    if not Path(run_dir).is_dir():
        raise ValueError(f"--run {run_dir}: no such directory")
    algo, _ = _written_by(Path(run_dir))  # None: not a training run (below)
    check_policy_gradient(
        run_dir, algo, "run", " (trained with --keep-checkpoints all)"
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


POLICY_GRADIENT_ALGOS = ("reinforce", "a2c", "ppo", "grpo")


def check_policy_gradient(
    path: str | Path, algo: str | None, what: str, hint: str = ""
) -> None:
    """Refuse a ``what`` (``"run"`` or ``"checkpoint"``) that ``algo`` wrote
    unless a policy gradient did (None: unrecorded, let through): value-based
    policies (Q-learning, DQN) have no policy gradient to study."""
    if algo is not None and algo not in POLICY_GRADIENT_ALGOS:
        raise ValueError(
            f"{path} is a {algo} {what}, whose policies are not policy-gradient "
            f"policies: the variance study needs a {what} of "
            f"{', '.join(POLICY_GRADIENT_ALGOS)}{hint}"
        )


def _written_by(path: Path) -> tuple[str | None, str]:
    """``(algo, what)``: the algorithm that wrote ``path`` (None if unrecorded),
    read from a training run's ``config.json`` (``what = "run"``), else from the
    ``meta.json`` of the checkpoint ``path`` names or, a single file (a Q-table),
    its metadata."""
    if (path / "config.json").is_file():
        return _recorded_algo(lambda: (path / "config.json").read_text()), "run"
    try:
        found = checkpoint.policy_dir(path)
    except checkpoint.CheckpointError:
        return None, "checkpoint"  # not one: the loader says so

    def read() -> str:
        if not found.is_file():
            return (found / checkpoint.META_FILE).read_text()
        with np.load(found) as data:
            return str(data["metadata"])

    return _recorded_algo(read), "checkpoint"


def _recorded_algo(read) -> str | None:
    """The ``algo`` of the JSON object that ``read()`` returns, or None."""
    try:
        algo = json.loads(read()).get("algo")
    except Exception:  # noqa: BLE001 (unreadable: the loader reports it)
        return None
    return algo if isinstance(algo, str) else None


def enumerable_stages(group_size: int, policies_: dict | None = None) -> list[Stage]:
    """The exact mode's policies (or label -> tabular params) on the enumerable MDP."""
    problem = exact.enumerable_problem(group_size)
    horizon = enumerable.DEFAULT_MDP.horizon
    chosen = exact.enumerable_policies() if policies_ is None else policies_
    return [
        Stage(str(label), params, problem, horizon, "enumerable", {"policy": label})
        for label, params in chosen.items()
    ]


def _param_stages(policies_, policy, env_id, horizon, group_size) -> list[Stage]:
    env, env_params = _env(env_id)
    problem = _flappy_problem(policy.apply, env_id, horizon, group_size)
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
            has_critic=policy.has_value,
        )
        for label, params in policies_.items()
    ]


def job_stages(job, policies_: dict | None = None, policy=None) -> list[Stage]:
    """The stages of ``job`` (a :class:`~rl_pg.variance.job.VarianceJob`): the
    enumerable MDP's policies (or ``policies_``, label -> tabular params), else
    ``policies_`` of ``policy`` in ``job.env_id``, else the job's checkpoints."""
    if job.problem == "enumerable":
        return enumerable_stages(job.group_size, policies_)
    if policies_ is not None:
        if policy is None:
            raise ValueError("params given without their policy (policy=...)")
        env_id = job.env_id or "FlappyBird-v0"
        return _param_stages(policies_, policy, env_id, job.horizon, job.group_size)
    stages = flappy_stages(job.checkpoints, job.horizon, job.group_size, job.env_id)
    if job.decompose is not None and any(s.env is None for s in stages):
        raise ValueError("--decompose needs every stage's environment")
    return stages


@functools.cache
def _env(env_id: str):
    """``envs.make(env_id)``, once per id (jitted samplers close over the env)."""
    return envs.make(env_id)


@functools.cache
def _flappy_problem(apply_fn, env_id: str, horizon: int, group_size: int):
    """One :class:`~rl_pg.variance.problems.Problem` per policy, env, horizon and
    G, so that a second study of other params reuses the compiled runners."""
    env, env_params = _env(env_id)
    return problems.flappy_problem(apply_fn, env, env_params, horizon, group_size)


def without_critic(found: list[Stage], suite: problems.SuiteConfig) -> dict:
    """label -> the studied estimators that read a critic (``needs_critic``) of
    each stage whose policy has none (``value=None``: V = 0, so e.g.
    ``value_baseline`` would silently equal ``reward_to_go``); they are left out
    of that stage. ``ValueError`` (one line naming them) if the suite names them
    explicitly, i.e. is not the default set."""
    specs = problems.suite_specs(suite)
    critic = tuple(name for name, spec in specs.items() if spec.needs_critic)
    lacking = [s.label for s in found if not s.has_critic]
    if not critic or not lacking:
        return {}
    if tuple(suite.names) != problems.SuiteConfig().names:
        raise ValueError(
            f"estimator(s) {', '.join(critic)} need a critic, which the policy(ies) "
            f"{', '.join(lacking)} do not have (trained without a value head): drop "
            "them from the estimators (--estimators, or run_study's estimators=)"
        )
    return {label: critic for label in lacking}


def suite_without(suite: problems.SuiteConfig, names: tuple) -> problems.SuiteConfig:
    """``suite`` less the estimators whose output names are ``names``."""
    kept = tuple(
        ref for ref in suite.names if estimators_lib.resolve(ref).name not in names
    )
    return dataclasses.replace(suite, names=kept)
