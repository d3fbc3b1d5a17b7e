"""One ``rl-pg variance`` run as a value: :class:`VarianceJob`.

The CLI (``rl-pg variance``), ``--config`` reruns, the presets and
:func:`rl_pg.variance.run_study` all build a :class:`VarianceJob`;
``config.json`` is :meth:`VarianceJob.to_dict` (plus the stages' descriptions
and the package versions) and :func:`load` reads it back, also from runs written
before this class existed. Every check runs when the job is built, before
anything compiles.

Presets (``preset(name)``): ``quick`` (about a minute on a 2-core CPU),
``full`` (research grade) on the shipped Flappy Bird policies and ``lag`` (the
policy-lag study, :mod:`rl_pg.variance.lag_study`, at :data:`LAG_LEVELS`); with
``problem="enumerable"`` the exact mode's sizes (:data:`ENUMERABLE_STUDY`).
"""

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from rl_pg import enumerable
from rl_pg import estimators as estimators_lib
from rl_pg.algos.config import seed_problem
from rl_pg.variance.problems import SuiteConfig, suite_specs
from rl_pg.variance.study import StudyConfig

PROBLEMS = ("flappy", "enumerable")
LAG_LEVELS = (0.0, 0.003, 0.01, 0.03, 0.1)  # the lag preset's KL(mu || pi) levels
# the lag study's default estimators: the registry's ``in_lag_study`` entries and
# reinforce (trajectory_is's on-policy counterpart; naive is reward_to_go's formula)
LAG_ESTIMATORS = ("reinforce",) + tuple(
    name for name, s in estimators_lib.REGISTRY.items() if s.in_lag_study
)


@dataclasses.dataclass(frozen=True)
class DecomposeSizes:
    """Sizes of the variance decomposition (:mod:`rl_pg.variance.decomposition`):
    I states, K actions at each, K' continuations of each (state, action)."""

    num_states: int
    num_actions: int
    num_continuations: int

    def __post_init__(self):
        if self.num_states < 3:
            raise ValueError(
                f"decompose num_states must be >= 3, got {self.num_states}"
            )
        if min(self.num_actions, self.num_continuations) < 2:
            raise ValueError(
                "decompose num_actions and num_continuations must be >= 2, got "
                f"{self.num_actions} and {self.num_continuations}"
            )


QUICK_STUDY = StudyConfig(
    batch_sizes=(4, 16, 64),
    num_batches=32,
    max_batches_per_size=512,
    reference_trajectories=16_384,
    reference_groups=128,
    chunk=1024,
    steps_per_call=2**14,
)
FULL_STUDY = StudyConfig(
    batch_sizes=(4, 16, 64, 256, 1024),
    num_batches=128,
    max_batches_per_size=1024,
    reference_trajectories=131_072,
    reference_groups=128,
    chunk=2048,
    steps_per_call=2**14,
)
# the lag preset's sizes: 3 stages x 5 KL levels in < 3 minutes on 2 CPU cores
LAG_STUDY = StudyConfig(
    batch_sizes=(4, 16),
    num_batches=16,
    max_batches_per_size=64,
    reference_trajectories=2048,
    reference_groups=64,
    chunk=1024,
    steps_per_call=2**13,
    suite=SuiteConfig(names=LAG_ESTIMATORS),
)
# the exact mode's sizes (the enumerable MDP's episodes have 4 steps)
ENUMERABLE_STUDY = StudyConfig(
    batch_sizes=(4, 16, 64),
    num_batches=64,
    max_batches_per_size=1024,
    reference_trajectories=2**15,
    reference_groups=128,
    chunk=2**13,
)
ENUMERABLE_HORIZON = enumerable.DEFAULT_MDP.horizon
MAX_HORIZON = 10_000  # Flappy Bird's time limit (gymnax's classic envs: <= 1,000)


