"""``rl-pg`` end to end: render and bench at tiny sizes, and every expected user
error as one ``rl-pg CMD: error: ...`` line, exit status 2 and nothing written."""

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import pytest
from compiles import compiles

from rl_pg import checkpoint, cli
from rl_pg.algos import registry
from rl_pg.policies import mlp_policy
from rl_pg.runs import overrides

SPEC = {"kind": "mlp", "num_actions": 2, "hidden": [4], "activation": "tanh"}


def _policy_run(directory, seed: int = 0):
    """A training run directory holding only ``checkpoints/best`` (tiny MLP)."""
    params = mlp_policy(2, hidden=(4,)).init(jax.random.PRNGKey(seed), jnp.zeros(12))
    checkpoint.save_policy(
        directory / "checkpoints" / "best",
        params,
        policy=SPEC,
        env_id="FlappyBird-v0",
        env_steps=5,
    )
    return directory


def _fails(capsys, argv, *expected):
    """Run ``rl-pg argv``; it must exit 2 with one error line holding ``expected``."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"rl-pg {argv[0]}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in captured.err and "done in" not in captured.out
    return lines[0]


def test_a_system_error_is_one_plain_line(capsys):
    """An OSError from the system reads "what: path", without "[Errno 2]"."""
    error = FileNotFoundError(2, "No such file or directory", "/proc/x")
    assert cli._one_line(error) == "No such file or directory: /proc/x"
    assert cli._one_line(ValueError("a\n  b")) == "a b"
    rename = FileExistsError(17, "File exists", "/tmp/a.tmp", None, "/tmp/a")
    assert cli._one_line(rename) == "File exists: /tmp/a.tmp -> /tmp/a"
    if Path("/proc/self").is_dir():  # Linux: /proc refuses new directories
        line = _fails(capsys, ["variance", "--out", "/proc/rl_pg/out"], "/proc/rl_pg")
        assert "Errno" not in line


@pytest.fixture
def broken_checkpoint(tmp_path):
    run = _policy_run(tmp_path / "broken_run")
    params = run / "checkpoints" / "best" / "params.msgpack"
    params.write_bytes(params.read_bytes()[:50])
    return run


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--num-envs", "0"], "num_envs must be positive ints, got [0]"),
        (["--num-envs", "64,x"], "--num-envs takes comma-separated ints, got '64,x'"),
        (["--modes", "features,sonar"], "Unknown modes ['sonar']"),
        (["--reference-seconds", "0"], "reference_seconds must be a positive number"),
    ],
)
def test_bench_bad_input(capsys, tmp_path, flags, expected):
    out = tmp_path / "bench"
    _fails(capsys, ["bench", "--out", str(out), *flags], expected)
    assert not out.exists()


def test_bench_refuses_an_existing_directory(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    _fails(capsys, ["bench", "--out", str(tmp_path)], "already exists")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--episodes", "0"], "--episodes must be an int >= 1, got 0"),
        (["--max-score", "0"], "--max-score must be an int in [1, 50000000], got 0"),
        (["--max-score", "100000000"], "--max-score must be an int in [1,"),
    ],
)
def test_eval_bad_numbers(capsys, tmp_path, flags, expected):
    run, out = _policy_run(tmp_path / "run"), tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(run), "--out", str(out), *flags]
    _fails(capsys, argv, expected)
    assert not out.exists()


def test_an_empty_path_is_refused_by_the_parser(capsys, tmp_path):
    """`--checkpoint ""` is no path (it was read as the current directory)."""
    for argv in (
        ["eval", "--checkpoint", "", "--out", str(tmp_path / "e")],
        ["variance", "--checkpoints", "", "--out", str(tmp_path / "v")],
        ["render", "--out", ""],
    ):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "expected a path, got an empty string" in err
    assert not list(tmp_path.iterdir())


def test_eval_bad_checkpoints(capsys, tmp_path, broken_checkpoint):
    out = tmp_path / "eval"
    missing = tmp_path / "missing"
    _fails(
        capsys,
        ["eval", "--checkpoint", str(missing), "--out", str(out)],
        f"--checkpoint {missing} does not exist",
    )
    _fails(
        capsys,
        ["eval", "--checkpoint", str(tmp_path), "--out", str(out)],
        "is neither a policy checkpoint nor a training run directory",
    )
    _fails(
        capsys,
        ["eval", "--checkpoint", str(broken_checkpoint), "--out", str(out)],
        "best/params.msgpack is not a readable parameter file",
    )
    assert not out.exists()


def test_eval_refuses_an_existing_directory(capsys, tmp_path):
    run, out = _policy_run(tmp_path / "run"), tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    _fails(
        capsys,
        ["eval", "--checkpoint", str(run), "--out", str(out)],
        "already exists",
    )
    assert (out / "eval.json").read_text() == "{}"


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--frame-skip", "0"], "--frame-skip must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--policy", "random", "--flap-prob", "2"], "--flap-prob must be in [0, 1]"),
        (["--flap-prob", "nan"], "--flap-prob must be in [0, 1], got nan"),
    ],
)
def test_render_bad_input(capsys, tmp_path, flags, expected):
    out = tmp_path / "a.gif"
    _fails(capsys, ["render", "--out", str(out), *flags], expected)
    assert not out.exists()


def test_render_bad_paths(capsys, tmp_path, broken_checkpoint):
    _fails(
        capsys,
        ["render", "--out", str(tmp_path / "a.png")],
        "--out must name a .gif file",
    )
    (tmp_path / "old.gif").write_bytes(b"old")
    _fails(
        capsys,
        ["render", "--out", str(tmp_path / "old.gif")],
        "old.gif exists; refusing to overwrite it",
    )
    assert (tmp_path / "old.gif").read_bytes() == b"old"
    out = tmp_path / "a.gif"
    _fails(
        capsys,
        ["render", "--out", str(out), "--checkpoint", str(tmp_path / "nope")],
        "nope is neither a policy checkpoint nor a training run directory",
    )
    _fails(
        capsys,
        ["render", "--out", str(out), "--checkpoint", str(broken_checkpoint)],
        "params.msgpack is not a readable parameter file",
    )
    assert not out.exists()


def test_train_bad_input(capsys, tmp_path):
    out = tmp_path / "run"
    _fails(
        capsys,
        ["train", "--algo", "ppo", "--out", str(out), "--eval-max-score", "1e9"],
        "eval_max_score must be <= 50000000",
    )
    _fails(
        capsys,
        ["train", "--algo", "ppo", "--out", str(out), "--num-envs", "0"],
        "num_envs must be an int >= 1",
    )
    _fails(
        capsys,
        ["train", "--algo", "ppo", "--out", str(out), "--resume"],
        "Nothing to resume",
    )
    _fails(
        capsys,
        ["train", "--algo", "ppo", "--out", str(out), "--no-such-flag", "1"],
        "Unknown option --no-such-flag",
    )
    assert not out.exists()
    _policy_run(out)
    _fails(
        capsys,
        ["train", "--algo", "ppo", "--out", str(out), "--total-env-steps", "8192"],
        "already exists",
    )


# ------------------------------------------------------------------- success


@pytest.mark.slow
def test_render_scripted_gif(capsys, tmp_path):
    out = tmp_path / "sub" / "scripted.gif"
    cli.main(["render", "--out", str(out), "--steps", "20", "--frame-skip", "3"])
    # reset frame + 20 steps (the scripted bird does not crash that early),
    # every 3rd: frames 0, 3, ..., 18
    assert iio.imread(out).shape == (7, 512, 288, 3)
    assert f"wrote {out}: 7 frames" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["scripted.gif"]


@pytest.mark.slow
def test_render_checkpoint_run_directory(capsys, tmp_path):
    run = _policy_run(tmp_path / "run")
    out = tmp_path / "policy.gif"
    cli.main(["render", "--out", str(out), "--checkpoint", str(run), "--steps", "6"])
    frames = iio.imread(out)
    assert frames.ndim == 4 and 1 <= frames.shape[0] <= 4  # 7 frames at most, /2
    assert "wrote" in capsys.readouterr().out


def _qlearning_run(directory):
    """A Q-learning run directory: config.json and an all-zero best table."""
    from rl_pg.algos import qlearning

    config = qlearning.QLearningConfig()
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"algo": "qlearning"}))
    q = jnp.zeros((config.binning.num_states, 2))
    qlearning.ALGORITHM.save(directory / "checkpoints" / "best", config, q, env_steps=9)
    return directory


@pytest.mark.slow
def test_render_and_eval_take_a_qlearning_run(capsys, tmp_path):
    """Both commands read any algorithm's run through the registry's ``load``."""
    run = _qlearning_run(tmp_path / "q")
    out = tmp_path / "q.gif"
    cli.main(["render", "--out", str(out), "--checkpoint", str(run), "--steps", "6"])
    assert 1 <= iio.imread(out).shape[0] <= 4  # never flaps: falls, 7 frames at most
    argv = ["eval", "--checkpoint", str(run), "--out", str(tmp_path / "e")]
    cli.main([*argv, "--episodes", "2", "--max-score", "5"])
    data = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert data["scores"] == [0, 0] and data["env_steps"] == 9
    assert data["checkpoint"].endswith("best.npz")
    capsys.readouterr()
    _fails(
        capsys,
        [*argv[:3], "--out", str(tmp_path / "e2"), "--sampled"],
        "a Q-table's policy is greedy",
    )


@pytest.mark.slow
def test_bench_tiny(capsys, tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--out", str(out), "--num-envs", "2", "--modes", "features"]
    cli.main([*argv, "--reference-seconds", "0.05"])
    data = json.loads((out / "throughput.json").read_text())
    assert set(data["steps_per_second"]) == {"cartpole", "features"}
    assert data["steps_per_second"]["features"]["2"] > 0
    table = (out / "throughput.md").read_text()
    assert "| FlappyBird-v0 | 2 |" in table and "FlappyBird-lidar-v0" not in table
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "bench" and config["num_envs"] == "2"
    assert "| FlappyBird-v0 | 2 |" in capsys.readouterr().out


def test_variance_missing_checkpoint(capsys, tmp_path):
    out, missing = tmp_path / "variance", tmp_path / "missing"
    _fails(
        capsys,
        ["variance", "--out", str(out), "--checkpoints", str(missing)],
        str(missing),
    )
    assert not out.exists()


def test_the_command_leaves_the_backend_alone_when_a_mesh_is_asked_for(tmp_path):
    """`rl-pg variance` gives the CPU one device per core only without a mesh: with
    `--devices`, or rerunning a config that had one, the user's count stands."""
    parser = cli.build_parser()

    def asked(*argv):
        return cli._mesh_requested(parser.parse_args(["variance", *argv]))

    assert not asked("--out", "x")
    assert asked("--devices", "all", "--out", "x")
    saved = tmp_path / "config.json"
    for devices, expected in ((None, False), ("2", True)):
        saved.write_text(json.dumps({"study": {}, "devices": devices}))
        assert asked("--config", str(saved), "--out", "x") is expected
    assert asked("--config", str(tmp_path / "missing.json"), "--out", "x")


