"""The study as a reader and a user meet it (issue 23, items 2, 3, 5, 6; issue 24.1):
critic estimators on policies without a critic, run directories as checkpoints,
Ctrl-C, a killed study's directory, the report's settings, checks and file list,
and the paper figures of the study and of training."""

import csv
import dataclasses
import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from terminal import press_ctrl_c, rl_pg_argv, without_jax_gc_noise

from rl_pg import checkpoint, cli, figures, io, policies
from rl_pg.runs import files
from rl_pg.variance import job as job_lib
from rl_pg.variance import pipeline, report
from rl_pg.variance import stages as stages_lib
from rl_pg.variance.problems import SuiteConfig

CRITIC = ("value_baseline", "gae", "ppo_clip")
SMALL = [
    "--batch-sizes", "4,8", "--num-batches", "4", "--reference-trajectories", "64",
    "--horizon", "16",
]  # fmt: skip


def _reinforce_run(root):
    """A REINFORCE-like training run: config.json and checkpoints/best, a policy
    without a critic (value=None)."""
    policy = policies.mlp_policy(2, hidden=(8,), value=None)
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros(12))
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"algo": "reinforce"}))
    checkpoint.save_policy(
        root / "checkpoints" / "best",
        params,
        policy={"kind": "mlp", "num_actions": 2, "hidden": [8], "value": None},
        env_id="FlappyBird-v0",
        env_steps=1000,
    )
    return root


def test_a_run_directory_means_its_best_policy(tmp_path):
    """`--checkpoints RUN_DIR` (was: missing meta.json) studies RUN/checkpoints/best,
    labelled by the run; its policy has no critic."""
    run = _reinforce_run(tmp_path / "runA")
    (stage,) = stages_lib.flappy_stages([run], horizon=8, group_size=2)
    assert stage.label == "runA"
    assert stage.description["path"] == str(run / "checkpoints" / "best")
    assert not stage.has_critic
    shipped = stages_lib.flappy_stages(None, horizon=8, group_size=2)
    assert all(s.has_critic for s in shipped)


def test_critic_estimators_are_left_out_by_default_and_refused_when_named(tmp_path):
    run = _reinforce_run(tmp_path / "runA")
    found = stages_lib.flappy_stages(
        [run, stages_lib.shipped_checkpoints()[0]], horizon=8, group_size=2
    )
    assert stages_lib.without_critic(found, SuiteConfig()) == {"runA": CRITIC}
    with pytest.raises(ValueError, match=r"gae need a critic.*runA"):
        stages_lib.without_critic(found, SuiteConfig(names=("reinforce", "gae")))
    assert stages_lib.without_critic(found, SuiteConfig(names=("reinforce",))) == {}
    kept = stages_lib.suite_without(SuiteConfig(), CRITIC).names
    assert "reinforce" in kept and not set(CRITIC) & set(kept)


def test_the_cli_refuses_a_named_critic_estimator_in_one_line(tmp_path, capsys):
    run = _reinforce_run(tmp_path / "runA")
    out = tmp_path / "out"
    argv = ["variance", "--checkpoints", str(run), "--estimators", "reinforce,gae"]
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, *SMALL, "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gae" in err and "critic" in err
    assert not out.exists()  # refused before the directory (and any compile)


def _value_based_run(root, algo):
    """A Q-learning or DQN training run as the driver writes it (config.json,
    checkpoints/best[.npz] with its metadata), untrained."""
    from rl_pg.algos import dqn, qlearning, registry

    algorithm = registry.get(algo)
    config = algorithm.config_cls()
    root.mkdir()
    io.write_config(root, files.run_config(algorithm, config))
    best = root / "checkpoints" / "best"
    if algo == "qlearning":
        table = np.zeros((config.binning.num_states, 2), np.float32)
        qlearning.save_checkpoint(best.with_suffix(".npz"), table, config, algo=algo)
        return root, best.with_suffix(".npz")
    network = dqn.make_network(config)
    params = network.init(jax.random.PRNGKey(0), jnp.zeros((1, 12)))
    dqn.save_network(best, config, params, algo=algo)
    return root, best


