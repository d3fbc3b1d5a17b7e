"""The study as an instrument: the registry, run_study, the CLI's options, --config."""

import csv
import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from compiles import compiles

from rl_pg import cli, distributed, estimators
from rl_pg.variance import job, pipeline, report, run_study, stages

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = dict(
    batch_sizes=(4, 16),
    num_batches=8,
    max_batches_per_size=32,
    reference_trajectories=2048,
    reference_groups=16,
    chunk=2048,
)


def scaled_reinforce(params, batch, *, apply_fn):
    """3 x REINFORCE: the same estimates, another scale."""
    loss, aux = estimators.reinforce(params, batch, apply_fn=apply_fn)
    return 3.0 * loss, aux


@pytest.mark.slow
def test_readme_example_runs(capsys):
    text = README.read_text()
    match = re.search(
        r"<!-- example: custom estimator -->\s*```python\n(.*?)```", text, re.S
    )
    assert match, "README lost its custom-estimator example"
    module = types.ModuleType("readme_example")  # as if saved and run as a module
    sys.modules[module.__name__] = module
    try:
        exec(compile(match.group(1), "README example", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    out = capsys.readouterr().out
    assert {"reinforce", "rloo", "median_baseline"} <= set(
        re.findall(r"^(\w+)", out, re.M)
    )


@pytest.mark.slow
def test_a_scaled_copy_has_exactly_the_scaled_variance():
    rows = run_study(
        problem="enumerable", estimators=["reinforce", scaled_reinforce], **SMALL
    )
    by = {(r["checkpoint"], r["estimator"], r["batch_size"]): r for r in rows}
    for (stage, name, n), row in by.items():
        if name != "reinforce":
            continue
        copy = by[(stage, "scaled_reinforce", n)]
        # common random numbers: the same batches, so exactly 9x the variance
        assert copy["variance"] == pytest.approx(9 * row["variance"], rel=1e-4)
        for m in ("cos_mean", "rel_variance", "snr", "cos_true", "cos_pairwise"):
            assert copy[m] == pytest.approx(row[m], rel=1e-4, abs=1e-6), m
        assert np.isnan(copy["exact_bias2"])  # nothing is assumed about it


@pytest.mark.slow
def test_registry_rejects_duplicates_and_accepts_new_estimators():
    with pytest.raises(ValueError, match="already registered"):
        estimators.register(estimators.EstimatorSpec("reinforce", estimators.reinforce))
    with pytest.raises(ValueError, match="signature"):
        estimators.register(estimators.EstimatorSpec("bad", lambda p, b: (0.0, None)))
    spec = estimators.EstimatorSpec(
        "triple_reinforce", scaled_reinforce, per_trajectory=True, in_study=False
    )
    estimators.register(spec)
    try:
        assert estimators.resolve("triple_reinforce") is spec
        assert estimators.resolve(scaled_reinforce) is spec
        rows = run_study(problem="enumerable", estimators=["triple_reinforce"], **SMALL)
        # registered as per-trajectory: its exact variance is known
        assert all(np.isfinite(r["exact_variance"]) for r in rows)
    finally:
        estimators.REGISTRY.pop("triple_reinforce")
        estimators.ESTIMATORS.pop("triple_reinforce")


@pytest.mark.slow
def test_exact_mode_without_a_per_trajectory_estimator():
    """Only batch-level estimators: their exact bias from the mean factor, no
    exact variance (there is no one-column estimate to enumerate)."""
    rows = run_study(problem="enumerable", estimators=["rloo", "dr_grpo"], **SMALL)
    assert {r["estimator"] for r in rows} == {"rloo", "dr_grpo"}
    for row in rows:
        assert np.isnan(row["exact_variance"])
        if row["estimator"] == "rloo":  # unbiased
            assert row["exact_bias2"] == pytest.approx(0.0, abs=1e-9)
        else:  # shrunk by 1/T: biased
            assert row["exact_bias2"] > 0


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["variance", *args])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


def _results(path):
    return (path / "results.csv").read_bytes()


@pytest.mark.slow
def test_cli_user_estimator_and_config_rerun(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_estimators.py").write_text(
        "from rl_pg import estimators\n\n\n"
        "def half_reinforce(params, batch, *, apply_fn):\n"
        "    loss, aux = estimators.reinforce(params, batch, apply_fn=apply_fn)\n"
        "    return 0.5 * loss, aux\n"
    )
    monkeypatch.chdir(tmp_path)
    common = [
        "--problem", "enumerable", "--batch-sizes", "4,16", "--num-batches", "8",
        "--reference-trajectories", "2048",
    ]  # fmt: skip
    code, out = _cli(
        [
            "--out",
            "a",
            *common,
            "--estimators",
            "reinforce,my_estimators:half_reinforce",
        ],
        capsys,
    )
    assert code == 0, out
    with open(tmp_path / "a" / "results.csv") as f:
        names = {row["estimator"] for row in csv.DictReader(f)}
    assert names == {"reinforce", "half_reinforce"}
    code, out = _cli(["--out", "b", "--config", "a/config.json"], capsys)
    assert code == 0, out
    assert _results(tmp_path / "b") == _results(tmp_path / "a")  # bit-identical


@pytest.mark.parametrize(
    "args, message",
    [
        (["--estimators", "nope"], "Unknown estimator 'nope'"),
        (["--estimators", "no_such_module:f"], "cannot import module"),
        (["--estimators", "reinforce,reinforce"], "two studied estimators"),
        (["--batch-sizes", "4,6"], "divide the largest"),
        (["--num-batches", "2"], "num_batches"),
        (["--num-batches", "16385"], "num_batches must be <= 16,384"),
        (["--group-size", "3", "--problem", "enumerable"], "multiples of group_size"),
        (["--env-id", "FlappyBird-lidar-v0", "--problem", "enumerable"], "flappy only"),
        (["--checkpoints", "missing_dir"], "not found"),
        (["--devices", "99"], "devices must be between 1 and"),
        (["--config", "missing.json"], "no such file"),
        (["--config", "c.json", "--seed", "3"], "drop --seed"),
        (["--reference-trajectories", "0"], "reference_trajectories must be"),
        (["--seed", "4294967296"], "--seed: expected an int in [0, 2**32)"),
        (["--batch-sizes", "4,4,16"], "batch_sizes must differ"),
        (["--horizon", "100000000"], "horizon must be <= 10,000"),
        (["--estimators", "reinforce,"], "--estimators: empty name in the list"),
        (["--estimators", ""], "--estimators: empty name in the list"),
        (["--preset", "lag", "--estimators", ""], "--estimators: empty name"),
        (["--preset", "full", "--problem", "enumerable"], "has its own sizes"),
    ],
)
def test_cli_bad_input_is_a_clear_error_and_writes_nothing(
    tmp_path, monkeypatch, capsys, args, message
):
    monkeypatch.chdir(tmp_path)
    code, out = _cli(["--out", "out", *args], capsys)
    assert code == 2 and message in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "out").exists()


