"""A training run that dies (Ctrl-C, an error, a non-finite loss) ends with one
line naming its directory and the command to run next, and leaves that directory
resumable (or, where resuming would fail again, says to delete it)."""

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from terminal import press_ctrl_c, rl_pg_argv, without_jax_gc_noise

from rl_pg import cli, io
from rl_pg.runs import commands, driver

ROOT = Path(__file__).resolve().parents[1]
QTINY = [
    "--num-envs", "8",
    "--total-env-steps", "4096",
    "--eval-every-steps", "2048",
    "--eval-episodes", "4",
    "--final-eval-episodes", "4",
    "--eval-max-score", "20",
]  # fmt: skip


def _train_argv(out):
    return ["train", "--algo", "qlearning", "--out", str(out), *QTINY]


def _command_in(stderr: str) -> list[str]:
    """The ``rl-pg ...`` command a message ends with, as argv (no ``rl-pg``)."""
    argv = shlex.split(stderr.strip().splitlines()[-1].split(": ")[-1])
    assert argv[0] == "rl-pg"
    return argv[1:]


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_exit_130_and_a_resumable_run(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:
        proc = subprocess.Popen(
            rl_pg_argv(*_train_argv(out)),
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            env=env,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 120
        while not (out / "config.json").is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
        returncode = press_ctrl_c(proc, log)  # while it compiles or trains
    stderr = without_jax_gc_noise(log.read_text())
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("rl-pg train: interrupted; the run in ")
    assert last.endswith("--resume") and str(out) in last
    assert not (out / "eval.json").exists()
    cli.main(_command_in(stderr))  # the command it names completes the run
    assert (out / "eval.json").is_file()


def test_ctrl_c_pressed_again_still_gets_its_one_line(
    tmp_path, monkeypatch, capsys, ctrl_c_raises
):
    """A second Ctrl-C while rl-pg writes the first one's line: no traceback."""
    real = cli._recovery

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def pressed_again(*args):
        signal.raise_signal(signal.SIGINT)  # handled here, unless ignored
        return real(*args)

    monkeypatch.setattr(driver, "train_batch", interrupted)
    monkeypatch.setattr(cli, "_recovery", pressed_again)
    try:
        cli.main(_train_argv(tmp_path / "run"))
    except KeyboardInterrupt:  # not re-raised: pytest would stop the session
        pytest.fail("the second Ctrl-C cut the message short")
    except SystemExit as stop:
        assert stop.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rl-pg train: interrupted")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_names_the_directory_and_the_resume_command(
    tmp_path, monkeypatch, capsys
):
    """In process: Ctrl-C (a KeyboardInterrupt) during training, then a bug."""
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "train_batch", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.main(_train_argv(out) + ["--keep-checkpoints", "all"])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _command_in(err) == [
        "train", "--algo", "qlearning", "--out", str(out),
        "--keep-checkpoints", "all", "--resume",
    ]  # fmt: skip

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(driver, "train_batch", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # its traceback is kept
        cli.main(_command_in(err))
    err = capsys.readouterr().err
    assert err.startswith(f"rl-pg train: failed; the run in {out} is resumable")
    # The same command without --resume is refused, naming the resume command.
    with pytest.raises(SystemExit) as stop:
        cli.main(_train_argv(out))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.strip().endswith(f"--out {out} --resume")


@pytest.mark.slow
def test_a_non_finite_loss_names_the_directory_to_delete(tmp_path, capsys):
    out = tmp_path / "inf"
    argv = [
        "train", "--algo", "ppo", "--out", str(out), "--num-envs", "4",
        "--num-steps", "16", "--num-minibatches", "1", "--update-epochs", "1",
        "--hidden", "8", "--total-env-steps", "128", "--eval-every-steps", "64",
        "--eval-episodes", "2", "--eval-max-score", "5", "--reward-scale", "1e38",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rl-pg train: error: non-finite loss at update 1")
    assert f"delete it (rm -r {out})" in err


def test_recovery_hint_cases(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--algo", "ppo", "--out", str(out), "--lr", "0.1"]
    assert commands.recovery_hint(out, argv) == ""  # nothing created
    out.mkdir()
    (out / io.CLAIM_FILE).touch()  # killed before config.json: the same options
    assert commands.recovery_hint(out, argv).endswith(
        f"rl-pg train --algo ppo --out {out} --lr 0.1 --resume"
    )
    (out / "config.json").write_text('{"algo": "ppo"}')  # options from config.json
    assert commands.recovery_hint(out, argv, ValueError("x")) == (
        f"; the run in {out} is resumable: rl-pg train --algo ppo --out {out} --resume"
    )
    (out / "eval.json").write_text("{}")  # finished
    assert commands.recovery_hint(out, argv) == ""
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")  # not a run: never named
    assert commands.recovery_hint(other, argv) == ""
    sweep = tmp_path / "sweep"  # a sweep's (or study's) directory: not a run
    sweep.mkdir()
    (sweep / io.CLAIM_FILE).touch()
    (sweep / "config.json").write_text('{"command": "sweep", "algo": "ppo"}')
    assert commands.recovery_hint(sweep, argv) == ""


# ------------------------------------------------------------------ rl-pg sweep


def _sweep_argv(out):
    return ["sweep", "--algo", "qlearning", "--out", str(out), "--no-gif", *QTINY]


def test_a_sweep_interrupted_removes_what_it_wrote_and_runs_again(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C during a sweep (its cells already written): one line saying the
    same command starts again, and nothing left that would refuse it."""
    from rl_pg.runs import sweep

    out = tmp_path / "sweep"
    monkeypatch.setattr(driver, "compiled_init", lambda *a: lambda *b: None)

    def interrupted(*args, **kwargs):
        assert (out / "config.json").is_file() and (out / io.CLAIM_FILE).is_file()
        assert any(out.glob("cell_000_seed_0/config.json"))
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "train_batch", interrupted)
    for _ in range(2):  # the same command is not refused the second time
        with pytest.raises(SystemExit) as stop:
            cli.main(_sweep_argv(out))
        assert stop.value.code == 130
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith("rl-pg sweep: interrupted") and "same command" in err
        assert not out.exists()


def test_a_killed_sweep_s_directory_is_named_with_the_command(tmp_path, capsys):
    """A sweep killed (SIGKILL: no cleanup) left its claim, config.json and cell
    directories: the same command names it and how to free it."""
    out = tmp_path / "killed"
    (out / "cell_000_seed_0").mkdir(parents=True)
    (out / io.CLAIM_FILE).touch()
    (out / "config.json").write_text('{"command": "sweep"}')
    with pytest.raises(SystemExit) as stop:
        cli.main(_sweep_argv(out))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweep that did not finish" in err, err
    assert f"rm -r {out}" in err and "the same command" in err
    (out / "summary.csv").write_text("cell\n")  # a finished sweep: never touched
    with pytest.raises(SystemExit):
        cli.main(_sweep_argv(out))
    err = capsys.readouterr().err
    assert "already exists" in err and "did not finish" not in err


@pytest.mark.parametrize(
    "config", ['{"command": "variance", "preset": "quick"}', '{"algo": "ppo"}']
)
def test_another_command_s_output_is_refused_without_rm(tmp_path, capsys, config):
    """A mistyped --out naming a finished study or training run (a claim, no
    summary.csv, another command's config.json) is not called a killed sweep:
    the plain refusal, never `rm -r`."""
    out = tmp_path / "other"
    out.mkdir()
    (out / io.CLAIM_FILE).touch()
    (out / "config.json").write_text(config)
    with pytest.raises(SystemExit) as stop:
        cli.main(_sweep_argv(out))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "rm -r" not in err, err


def test_a_diverging_sweep_run_is_named_by_cell_and_seed(tmp_path, monkeypatch, capsys):
    """A run whose loss turns non-finite stops the sweep: one line naming its
    cell and seed (not 'the run keeps its last checkpoint': the sweep removed
    what it wrote)."""
    import types

    from rl_pg.runs import sweep

    out = tmp_path / "sweep"
    monkeypatch.setattr(driver, "compiled_init", lambda *a: lambda *b: None)
    diverged = types.SimpleNamespace(metrics={"first_nonfinite_update": [-1, 3]})
    monkeypatch.setattr(
        sweep,
        "train_batch",
        lambda *a, **k: driver._check_finite(diverged, np.array([True, True])),
    )
    with pytest.raises(SystemExit) as stop:
        cli.main([*_sweep_argv(out), "--num-seeds", "2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "cell 0 (defaults), seed 1: non-finite loss at update 3" in err, err
    assert "removed" in err and "keeps its last checkpoint" not in err
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_after_a_sweep_trained_keeps_every_run(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the first trained run is evaluated: every run's policies were
    saved before it; the one line and the refusal of the same command say what
    is kept (nothing is removed) instead of `rm -r` alone."""
    from rl_pg.algos import base

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "held_out", interrupted)  # the first run's
    out = tmp_path / "sweep"
    argv = _sweep_argv(out) + ["--num-seeds", "2"]
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.splitlines()[-1]  # after the progress bar's
    assert line.startswith(
        "rl-pg sweep: interrupted; its trained runs are kept (2 of 2"
    )
    assert "0 evaluated" in line and "summary.csv was not written" in line
    runs = sorted(out.glob("cell_*_seed_*"))
    assert len(runs) == 2 and not (out / "summary.csv").exists()
    for run in runs:  # each run's policies (Q-tables), evaluated or not
        for name in ("best.npz", "last.npz"):
            assert (run / "checkpoints" / name).is_file()
    assert not any((run / "eval.json").is_file() for run in runs)
    with pytest.raises(SystemExit) as stop:  # the same command: what is kept
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "holds a sweep that stopped after training (or is still" in err
    assert err.count("its trained runs") == 1 and err.count("\n") == 1
    with pytest.raises(SystemExit):  # bad input is only bad input
        cli.main([*argv, "--num-seeds", "0"])
    assert "its trained runs" not in capsys.readouterr().err
    assert len(sorted(out.glob("cell_*_seed_*"))) == 2  # nothing removed


@pytest.mark.slow
def test_a_failing_sweep_figure_keeps_the_trained_runs(tmp_path, monkeypatch, capsys):
    """After training nothing is removed: a figure that fails is skipped with
    one line naming the redraw command, and summary.csv is still written."""
    from rl_pg.runs import sweep

    def no_fonts(*args, **kwargs):
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(sweep, "plot_sweep", no_fonts)
    out = tmp_path / "sweep"
    cli.main(_sweep_argv(out))
    printed = capsys.readouterr().out
    assert "skipped the sweep's statistics or figures: no fonts here" in printed
    assert f"rl-pg plot {out} --figure sweep" in printed
    assert (out / "summary.csv").is_file() and any(out.glob("cell_*/eval.json"))