@pytest.mark.parametrize("algo", ["qlearning", "dqn"])
def test_checkpoints_of_a_value_based_run_are_refused_in_one_line(
    algo, tmp_path, capsys, monkeypatch
):
    """`--checkpoints` refuses a Q-learning run (was: "best.npz is not a
    directory") and a DQN run (was: its Q-values studied as policy logits), as
    the run directory, its checkpoints/ or its best checkpoint, with `--run`'s
    message, before anything compiles."""
    run, best = _value_based_run(tmp_path / "run", algo)
    out = tmp_path / "out"

    def loaded(*args):
        raise AssertionError("a value-based checkpoint was loaded as a policy")

    monkeypatch.setattr(stages_lib, "_checkpoint_stage", loaded)
    given_as = [(run, "run"), (run / "checkpoints", "checkpoint"), (best, "checkpoint")]
    for given, what in given_as:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["variance", "--checkpoints", str(given), "--out", str(out)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{given} is a {algo} {what}, whose policies are not" in err
        assert f"needs a {what} of reinforce, a2c, ppo, grpo" in err
        assert not out.exists()


def test_a_killed_study_s_directory_is_named_with_the_command(tmp_path, capsys):
    """A study killed (SIGKILL: no cleanup) left its claim and config.json: the
    next command says what it is and how to free it."""
    out = tmp_path / "killed"
    out.mkdir()
    (out / io.CLAIM_FILE).touch()
    (out / "config.json").write_text('{"command": "variance", "preset": "quick"}')
    with pytest.raises(FileExistsError, match=f"rm -r {out}"):
        pipeline.check_out(out)
    with pytest.raises(SystemExit):
        cli.main(["variance", "--preset", "quick", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did not finish" in err


def _decomposition_rows(lo: float, hi: float) -> list[dict]:
    rows = []
    for component in ("state", "action", "trajectory", "total", "sum_minus_total"):
        value = (lo + hi) / 2 if component == "sum_minus_total" else 1.0
        rows.append(
            dict(
                checkpoint="good",
                estimator="value_baseline",
                component=component,
                variance=value,
                variance_lo=lo if component == "sum_minus_total" else 0.5,
                variance_hi=hi if component == "sum_minus_total" else 2.0,
                exact_variance=np.nan,
            )
        )
    return rows


def test_a_failed_law_of_total_variance_check_gets_a_warning():
    sizes = dict(num_states=256, num_actions=4, num_continuations=4)
    failed = report.decomposition_report(
        _decomposition_rows(1.01e4, 5.12e4), sizes, 1.0, False
    )
    assert "WARNING: the law of total variance check failed" in failed
    assert "value_baseline (3.06e+04 [1.01e+04, 5.12e+04])" in failed
    assert "more states, actions and continuations" in failed
    held = report.decomposition_report(_decomposition_rows(-1.0, 2.0), sizes, 1, False)
    assert "WARNING" not in held


def test_exact_check_counts_intervals_that_miss_the_exact_value():
    row = dict(bias2=0.0, bias2_lo=-1.0, bias2_hi=1.0, exact_bias2=0.5)
    row |= dict(variance=1.0, variance_lo=0.5, variance_hi=2.0, exact_variance=3.0)
    (_, line) = report.exact_check_lines([row])
    assert "1 of 2" in line and "WARNING" in line  # 50% missed
    row["exact_variance"] = 1.5
    (_, line) = report.exact_check_lines([row] * 10)
    assert "0 of 20" in line and "WARNING" not in line


def _results_rows(drop_at: str | None = None) -> list[dict]:
    rows = []
    for k, stage in enumerate(("early", "late")):
        for e in ("reinforce", "rloo", "gae"):
            if e == "gae" and stage == drop_at:
                continue  # a policy without a critic has no gae row
            for n in (4, 16):
                row = dict(checkpoint=stage, estimator=e, batch_size=n)
                for m in figures.ALONG_TRAINING:
                    v = 0.5 + 0.1 * k if m == "cos_true" else (1 + k) * 10 / n
                    row |= {m: v, f"{m}_lo": v * 0.8, f"{m}_hi": v * 1.2}
                rows.append(row)
    return rows


def test_along_training_is_a_paper_figure_in_three_formats(tmp_path):
    """Estimators missing at a checkpoint (no critic) are gaps, not a crash."""
    fig = figures.along_training_figure(
        _results_rows(drop_at="early"), {"early": 0, "late": 2_000_000}
    )
    written = figures.save(fig, tmp_path / "along_training.png", figures.FORMATS)
    assert sorted(p.name for p in written) == [
        "along_training.pdf",
        "along_training.png",
        "along_training.svg",
    ]
    svg = (tmp_path / "along_training.svg").read_text()
    for metric in figures.ALONG_TRAINING:
        for e in ("reinforce", "rloo", "gae"):
            assert f"series:{metric}:{e}" in svg
    late = figures.along_training_table(
        _results_rows(drop_at="early"), {"early": 0, "late": 2e6}, "cos_true", 16
    )
    assert np.isnan(late["gae"].y[0]) and late["gae"].y[1] == pytest.approx(0.6)
    assert list(late["reinforce"].x) == [0, 2e6]


def test_the_learning_curve_is_written_as_png_pdf_and_svg(tmp_path):
    rows = [
        dict(env_steps=s, val_median=m, best_median=m, train_score_mean=m / 2)
        for s, m in ((1e5, 1.0), (2e5, 30.0), (3e5, 20.0))
    ]
    files.plot_learning_curve(tmp_path / "learning_curve.png", rows, "ppo, seed 0")
    for fmt in figures.FORMATS:
        assert (tmp_path / f"learning_curve.{fmt}").stat().st_size > 0
    svg = (tmp_path / "learning_curve.svg").read_text()
    for column in ("val_median", "best_median", "train_score_mean"):
        assert f"series:score:{column}" in svg


@pytest.mark.slow
def test_named_estimators_on_a_policy_without_critic_report_no_critic(tmp_path):
    """`--estimators reinforce,rloo --decompose` on a critic-less policy (nothing
    left out): no critic calibration (it read "correlation nan"), no decomposition
    rows of the learned critic (value_baseline and gae equalled reward_to_go) nor
    its "the learned critic leaves" line; the report says so once."""
    run = _reinforce_run(tmp_path / "runA")
    variance_job = job_lib.preset(
        "quick",
        estimators="reinforce,rloo",
        sizes=dict(batch_sizes=(4, 8), num_batches=4, reference_trajectories=64),
        checkpoints=[str(run)],
        horizon=16,
    )
    sizes = job_lib.DecomposeSizes(num_states=3, num_actions=2, num_continuations=2)
    variance_job = dataclasses.replace(variance_job, decompose=sizes)
    out = pipeline.run(variance_job, tmp_path / "study", progress=False)
    text = (out / "report.md").read_text()
    assert "Critic calibration" not in text and "correlation nan" not in text
    assert "learned critic" not in text
    assert text.count("This policy has no critic") == 1
    assert text.count("runA has no critic") == 1  # in the decomposition section
    with open(out / "decomposition.csv") as f:
        found = {r["estimator"] for r in csv.DictReader(f)}
    assert {"reinforce", "reward_to_go", "oracle_advantage"} <= found
    assert not found & {"value_baseline", "gae"}


@pytest.mark.slow
def test_a_study_of_a_policy_without_critic_says_what_it_left_out(tmp_path, capsys):
    """End to end on a run directory of a critic-less policy: critic estimators
    left out and said so; the report prints its settings, explains the mean
    return, and lists every file written (as does the command's last line)."""
    run = _reinforce_run(tmp_path / "runA")
    out = tmp_path / "study"
    cli.main(["variance", "--checkpoints", str(run), *SMALL, "--out", str(out)])
    rows = report.read_results(out / "results.csv")
    assert {r["estimator"] for r in rows} & set(CRITIC) == set()
    assert {"reinforce", "reward_to_go"} <= {r["estimator"] for r in rows}
    text = (out / "report.md").read_text()
    assert "no critic: left out value_baseline, gae, ppo_clip" in text
    assert "correlation nan" not in text
    for setting in (
        "| horizon H | 16 steps",
        "| group size G | 4",
        "| batch sizes n | 4, 8 |",
        "| number of batches M | 4 top-level",
        "| reference | 64 trajectories in",
        "| seed | 0 |",
        "| devices |",
        "| rloo | group_size = 4 |",
    ):
        assert setting in text, setting
    assert "horizon H = 16 steps: every episode is cut at H = 16" in text
    on_disk = [p.name for p in report.written_files(out)]
    listed = text.split("## Files")[1]
    for name in on_disk:
        assert f"`{name}`" in listed, name
    assert {"rel_variance_vs_batch_size.svg", "cosine_vs_batch_size.pdf"} <= set(
        on_disk
    )
    last = capsys.readouterr().out.strip().splitlines()[-2]  # before "done in"
    assert last.startswith(f"wrote into {out}: ") and all(n in last for n in on_disk)


@pytest.mark.slow
def test_ctrl_c_ends_in_one_line_and_the_same_command_runs_again(tmp_path):
    out = tmp_path / "study"
    argv = rl_pg_argv("variance", "--preset", "quick")
    argv += [*SMALL, "--estimators", "reinforce,rloo", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(argv, stderr=stderr, env=env)
        deadline = time.monotonic() + 120
        while ", initial]" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # until the study of the first policy has begun
        time.sleep(2)
        assert proc.poll() is None and (out / "config.json").is_file()
        press_ctrl_c(proc, log)
    err = without_jax_gc_noise(log.read_text())
    lines = [
        line
        for line in err.replace("\r", "\n").splitlines()
        if line.strip() and "variance study" not in line
    ]  # the progress bar aside: the message has a line of its own
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert "interrupted" in lines[0] and "same command" in lines[0]
    assert not out.exists()
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (out / "report.md").is_file()


def test_the_decomposition_figure_is_written_in_every_format(tmp_path):
    from rl_pg.variance import decomposition

    rows = [
        dict(
            checkpoint=ck, estimator=e, component=c, variance=v,
            variance_lo=v * 0.8, variance_hi=v * 1.2,
        )
        for ck in ("initial", "good")
        for e in ("reinforce", "value_baseline")
        for c, v in (("state", 1.0), ("action", -0.5), ("trajectory", 2.0), ("total", 3.0))
    ]  # fmt: skip
    written = decomposition.plot_decomposition(
        rows, tmp_path / "decomposition.png", figures.FORMATS
    )
    assert sorted(p.name for p in written) == [
        f"decomposition.{fmt}" for fmt in ("pdf", "png", "svg")
    ]
    svg = (tmp_path / "decomposition.svg").read_text()
    assert "value baseline" in svg and "trajectory (rest)" in svg


def _stage_row(estimator, n, rel_variance, cos_true, cos_mean_hi):
    row = {"estimator": estimator, "batch_size": n, "num_batches": 8}
    row |= {"rel_variance": rel_variance, "cos_true": cos_true}
    row |= {"cos_mean": 0.9, "cos_mean_lo": 0.8, "cos_mean_hi": cos_mean_hi}
    for m in ("rel_variance", "cos_true", "snr", "bias2", "variance"):
        row.setdefault(m, 1.0)
        row |= {f"{m}_lo": row[m] - 0.5, f"{m}_hi": row[m] + 0.5}
    return row


def test_a_stage_s_summary_and_table_by_hand():
    """Best and worst by relative variance among the finite, closest by cos_true,
    a mean indistinguishable from 0 (rel_variance inf) named, tilted rows those
    whose cos_mean interval ends below 0.99; the table keeps the smallest and
    largest sizes, each value with [lo, hi]."""
    rows = [
        _stage_row("reinforce", 16, 4.0, 0.3, 0.95),
        _stage_row("rloo", 16, 0.5, 0.6, 1.0),
        _stage_row("gae", 16, 1.0, 0.8, 0.985),
        _stage_row("grpo", 16, np.inf, 0.1, np.nan),
    ]
    assert report._stage_summary(rows, 16) == [
        "At n = 16, rloo has the lowest relative variance (0.5) and reinforce the "
        "highest (4); the mean of grpo is indistinguishable from 0 here; gae points "
        "closest to the true gradient (mean cosine 0.80).",
        "Mean estimate tilted away from g (cos_mean interval below 0.99; n/a where "
        "the mean is indistinguishable from 0): reinforce, gae.",
    ]
    config = dataclasses.replace(job_lib.QUICK_STUDY, batch_sizes=(4, 8, 16))
    sized = [_stage_row("rloo", n, 0.5, 0.6, 1.0) for n in (4, 8, 16)]
    table = report._stage_table(sized, config, False, frozenset({"rloo"}))
    assert [line.split(" | ")[1] for line in table[2:]] == ["4", "16"]
    assert table[2].startswith("| rloo* | 4 | 8 | 0.600 [0.100, 1.100] |")