def test_one_policy_under_two_paths_is_refused(tmp_path, capsys):
    good = stages.shipped_checkpoints()[-1]
    (tmp_path / "alias").symlink_to(good)
    args = ["--checkpoints", str(good), str(tmp_path / "alias")]
    code, out = _cli(["--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and "the same policy is given twice" in out, out
    assert not (tmp_path / "out").exists()


def test_run_study_needs_the_policy_of_its_params():
    with pytest.raises(ValueError, match="policy"):
        run_study(policies={"a": {"w": jnp.zeros(2)}}, **SMALL)
    with pytest.raises(ValueError, match="problem"):
        run_study(problem="atari", **SMALL)
    for ignored in [
        dict(problem="enumerable", checkpoints=["x"]),
        dict(problem="enumerable", env_id="CartPole-v1"),
        dict(problem="enumerable", horizon=7),
        dict(policies={"a": {}}, checkpoints=["x"]),
    ]:
        with pytest.raises(ValueError, match="would be ignored"):
            run_study(**ignored, **SMALL)
    with pytest.raises(ValueError, match="seed must be an int in"):
        run_study(problem="enumerable", seed=2**32, **SMALL)
    with pytest.raises(ValueError, match="horizon and group_size must be >= 1"):
        run_study(horizon=0, **SMALL)
    bound = estimators.get_estimator("rloo", group_size=2)
    with pytest.raises(ValueError, match="functools.partial .* binds each"):
        run_study(problem="enumerable", estimators=[bound], **SMALL)
    assert stages.stage_labels(["x/best"]) == ["best"]


@pytest.mark.slow
@pytest.mark.xdist_group("runs")  # test_runs' TINY: its compiled chunk is reused
def test_variance_along_training_studies_every_kept_checkpoint(tmp_path):
    """`rl-pg train --keep-checkpoints all` then `rl-pg variance --run`."""
    from test_runs import TINY

    from rl_pg import train

    run_dir = tmp_path / "run"  # two chunks of 3 updates
    train.train_main("ppo", run_dir, TINY, progress=False, keep_checkpoints="all")
    kept = stages.run_checkpoints(run_dir)
    assert [p.name for p in kept] == [f"env_steps_{8 * 32 * k:012d}" for k in (3, 6)]
    config = job.study_config_from_dict(
        {**dataclasses.asdict(job.PRESETS["quick"]["study"]), **SMALL}
        | {"suite": {"names": ["reinforce", "rloo"]}}
    )
    out = pipeline.run(
        job.preset("quick", checkpoints=kept, horizon=16, study=config),
        tmp_path / "study",
        progress=False,
    )
    rows = report.read_results(out / "results.csv")
    assert sorted({r["checkpoint"] for r in rows}) == [p.name for p in kept]
    assert (out / "along_training.png").stat().st_size > 0
    with pytest.raises(ValueError, match="keep-checkpoints all"):
        stages.run_checkpoints(tmp_path / "study")


@pytest.mark.slow
def test_devices_give_the_single_device_results(tmp_path):
    """The `rl-pg` command gives the study one CPU device per core: the reference
    chunks dealt to the devices in turn give the 1-device results bit for bit (here
    2 devices, and however many cores this machine has), and `--devices 2` (a mesh)
    equals them up to float32 rounding (docs/distributed.md: estimates are rounded
    by the per-device shapes). The 1-device run is this test process's own (one
    CPU device: ``cli.main`` leaves the backend as it is); the others are
    ``rl-pg`` processes."""
    import os
    import subprocess

    import jax

    args = [
        "variance", "--problem", "enumerable", "--batch-sizes", "4,16",
        "--num-batches", "8", "--reference-trajectories", "16384",  # 2 chunks
        "--estimators", "reinforce,rloo,gae",
    ]  # fmt: skip
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")
    } | {"JAX_PLATFORMS": "cpu"}
    cores = min(distributed.usable_cores(), 4, 2)  # at most one per chunk at work
    assert jax.default_backend() == "cpu" and jax.local_device_count() == 1
    cli.main([*args, "--out", str(tmp_path / "one")])
    runs = {
        "cores": ({}, []),  # rl_pg.distributed.use_cpu_cores
        "mesh": ({"JAX_NUM_CPU_DEVICES": "2"}, ["--devices", "2"]),
    }
    if cores < 2:  # else "cores" is already 2 devices dealt to in turn
        runs["concurrent"] = ({"JAX_NUM_CPU_DEVICES": "2"}, [])
    for name, (extra_env, extra) in runs.items():
        subprocess.run(
            [sys.executable, "-m", "rl_pg.cli", *args, "--out", str(tmp_path / name)]
            + extra,
            env={**env, **extra_env},
            check=True,
            capture_output=True,
            timeout=300,
        )
    counts = {"one": 1, "cores": cores, "concurrent": 2}
    for name, devices in ((n, counts[n]) for n in ["one", *runs] if n != "mesh"):
        perf = json.loads((tmp_path / name / "performance.json").read_text())
        assert {s["gradient_devices"] for s in perf["stages"].values()} == {devices}
        assert (tmp_path / name / "results.csv").read_bytes() == (
            tmp_path / "one" / "results.csv"
        ).read_bytes(), name
    one = report.read_results(tmp_path / "one" / "results.csv")
    two = report.read_results(tmp_path / "mesh" / "results.csv")
    assert len(one) == len(two) == 3 * 3 * 2
    for a, b in zip(one, two, strict=True):
        for k, v in a.items():
            if isinstance(v, str):
                assert v == b[k]
            else:
                np.testing.assert_allclose(b[k], v, rtol=1e-4, atol=1e-9, err_msg=k)


def test_a_user_function_named_like_a_builtin_is_the_users(tmp_path, monkeypatch):
    from rl_pg.variance import exact, problems

    (tmp_path / "shadow.py").write_text(
        "def reinforce(params, batch, *, apply_fn, scale=2.0):\n"
        "    raise NotImplementedError\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    problem = exact.enumerable_problem(4)
    suite = problems.estimator_suite(
        problem, problems.SuiteConfig(names=("shadow:reinforce",))
    )
    assert suite["reinforce"].func is sys.modules["shadow"].reinforce
    with pytest.raises(ValueError, match="two studied estimators"):
        problems.suite_specs(
            problems.SuiteConfig(names=("reinforce", "shadow:reinforce"))
        )


def test_a_user_loss_that_fails_is_reported_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "broken.py").write_text(
        "import jax.numpy as jnp\n\n\n"
        "def scalar_only(params, batch, *, apply_fn):\n"
        "    return jnp.sum(batch.rewards)  # no (loss, aux) pair\n"
    )
    monkeypatch.chdir(tmp_path)
    code, out = _cli(
        [
            "--out",
            "out",
            "--problem",
            "enumerable",
            "--estimators",
            "broken:scalar_only",
        ],
        capsys,
    )
    assert code == 2 and "estimators fail" in out, out
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_study_in_a_loop_compiles_once(caplog):
    """A second study with the same sizes (another seed, other params) reuses the
    compiled runners: a calibration or a sweep of studies compiles once."""
    from rl_pg.variance import exact

    policies = exact.enumerable_policies()
    small = SMALL | {"batch_sizes": (4, 8), "reference_trajectories": 1024}
    small |= {"chunk": 512, "reference_groups": 8}
    kw = dict(problem="enumerable", estimators=["reinforce", "rloo"], **small)
    first = compiles(lambda: run_study({"u": policies["uniform"]}, **kw), caplog)
    assert first  # the log does show compilations
    again = compiles(lambda: run_study({"s": policies["skewed"]}, seed=1, **kw), caplog)
    assert again == []


def test_variance_job_checks_and_round_trips(tmp_path):
    """VarianceJob: one-line errors before anything compiles; config.json (also
    one written before VarianceJob, with a bool decompose and text devices) reads
    back to the same job."""
    quick = job.preset("quick", seed=3, decompose=True, devices="2")
    assert quick.study.seed == 3 and quick.devices == 2
    assert quick.decompose == job.PRESETS["quick"]["decompose"]
    assert job.VarianceJob.from_dict(json.loads(json.dumps(quick.to_dict()))) == quick
    old = quick.to_dict() | {"decompose": True, "devices": "2", "versions": {}}
    assert job.VarianceJob.from_dict(old) == quick
    enum = job.preset("quick", "enumerable", sizes={"num_batches": 8})
    assert enum.horizon == 4 and enum.study.num_batches == 8
    assert enum.study.max_batches_per_size == job.ENUMERABLE_STUDY.max_batches_per_size
    for kwargs, message in (
        ({"problem": "atari"}, "problem must be one of"),
        ({"horizon": 0}, "horizon and group_size"),
        ({"devices": "two"}, "devices must be a positive int"),
        ({"devices": 0}, "devices must be a positive int"),
        ({"problem": "enumerable", "horizon": 16}, "enumerable MDP"),
        ({"problem": "enumerable", "env_id": "FlappyBird-v0", "horizon": 4}, "env-id"),
        ({"decompose": {"num_states": 2, "num_actions": 2, "num_continuations": 2}},
         "num_states"),
        ({"study": job.QUICK_STUDY.__class__(suite=job.SuiteConfig(names=("nope",)))},
         "nope"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message) as info:
            job.VarianceJob(**kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="preset must be one of"):
        job.preset("huge")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a variance run"):
        job.load(tmp_path / "bad.json")
