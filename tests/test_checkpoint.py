"""Policy checkpoints: round trip, atomic replacement, and a clear error naming the
file for every broken checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_pg import checkpoint
from rl_pg.policies import mlp_policy

SPEC = {"kind": "mlp", "num_actions": 2, "hidden": [4], "activation": "tanh"}


def _params(seed=0, hidden=(4,)):
    return mlp_policy(2, hidden=hidden).init(jax.random.PRNGKey(seed), jnp.zeros(12))


@pytest.fixture
def saved(tmp_path):
    return checkpoint.save_policy(
        tmp_path / "ckpt", _params(), policy=SPEC, env_id="FlappyBird-v0", step=7
    )


def test_round_trip(saved):
    policy, params, _, env_params, meta = checkpoint.load_policy(saved)
    jax.tree.map(np.testing.assert_array_equal, params, _params())
    assert meta["step"] == 7 and meta["policy"] == SPEC
    assert int(env_params.max_steps_in_episode) == 10_000
    logits, _ = policy.apply(params, jnp.ones(12))
    assert logits.shape == (2,)


@pytest.mark.slow
def test_replacing_leaves_the_new_checkpoint_and_no_temporary(saved):
    checkpoint.save_policy(
        saved, _params(seed=1), policy=SPEC, env_id="FlappyBird-v0", step=8
    )
    _, params, _, _, meta = checkpoint.load_policy(saved)
    jax.tree.map(np.testing.assert_array_equal, params, _params(seed=1))
    assert meta["step"] == 8
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in saved.iterdir()) == ["meta.json", "params.msgpack"]


def test_a_failed_write_keeps_the_old_checkpoint(saved, monkeypatch):
    def disk_full(*args, **kwargs):  # fails after params.msgpack was written
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.io, "write_json", disk_full)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_policy(
            saved, _params(seed=1), policy=SPEC, env_id="FlappyBird-v0", step=8
        )
    monkeypatch.undo()
    _, params, _, _, meta = checkpoint.load_policy(saved)
    jax.tree.map(np.testing.assert_array_equal, params, _params())
    assert meta["step"] == 7
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def _broken(saved, what):
    meta_path, params_path = saved / "meta.json", saved / "params.msgpack"
    meta = json.loads(meta_path.read_text())
    if what == "no params":
        params_path.unlink()
    elif what == "no meta":
        meta_path.unlink()
    elif what == "truncated":
        params_path.write_bytes(params_path.read_bytes()[:100])
    elif what == "random":
        params_path.write_bytes(np.random.default_rng(0).bytes(500))
    elif what == "bad json":
        meta_path.write_text("{not json")
    elif what == "kind":
        meta["policy"]["kind"] = "transformer"
        meta_path.write_text(json.dumps(meta))
    elif what == "hidden":
        meta["policy"]["hidden"] = [5]
        meta_path.write_text(json.dumps(meta))
    elif what == "env":
        meta["env_id"] = "FlappyBird-v9"
        meta_path.write_text(json.dumps(meta))
    elif what == "factory kwargs":
        meta["policy"]["depth"] = 3
        meta_path.write_text(json.dumps(meta))
    return saved


@pytest.mark.parametrize(
    "what, match",
    [
        ("no params", r"ckpt is not a policy checkpoint \(missing params.msgpack\)"),
        ("no meta", r"ckpt is not a policy checkpoint \(missing meta.json\)"),
        ("truncated", r"ckpt/params.msgpack is not a readable parameter file"),
        ("random", r"ckpt/params.msgpack"),
        ("bad json", r"ckpt/meta.json is not valid JSON"),
        ("kind", r"ckpt/meta.json: unknown policy kind 'transformer'"),
        ("hidden", r"ckpt/params.msgpack does not hold the parameters of the policy"),
        ("env", r"ckpt/meta.json: Unknown env id 'FlappyBird-v9'"),
        ("factory kwargs", r"ckpt/meta.json: .*depth"),
    ],
)
def test_broken_checkpoints_raise_an_error_naming_the_file(saved, what, match):
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load_policy(_broken(saved, what))


def test_params_of_another_policy_name_the_leaf(tmp_path):
    path = checkpoint.save_policy(
        tmp_path / "ckpt", _params(hidden=(3,)), policy=SPEC, env_id="FlappyBird-v0"
    )
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"\['Dense_0'\]\['kernel'\]: expected float32\[4, 2\], found float32\[3, 2\]",
    ):
        checkpoint.load_policy(path)


def test_missing_directory(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="nope does not exist"):
        checkpoint.load_policy(tmp_path / "nope")


def test_find_policy_checkpoint(saved, tmp_path):
    run = tmp_path / "run"
    checkpoint.save_policy(
        run / "checkpoints" / "best", _params(), policy=SPEC, env_id="FlappyBird-v0"
    )
    assert checkpoint.find_policy_checkpoint(saved) == saved
    assert checkpoint.find_policy_checkpoint(run) == run / "checkpoints" / "best"
    assert checkpoint.find_policy_checkpoint(tmp_path) is None


@pytest.mark.slow
def test_a_checkpoint_of_another_gymnax_env_loads_and_evaluates(tmp_path, capsys):
    """A CartPole policy (trained through ``--env-id``) loads with its own env."""
    from rl_pg import cli, train
    from rl_pg.algos import loop

    config = train.make_config(
        "ppo", {"env_id": "CartPole-v1", "max_steps_in_episode": 50}
    )
    params = loop.make_policy(config).init(jax.random.PRNGKey(0), jnp.zeros(4))
    train.save_policy(tmp_path / "ckpt", config, params, algo="ppo")
    policy, loaded, env, env_params, meta = checkpoint.load_policy(tmp_path / "ckpt")
    assert meta["env_id"] == "CartPole-v1"
    assert env.observation_space(env_params).shape == (4,)
    assert int(env_params.max_steps_in_episode) == 50
    cli.main(
        ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e")]
    )
    scores = json.loads((tmp_path / "e" / "eval.json").read_text())["scores"]
    assert 0 < max(scores) <= 50  # episode returns, capped by the step limit
    # rl-pg render draws Flappy Bird only, and says so.
    gif = tmp_path / "cartpole.gif"
    with pytest.raises(SystemExit):
        cli.main(["render", "--out", str(gif), "--checkpoint", str(tmp_path / "ckpt")])
    assert "acts in CartPole-v1; rl-pg render draws Flappy Bird only" in (
        capsys.readouterr().err
    )
    assert not gif.exists()


def test_policy_dir_maps_a_run_to_its_best_policy(saved, tmp_path):
    """A checkpoint passes through; a run directory (or its checkpoints/) means
    its best policy, whichever form the algorithm saved it in."""
    assert checkpoint.policy_dir(saved) == saved
    run = tmp_path / "run"
    best = checkpoint.save_policy(
        run / "checkpoints" / "best", _params(), policy=SPEC, env_id="FlappyBird-v0"
    )
    (run / "config.json").write_text(json.dumps({"algo": "ppo"}))
    assert checkpoint.policy_dir(run) == best
    assert checkpoint.policy_dir(run / "checkpoints") == best
    table = tmp_path / "q" / "checkpoints" / "best.npz"
    table.parent.mkdir(parents=True)
    table.write_bytes(b"a table")
    (table.parent / ".best.npz.tmp").write_bytes(b"a partial write")
    assert checkpoint.policy_dir(tmp_path / "q") == table
    assert checkpoint.policy_dir(table) == table


def test_policy_dir_says_what_to_pass(tmp_path):
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.policy_dir(tmp_path)
    message = str(error.value)
    assert "is neither a policy checkpoint nor a training run directory" in message
    assert "pass a training run directory (config.json and checkpoints/)" in message
    with pytest.raises(checkpoint.CheckpointError, match="it does not exist"):
        checkpoint.policy_dir(tmp_path / "missing")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algo": "dqn"}))
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.policy_dir(run)
    assert "has no best policy yet" in str(error.value)
    assert f"rl-pg train --algo dqn --resume --out {run}" in str(error.value)


def test_a_sweep_directory_is_named_as_one(tmp_path):
    """eval / render / the study and `rl-pg train --resume` given a sweep say to
    pass one of its runs (train --resume crashed on its config.json)."""
    from rl_pg import train

    sweep = tmp_path / "sweep"
    (sweep / "cell_000_seed_0" / "checkpoints").mkdir(parents=True)
    (sweep / "config.json").write_text(json.dumps({"algo": "ppo", "cells": [{}]}))
    expected = f"holds an rl-pg sweep: pass one of its runs, cell_*_seed_* ({sweep}/"
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.policy_dir(sweep)
    assert expected in str(error.value)
    with pytest.raises(ValueError) as error:
        train.train_main("ppo", sweep, {}, resume=True, progress=False)
    assert "--resume resumes a training run" in str(error.value)
    assert expected in str(error.value)