@dataclasses.dataclass(frozen=True)
class VarianceJob:
    """Everything one study run needs (what ``config.json`` records).

    Attributes:
      preset: the preset the sizes came from (recorded; None: given directly).
      problem: ``flappy`` (policies in Flappy Bird) or ``enumerable`` (the exactly
        solvable MDP: exact values beside the estimates).
      study: the study's sizes and estimators; its ``seed`` is set to ``seed``.
      horizon: steps per episode (the enumerable MDP has its own, 4).
      group_size: G episodes per level.
      seed: the study's seed (the same seed gives the same results).
      checkpoints: policy checkpoint directories (None: the shipped policies).
      env_id: the checkpoints' env (checked), or the env of a fresh policy.
      devices: shard over this many local devices, or ``"all"`` (None: no mesh).
      decompose: also decompose the per-step variance at these sizes.
      lag_kl: KL(mu || pi) levels of the policy-lag study (each stage is the
        behaviour mu, targets along PPO's first-epoch direction), or None.
      lag_checkpoints: K, the policy-lag study on real training lag: behaviour
        checkpoint t, target checkpoint t + K of ``checkpoints`` (a run's kept
        policies, in training order), or None.
    """

    preset: str | None = "quick"
    problem: str = "flappy"
    study: StudyConfig = QUICK_STUDY
    horizon: int = 128
    group_size: int = 4
    seed: int = 0
    checkpoints: tuple[str, ...] | None = None
    env_id: str | None = None
    devices: int | str | None = None
    decompose: DecomposeSizes | None = None
    lag_kl: tuple[float, ...] | None = None
    lag_checkpoints: int | None = None

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(
                f"preset must be one of {list(PRESETS)}, got {self.preset!r}"
            )
        if self.problem not in PROBLEMS:
            raise ValueError(
                f"problem must be one of {list(PROBLEMS)}, got {self.problem!r}"
            )
        if not isinstance(self.study, StudyConfig):
            raise ValueError(f"study must be a StudyConfig, got {self.study!r}")
        if (problem := seed_problem(self.seed)) is not None:
            raise ValueError(problem)
        if self.horizon < 1 or self.group_size < 1:
            raise ValueError(
                "horizon and group_size must be >= 1, got "
                f"{self.horizon}, {self.group_size}"
            )
        if self.horizon > MAX_HORIZON:
            raise ValueError(
                f"horizon must be <= {MAX_HORIZON:,} (Flappy Bird's time limit: "
                f"an episode ends there), got {self.horizon:,}"
            )
        if self.problem == "enumerable":
            _check_enumerable(self)
        object.__setattr__(self, "lag_kl", _lag_levels(self.lag_kl))
        _check_lag(self)
        decompose = self.decompose
        if isinstance(decompose, dict):
            decompose = DecomposeSizes(**decompose)
        checkpoints = self.checkpoints
        if checkpoints is not None:
            checkpoints = tuple(str(p) for p in checkpoints) or None
        normal = {
            "study": dataclasses.replace(self.study, seed=int(self.seed)),
            "devices": _devices(self.devices),
            "decompose": decompose,
            "checkpoints": checkpoints,
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)
        suite_specs(self.study.suite)  # unknown estimators fail here

    def replace(self, **changes) -> "VarianceJob":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self, stages: dict | None = None, command: str = "variance") -> dict:
        """The ``config.json`` form (``stages``: label -> description)."""
        return {
            "command": command,
            "preset": self.preset,
            "problem": self.problem,
            "seed": self.seed,
            "checkpoints": list(self.checkpoints) if self.checkpoints else None,
            "env_id": self.env_id,
            "devices": self.devices,
            "stages": stages or {},
            "horizon": self.horizon,
            "group_size": self.group_size,
            "study": dataclasses.asdict(self.study),
            "decompose": (
                dataclasses.asdict(self.decompose) if self.decompose else None
            ),
            "lag_kl": list(self.lag_kl) if self.lag_kl is not None else None,
            "lag_checkpoints": self.lag_checkpoints,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "VarianceJob":
        """The job of a ``config.json`` (also one written before this class: a
        ``decompose`` dict or a bool, ``devices`` as text)."""
        decompose = data.get("decompose")
        if decompose is True or decompose == 1:
            decompose = PRESETS[data["preset"]]["decompose"]
        return cls(
            preset=data["preset"],
            problem=data.get("problem", "flappy"),
            study=study_config_from_dict(data["study"]),
            horizon=int(data.get("horizon") or 128),
            group_size=int(data.get("group_size") or 4),
            seed=int(data["seed"]),
            checkpoints=data.get("checkpoints"),
            env_id=data.get("env_id"),
            devices=data.get("devices"),
            decompose=decompose or None,
            lag_kl=data.get("lag_kl"),
            lag_checkpoints=data.get("lag_checkpoints"),
        )


def _check_enumerable(job: VarianceJob) -> None:
    if job.checkpoints or job.env_id:
        raise ValueError("--checkpoints and --env-id apply to --problem flappy only")
    if job.horizon != ENUMERABLE_HORIZON:
        raise ValueError(
            f"horizon: the enumerable MDP's episodes have {ENUMERABLE_HORIZON} "
            f"steps, got {job.horizon}"
        )


def _lag_levels(levels: Any) -> tuple[float, ...] | None:
    """None, or the KL levels as floats (text "0,0.01" accepted), each finite and
    >= 0, strictly increasing."""
    if levels is None:
        return None
    if isinstance(levels, str):
        levels = [v for v in levels.split(",") if v.strip()]
    try:
        found = tuple(float(v) for v in levels)
    except (TypeError, ValueError):
        raise ValueError(
            f"lag_kl must be comma-separated numbers, got {levels!r}"
        ) from None
    bad = [k for k in found if not (math.isfinite(k) and k >= 0)]
    if not found or bad:
        raise ValueError(f"lag_kl levels must be finite and >= 0, got {list(found)}")
    if any(b <= a for a, b in zip(found, found[1:], strict=False)):
        raise ValueError(
            f"lag_kl levels must be strictly increasing, got {list(found)}"
        )
    return found


def _check_lag(job: "VarianceJob") -> None:
    """--lag-kl and --lag-checkpoints: not both, K an int >= 1 with K + 1 policies."""
    k = job.lag_checkpoints
    if k is None:
        return
    if job.lag_kl is not None:
        raise ValueError("give --lag-kl or --lag-checkpoints, not both")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"lag_checkpoints must be an int >= 1, got {k!r}")
    if job.problem != "flappy" or not job.checkpoints:
        raise ValueError("--lag-checkpoints needs --run RUN_DIR (a run's checkpoints)")
    if len(job.checkpoints) <= k:
        raise ValueError(
            f"--lag-checkpoints {k} needs at least {k + 1} kept policies, the run "
            f"has {len(job.checkpoints)}"
        )


