"""Tests for rl_pg.train: the run directory, learning, checkpoints, resume, seeds.

One small PPO config serves every test, so the jitted chunk compiles once: the
uninterrupted run, the interrupted and resumed run and the sequential seeds all
reuse it.
"""

import csv
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rl_pg import checkpoint, io, train
from rl_pg.algos import base, ppo, registry
from rl_pg.runs import driver, files

# The run fixtures and the jitted chunk are built once per worker: keep the module
# on one worker under `pytest -n 2 --dist loadgroup`.
pytestmark = pytest.mark.xdist_group("train")

SMALL = {
    "num-envs": "16",
    "num-steps": "64",
    "num-minibatches": "2",
    "total-env-steps": str(16 * 64 * 96),  # 96 updates, ~98k env steps
    "eval-every-steps": str(16 * 64 * 32),  # 3 evaluations
    "eval-episodes": "8",
    "final-eval-episodes": "8",
    "eval-max-score": "50",
    "stop-at-score": "none",
}


@pytest.fixture(scope="module")
def config():
    return train.make_config("ppo", SMALL)


@pytest.fixture(scope="module")
def full_run(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    return train.run(config, out, progress=False)


# ------------------------------------------------------------------ overrides


def test_overrides_are_parsed_to_field_types(config):
    assert config.num_envs == 16 and config.stop_at_score is None
    parsed = train.parse_overrides(
        ppo.PPOConfig,
        {
            "lr": "3e-4",
            "anneal-lr": "true",
            "hidden": "32,32",
            "total_env_steps": "1e6",
            "env-id": "FlappyBird-lidar-v0",
        },
    )
    assert parsed == dict(
        lr=3e-4,
        anneal_lr=True,
        hidden=(32, 32),
        total_env_steps=1_000_000,
        env_id="FlappyBird-lidar-v0",
    )
    assert "  --num-envs int (default: 64)" in train.config_help("ppo").splitlines()
    argv = ["--lr", "1e-3", "--anneal-lr", "--hidden=16,16", "--num-envs", "8"]
    assert train.overrides_from_argv(argv) == {
        "lr": "1e-3",
        "anneal-lr": "true",
        "hidden": "16,16",
        "num-envs": "8",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"no-such-option": "1"}, "Unknown option --no-such-option"),
        ({"num-envs": "many"}, "--num-envs: cannot parse"),
        ({"num-envs": "2.5"}, "--num-envs: cannot parse"),
        ({"anneal-lr": "maybe"}, "--anneal-lr: cannot parse"),
        ({"num-envs": "0"}, "num_envs must be an int >= 1"),
        ({"eval-max-score": "1e9"}, "eval_max_score must be <= 50000000, got 10+$"),
        ({"max-steps-in-episode": "3e9"}, "max_steps_in_episode must fit int32"),
        ({"seed": "4294967296"}, r"seed must be an int in \[0, 2\*\*32\)"),
        ({"seed": "-1"}, r"seed must be an int in \[0, 2\*\*32\)"),
    ],
)
def test_bad_overrides_raise_before_compiling(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.make_config("ppo", overrides)
    with pytest.raises(ValueError, match=message):
        train.train_main("ppo", tmp_path / "run", overrides, progress=False)
    assert not (tmp_path / "run").exists()  # nothing created


@pytest.mark.parametrize(
    "algo, override",
    [("qlearning", ("epsilon", "0.02", 0.02)), ("dqn", ("tau", "0.5", 0.5))],
)
def test_every_algo_goes_through_the_one_driver(tmp_path, monkeypatch, algo, override):
    with pytest.raises(ValueError, match="Unknown algo"):
        train.make_config("dqn2")
    assert set(registry.NAMES) == {
        "reinforce",
        "a2c",
        "ppo",
        "grpo",
        "qlearning",
        "dqn",
    }
    calls = []

    def fake(config, out_dir, **kwargs):
        calls.append((config, kwargs))
        return driver.RunResult(out_dir, {"median_score": 1.0}, [], None, None, True)

    monkeypatch.setattr(driver, "run", fake)
    name, text, value = override
    out = train.train_main(algo, tmp_path / "q", {name: text}, False, False)
    assert out == {"median_score": 1.0}
    config, kwargs = calls[0]
    assert registry.of(config) is registry.get(algo)
    assert getattr(config, name) == value and kwargs["progress"] is False
    assert f"--{name}" in train.config_help(algo)


# ------------------------------------------------------------------ a whole run


@pytest.mark.slow
def test_run_writes_the_contract_files(full_run, config):
    out = full_run.out_dir
    for name in ("config.json", "metrics.csv", "eval.json", "learning_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "agent.gif").stat().st_size > 0
    data = json.loads((out / "eval.json").read_text())
    for key in ("median_score", "mean_score", "scores", "wall_clock_s", "env_steps"):
        assert key in data
    assert len(data["scores"]) == config.final_eval_episodes
    assert max(data["scores"]) <= config.eval_max_score
    assert data["wall_clock_s"] > 0 and data["env_steps"] > 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["algo"] == "ppo" and saved["config"]["num_envs"] == 16
    assert "jax" in saved["versions"]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["update"]) for r in rows] == [32, 64, 96]
    assert int(rows[-1]["env_steps"]) == 96 * config.steps_per_update
    with pytest.raises(FileExistsError):
        train.run(config, out, progress=False)