# ------------------------------------------------------------------- help


def _subparsers():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_of_every_command_has_help():
    for name, parser in _subparsers().items():
        for action in parser._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)


def test_help_groups_options_and_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for heading in ("inputs:", "sizes:", "outputs:"):
        assert heading in text
    assert "held-out levels (default: 32)" in text
    assert "action-sampling seed (default: 0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    groups = {g.title for g in _subparsers()["variance"]._action_groups}
    assert {"inputs", "sizes", "outputs", "devices"} <= groups


def test_help_imports_no_jax():
    """`rl-pg --help` and `rl-pg CMD --help` answer without importing JAX."""
    script = (
        "import sys\n"
        "from rl_pg import cli\n"
        "for argv in ([], *([c] for c in cli.build_parser()._subparsers"
        "._group_actions[0].choices)):\n"
        "    try:\n"
        "        cli.main([*argv, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "heavy = sorted(m for m in ('jax', 'gymnax', 'flax', 'optax') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: rl-pg render" in done.stdout


@pytest.mark.parametrize("algo", registry.NAMES)
def test_help_config_documents_every_field(capsys, algo):
    cli.main(["train", "--algo", algo, "--help-config"])
    text = capsys.readouterr().out
    config_cls = registry.get(algo).config_cls
    docs = overrides.field_docs(config_cls)
    for field in dataclasses.fields(config_cls):
        assert docs.get(field.name), (algo, field.name)
        assert "--" + field.name.replace("_", "-") in text
    assert "(undocumented)" not in text
    if algo == "ppo":
        assert "--clip-eps float (default: 0.2, sweepable)\n      ratio clip" in text
    if algo == "dqn":  # "a, b: text" documents both fields
        assert docs["epsilon_start"] == docs["epsilon_end"]


# ------------------------------------------------------------ variance --config

SAVED_VARIANCE = {
    "command": "variance",
    "preset": "quick",
    "problem": "flappy",
    "seed": 0,
    "checkpoints": None,
    "env_id": None,
    "devices": None,
    "stages": {"initial": "..."},
    "horizon": 128,
    "group_size": 4,
    "study": {"batch_sizes": [4, 16], "num_batches": 32},
    "decompose": None,
}


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "is not JSON (Expecting property name"),
        ("[1, 2]", "must hold a JSON object (a variance run's config.json), got list"),
        ('"quick"', "must hold a JSON object"),
        (
            {k: v for k, v in SAVED_VARIANCE.items() if k != "preset"},
            "missing 'preset'",
        ),
        ({k: v for k, v in SAVED_VARIANCE.items() if k != "study"}, "missing 'study'"),
        ({**SAVED_VARIANCE, "seed": "0"}, "'seed' must be an int, got '0'"),
        ({**SAVED_VARIANCE, "seed": True}, "'seed' must be an int, got True"),
        ({**SAVED_VARIANCE, "study": [1]}, "'study' must be an object, got [1]"),
        ({**SAVED_VARIANCE, "horizon": 1.5}, "'horizon' must be an int or null"),
        ({**SAVED_VARIANCE, "preset": "fast"}, "'preset' must be one of quick, full"),
        ({"algo": "ppo", "config": {}}, "a training run is studied with --run"),
    ],
)
def test_variance_bad_config_files(capsys, tmp_path, content, expected):
    config, out = tmp_path / "config.json", tmp_path / "out"
    text = content if isinstance(content, str) else json.dumps(content)
    config.write_text(text)
    _fails(capsys, ["variance", "--config", str(config), "--out", str(out)], expected)
    assert not out.exists()