def _devices(devices: Any) -> int | str | None:
    """None, ``"all"`` or a positive int (from an int or its text)."""
    if devices is None or devices == "all":
        return devices
    try:
        count = int(devices)
    except (TypeError, ValueError):
        raise ValueError(
            f"devices must be a positive int or 'all', got {devices!r}"
        ) from None
    if count < 1 or count != float(devices):
        raise ValueError(f"devices must be a positive int or 'all', got {devices!r}")
    return count


PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        study=QUICK_STUDY,
        horizon=128,
        group_size=4,
        decompose=DecomposeSizes(num_states=256, num_actions=4, num_continuations=4),
    ),
    "full": dict(
        study=FULL_STUDY,
        horizon=256,
        group_size=4,
        decompose=DecomposeSizes(num_states=1024, num_actions=8, num_continuations=8),
    ),
    "lag": dict(
        study=LAG_STUDY,
        horizon=128,
        group_size=4,
        decompose=DecomposeSizes(num_states=256, num_actions=4, num_continuations=4),
    ),
}


def preset(
    name: str = "quick",
    problem: str = "flappy",
    *,
    estimators: str | None = None,
    decompose: bool = False,
    sizes: dict | None = None,
    **fields,
) -> VarianceJob:
    """The job of preset ``name`` (the exact mode's sizes for ``problem=
    "enumerable"``) with ``fields`` of :class:`VarianceJob` replaced (None keeps the
    preset's), ``estimators`` (comma-separated names and/or ``module:function``)
    and study ``sizes`` (``batch_sizes``, ``num_batches``,
    ``reference_trajectories``, see :func:`override_study`); ``decompose`` at the
    preset's sizes."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    setting = PRESETS[name]
    fields = {k: v for k, v in fields.items() if v is not None}
    enumerable_ = problem == "enumerable"
    if enumerable_ and name == "full":
        raise ValueError(
            "--preset full sizes the Flappy Bird study; the exact problem "
            "(--problem enumerable) has its own sizes: drop --preset full (the "
            "exact sizes take --batch-sizes, --num-batches, --reference-trajectories)"
        )
    lag = fields.get("lag_kl") is not None or fields.get("lag_checkpoints")
    if name == "lag" and not lag:
        fields["lag_kl"] = LAG_LEVELS
    if (lag or name == "lag") and estimators is None:  # the lag study's estimators
        estimators = ",".join(LAG_ESTIMATORS)
    base = {
        "study": ENUMERABLE_STUDY if enumerable_ else setting["study"],
        "horizon": ENUMERABLE_HORIZON if enumerable_ else setting["horizon"],
        "group_size": setting["group_size"],
        "decompose": setting["decompose"] if decompose else None,
    }
    merged = base | fields
    sizes = {k: v for k, v in (sizes or {}).items() if v is not None}
    if sizes or estimators is not None:
        merged["study"] = override_study(
            merged["study"], estimators, merged["group_size"], **sizes
        )
    return VarianceJob(preset=name, problem=problem, **merged)


def override_study(
    base: StudyConfig,
    estimators: str | None = None,
    group_size: int = 1,
    **sizes,
) -> StudyConfig:
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
        changes |= _reference_sizes(
            base, int(changes["reference_trajectories"]), group_size
        )
    if estimators is not None:
        names = tuple(e.strip() for e in estimators.split(","))
        if not all(names):
            raise ValueError(f"--estimators: empty name in the list {estimators!r}")
        changes["suite"] = dataclasses.replace(base.suite, names=names)
    config = dataclasses.replace(base, **changes)
    suite_specs(config.suite)  # unknown names fail here, before compiling
    return config


def _reference_sizes(base: StudyConfig, n: int, group_size: int) -> dict:
    """Chunk and reference groups for ``n`` reference trajectories: the largest
    at most the base's that still divide n (groups of whole levels)."""
    if n < 4 * group_size:
        raise ValueError(
            f"reference_trajectories must be >= 4 groups of {group_size}, got {n}"
        )
    chunk = min(base.chunk, n)
    while n % chunk:
        chunk -= 1
    groups = min(base.reference_groups, n)
    while groups > 4 and (
        n % groups or chunk % (n // groups) or (n // groups) % group_size
    ):
        groups -= 1
    return {"reference_trajectories": n, "chunk": chunk, "reference_groups": groups}


def study_config_from_dict(data: dict) -> StudyConfig:
    """A :class:`StudyConfig` from its ``dataclasses.asdict`` form (config.json)."""
    data = dict(data)
    suite = dict(data.pop("suite", {}))
    if "names" in suite:
        suite["names"] = tuple(suite["names"])
    data["batch_sizes"] = tuple(data.get("batch_sizes", ()))
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown study settings {unknown}; known: {sorted(known)}")
    return StudyConfig(**data, suite=SuiteConfig(**suite))


def load(config_file: str | Path) -> VarianceJob:
    """The job of a previous run's ``config.json`` (rerun: the same results)."""
    path = Path(config_file)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        return VarianceJob.from_dict(json.loads(path.read_text()))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"--config {path} is not a variance run's config.json: {e}"
        ) from e