@pytest.mark.slow
def test_short_ppo_run_learns(full_run):
    # A uniformly random policy never passes a pipe (0 of 512 held-out episodes);
    # after ~98k env steps the policy passes several on average. The bounds hold
    # with a margin for seeds 0-3 (last training mean 0.83-1.10, 5.0-8.9x the
    # first; best validation median 1.5-2.5; held-out mean 1.75-2.5).
    rows = full_run.metrics
    assert rows[-1]["train_score_mean"] > 0.5
    assert rows[-1]["train_score_mean"] > 3 * rows[0]["train_score_mean"]
    assert max(r["val_median"] for r in rows) >= 1
    assert full_run.eval["mean_score"] >= 1


@pytest.mark.slow
def test_checkpoint_round_trip(full_run, config, tmp_path):
    best = full_run.out_dir / "checkpoints" / "best"
    policy, params, _, env_params, meta = checkpoint.load_policy(best)
    jax.tree.map(np.testing.assert_array_equal, params, full_run.best_params)
    assert meta["algo"] == "ppo" and meta["env_steps"] == full_run.eval["env_steps"]
    assert env_params.max_steps_in_episode > 0 and policy.has_value
    # rl-pg eval on the run directory scores the same policy on the same levels.
    data = train.eval_main(
        full_run.out_dir, tmp_path / "eval", num_episodes=8, max_score=50
    )
    assert data["scores"] == full_run.eval["scores"]
    assert (tmp_path / "eval" / "eval.json").is_file()


# ------------------------------------------------------------------ resume


@pytest.mark.slow
def test_resume_reaches_the_same_parameters(full_run, config, tmp_path):
    out = tmp_path / "interrupted"
    part = train.run(config, out, progress=False, max_evals=1)
    assert not part.completed and not (out / "eval.json").exists()
    assert int(part.state.update) == 32
    with pytest.raises(FileExistsError):
        train.run(config, out, progress=False)
    other = train.make_config("ppo", {**SMALL, "lr": "3e-4"})
    with pytest.raises(ValueError, match="config differs"):
        train.run(other, out, resume=True, progress=False)
    done = train.run(config, out, resume=True, progress=False)
    assert done.completed
    jax.tree.map(np.testing.assert_array_equal, done.state, full_run.state)
    jax.tree.map(np.testing.assert_array_equal, done.best_params, full_run.best_params)
    assert [r["update"] for r in done.metrics] == [32, 64, 96]
    for a, b in zip(done.metrics, full_run.metrics, strict=True):
        assert a["val_median"] == b["val_median"]
        assert a["train_score_mean"] == pytest.approx(b["train_score_mean"])
    assert done.eval["scores"] == full_run.eval["scores"]
    # Integer columns stay integers in memory and in metrics.csv after a resume.
    with open(out / "metrics.csv") as f:
        text_rows = list(csv.DictReader(f))
    int_columns = (  # counts, not train.INT_COLUMNS: the test names them itself
        "update",
        "env_steps",
        "live_env_steps",
        "train_episodes",
        "train_score_max",
        "best_env_steps",
    )
    for column in int_columns:
        assert all(isinstance(r[column], int) for r in done.metrics), column
        assert all(r[column].lstrip("-").isdigit() for r in text_rows), column