def test_variance_config_check_accepts_a_saved_config(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SAVED_VARIANCE))
    assert cli.check_variance_config(config) == SAVED_VARIANCE
    with pytest.raises(ValueError, match="no such file"):
        cli.check_variance_config(tmp_path / "missing.json")


@pytest.mark.slow
def test_eval_and_render_compile_once_per_policy(capsys, caplog, tmp_path):
    """Two checkpoints of one policy, evaluated and drawn in one process, share
    the compilations (render used to jit a new closure per call); so do two
    scripted renders with other seeds."""

    def eval_and_render(i):
        run = _policy_run(tmp_path / f"run{i}", seed=i)
        small = ["--episodes", "2", "--max-score", "2", "--gif"]
        cli.main(["eval", "--checkpoint", str(run), "--out", str(run / "e"), *small])
        for policy in ("--checkpoint", str(run)), ("--policy", "scripted"):
            argv = ["render", "--out", str(run / f"{policy[0][2:]}.gif"), *policy]
            cli.main([*argv, "--steps", "4", "--seed", str(i)])

    assert compiles(lambda: eval_and_render(0), caplog)
    assert compiles(lambda: eval_and_render(1), caplog) == []
    capsys.readouterr()


@pytest.mark.parametrize("code, ends_at_once", [(130, True), (2, False), (0, False)])
def test_the_command_ends_at_once_after_ctrl_c(monkeypatch, code, ends_at_once):
    """`rl-pg` after Ctrl-C (exit 130) leaves with os._exit, skipping the
    interpreter's teardown beside XLA's threads (a segfault now and then);
    other exits go through SystemExit as before."""
    exits = []

    def main(cpu_cores):
        assert cpu_cores
        raise SystemExit(code)

    monkeypatch.setattr(cli, "main", main)
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    if ends_at_once:
        cli.console()
        assert exits == [130]
    else:
        with pytest.raises(SystemExit) as stop:
            cli.console()
        assert stop.value.code == code and exits == []


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, capsys):
    """`rl-pg train --help-config | head`: no "error: [Errno 32] Broken pipe"."""

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_known_args", lambda argv: (
        argparse.Namespace(command="bench", func=closed), []))  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench"])
    assert stop.value.code == 141 and capsys.readouterr().err == ""