def _snapshot(directory):
    return {
        p.relative_to(directory): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_resume_on_a_finished_run_leaves_it_as_it_is(full_run, config, capsys):
    out = full_run.out_dir
    before = _snapshot(out)
    again = train.run(config, out, resume=True, progress=False)
    assert again.completed and again.eval == full_run.eval
    assert int(again.state.update) == config.num_updates
    data = train.train_main("ppo", out, {}, resume=True, progress=False)
    assert data == full_run.eval
    assert "finished run (eval.json exists): left as it is" in capsys.readouterr().out
    assert _snapshot(out) == before


@pytest.mark.slow
def test_resume_after_an_early_stop_trains_no_further(config, tmp_path):
    out = tmp_path / "stopped"
    stopped = train.run(config, out, progress=False, gif=False, callback=lambda e: 1)
    assert stopped.completed and int(stopped.state.update) == 32
    before = _snapshot(out)
    again = train.run(config, out, resume=True, progress=False, gif=False)
    assert int(again.state.update) == 32 and _snapshot(out) == before
    # Killed after the stop's checkpoint but before eval.json: resuming finishes
    # the run (the held-out evaluation) without training further.
    (out / "eval.json").unlink()
    done = train.run(config, out, resume=True, progress=False, gif=False)
    assert int(done.state.update) == 32
    assert done.eval["scores"] == stopped.eval["scores"]


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes(full_run, config, tmp_path):
    out = tmp_path / "killed"
    algorithm = train.algorithm_of(config)
    io.new_out_dir(out)  # what run() had done when it was killed
    io.write_config(out, files.run_config(algorithm, config))
    (out / "checkpoints").mkdir()
    part = train.run(config, out, resume=True, progress=False, max_evals=1)
    assert int(part.state.update) == 32
    assert part.metrics[0]["loss"] == full_run.metrics[0]["loss"]
    assert part.metrics[0]["val_median"] == full_run.metrics[0]["val_median"]
    # Killed even before config.json: the directory holds only its claim.
    bare = tmp_path / "bare"
    io.new_out_dir(bare)
    part = train.run(config, bare, resume=True, progress=False, max_evals=1)
    assert int(part.state.update) == 32 and (bare / "config.json").is_file()
    assert part.metrics[0]["loss"] == full_run.metrics[0]["loss"]
    with pytest.raises(FileExistsError, match="continue the run in it with --resume"):
        train.run(config, bare, progress=False)


def test_a_broken_train_state_names_the_file(tmp_path):
    path = tmp_path / train.STATE_FILE
    path.write_bytes(b"\x93\x01")  # truncated msgpack
    with pytest.raises(ValueError, match=f"{path} is not a readable train state"):
        files.load_train_state(path, None)


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_an_error_naming_the_update(tmp_path):
    config = train.make_config(
        "ppo",
        {
            "num-envs": "4",
            "num-steps": "16",
            "num-minibatches": "1",
            "update-epochs": "1",
            "hidden": "8",
            "total-env-steps": str(4 * 16 * 4),
            "eval-every-steps": str(4 * 16 * 2),
            "eval-episodes": "2",
            "eval-max-score": "5",
            "reward-scale": "1e38",
        },
    )
    out = tmp_path / "inf"
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss at update 1 "):
        train.run(config, out, progress=False, gif=False)
    assert not (out / "metrics.csv").exists()  # no row of infs
    assert not (out / "eval.json").exists()


@pytest.mark.slow
def test_train_main_resume_reads_the_saved_config(config, tmp_path):
    out = tmp_path / "cli"
    train.run(config, out, progress=False, max_evals=2)
    data = train.train_main("ppo", out, {}, resume=True, progress=False)
    assert data["trained_env_steps"] == config.num_updates * config.steps_per_update
    with pytest.raises(ValueError, match="Nothing to resume"):
        train.train_main("ppo", tmp_path / "missing", {}, resume=True, progress=False)


# ------------------------------------------------------------------ seeds


@pytest.mark.slow
def test_value_based_seeds_side_by_side_equal_one_by_one():
    from rl_pg.algos import qlearning

    config = qlearning.QLearningConfig(
        num_envs=16,
        total_env_steps=3 * 16_000,
        eval_every_steps=16_000,
        eval_episodes=4,
        eval_max_score=20,
        final_eval_episodes=4,
    )
    together = train.train_seeds(config, [0, 1], vmap=True)
    alone = train.train_seeds(config, [0, 1], vmap=False)
    assert together.env_steps == alone.env_steps == 3 * 16_000
    for a, b in zip(together.curves, alone.curves, strict=True):
        assert [r["update"] for r in a] == [1, 2, 3]
        for key in ("env_steps", "val_median", "best_median", "train_score_mean"):
            np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b])
    for a, b in zip(together.best_params, alone.best_params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert [f["scores"] for f in together.final] == [f["scores"] for f in alone.final]
    assert len(together.final[0]["scores"]) == 4
    # the seeds differ: different envs, different tables
    assert not np.allclose(together.best_params[0], together.best_params[1])
    for curve in together.curves:  # the kept table is the best evaluated one
        medians = [r["val_median"] for r in curve]
        assert [r["best_median"] for r in curve] == list(np.maximum.accumulate(medians))
    # without evaluation: no scores, the last tables, and the same training
    plain = train.train_seeds(config, [0, 1], vmap=True, evaluate=False)
    assert plain.final == [] and "val_median" not in plain.curves[0][0]
    assert [r["env_steps"] for r in plain.curves[1]] == [16_000, 32_000, 48_000]


def test_cli_help_config_needs_no_out_and_train_needs_it(capsys):
    from rl_pg import cli

    cli.main(["train", "--algo", "dqn", "--help-config"])
    assert "--tau float" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--algo", "ppo"])
    assert exit_info.value.code == 2
    assert "required: --out" in capsys.readouterr().err


def test_stop_rule_needs_a_confirmation_on_fresh_validation_levels():
    # One validation median at the target no longer stops a run: the policy must
    # also reach it on stop_confirm_fraction of stop_confirm_episodes fresh levels.
    shipped = Path(train.__file__).parent / "checkpoints"
    _, good, *_ = checkpoint.load_policy(shipped / "good")
    _, partial, *_ = checkpoint.load_policy(shipped / "partial")
    config = ppo.PPOConfig(
        eval_max_score=30, stop_at_score=30, stop_confirm_episodes=16
    )

    def stop(config, params, val_median, best_median):
        rule = base.stop_rule(ppo.ALGORITHM, config, params, val_median, best_median)
        return bool(rule)

    assert stop(config, good, 30.0, 30.0)
    assert not stop(config, good, 29.0, 30.0)  # val median short
    # the partial policy (held-out median 6) fails the confirmation even when a
    # lucky validation round reached the target; without one it would stop
    assert not stop(config, partial, 30.0, 30.0)
    unconfirmed = dataclasses.replace(config, stop_confirm_episodes=0)
    assert stop(unconfirmed, partial, 30.0, 30.0)
    assert not stop(unconfirmed, partial, 5.0, 29.0)
    strict = dataclasses.replace(config, stop_confirm_fraction=1.0)
    lenient = dataclasses.replace(config, stop_confirm_fraction=0.01)
    assert stop(lenient, partial, 30.0, 30.0)  # some levels reach 30
    assert not stop(strict, partial, 30.0, 30.0)
    assert not stop(dataclasses.replace(config, stop_at_score=None), good, 1e4, 1e4)


@pytest.mark.slow
def test_cartpole_trains_end_to_end(tmp_path):
    # Any gymnax env with discrete actions: CartPole-v1 with PureJaxRL's PPO
    # settings, scored by episode return (random play returns ~22).
    config = train.make_config(
        "ppo",
        {
            "env-id": "CartPole-v1",
            "num-envs": "4",
            "num-steps": "128",
            "lr": "2.5e-4",
            "anneal-lr": "true",
            "update-epochs": "4",
            "num-minibatches": "4",
            "reward-scale": "1",
            "total-env-steps": "40960",
            "eval-every-steps": "20480",
        },
    )
    result = train.run(config, tmp_path / "run", progress=False)
    data = result.eval
    assert len(data["scores"]) == 32 and max(data["scores"]) <= 500
    assert data["mean_score"] > 100, data  # learned well beyond random play
    assert [r["env_steps"] for r in result.metrics] == [20480, 40960]
    meta = json.loads((tmp_path / "run/checkpoints/best/meta.json").read_text())
    assert meta["env_id"] == "CartPole-v1"
    assert meta["env_kwargs"] == {"max_steps_in_episode": 500}
    assert not (tmp_path / "run/agent.gif").exists()  # no renderer for CartPole
