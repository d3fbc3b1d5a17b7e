"""Tests for rl_pg.algos.qlearning: the update, the binning, configs, learning."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rl_pg
from rl_pg import evaluate as ev
from rl_pg import train
from rl_pg.algos import qlearning as ql

# ---------------------------------------------------------------------- the update


def test_q_update_hand_computed():
    q = jnp.zeros((4, 2))
    q = q.at[2, 1].set(2.0)
    new = ql.q_update(
        q, jnp.array([1, 2]), jnp.array([0, 1]), jnp.array([10.0, -4.0]), 0.5
    )
    expected = np.zeros((4, 2))
    expected[1, 0] = 0 + 0.5 * (10 - 0)  # 5
    expected[2, 1] = 2 + 0.5 * (-4 - 2)  # -1
    np.testing.assert_allclose(new, expected)


def test_q_update_averages_duplicate_cells():
    q = jnp.zeros((4, 2)).at[1, 0].set(2.0)
    states = jnp.array([1, 1, 3, 1])
    actions = jnp.array([0, 0, 1, 1])
    targets = jnp.array([10.0, 4.0, 6.0, -8.0])
    new = ql.q_update(q, states, actions, targets, 0.5)
    expected = np.zeros((4, 2))
    # (1, 0) twice: mean target (10 + 4) / 2 = 7, so 2 + 0.5 * (7 - 2) = 4.5.
    # (A sequential or scatter-add update would move it twice.)
    expected[1, 0] = 4.5
    expected[3, 1] = 0.5 * 6  # 3
    expected[1, 1] = 0.5 * -8  # -4: same state, other action, its own cell
    np.testing.assert_allclose(new, expected)
    np.testing.assert_allclose(
        jax.jit(ql.q_update)(q, states, actions, targets, 0.5), expected
    )


def test_duplicates_do_not_overshoot():
    # 64 copies of one transition with alpha = 0.7: averaging keeps the step at
    # 0.7 * (y - Q); adding would move Q by 64 * 0.7 = 44.8 times the error.
    q = jnp.zeros((1, 2))
    cells = jnp.zeros(64, jnp.int32)
    new = ql.q_update(q, cells, cells, jnp.full(64, 10.0), 0.7)
    np.testing.assert_allclose(new[0, 0], 7.0, rtol=1e-6)


def test_td_targets_and_greedy_ties():
    q = jnp.array([[1.0, 3.0], [5.0, 2.0], [0.0, 0.0]])
    targets = ql.td_targets(
        q,
        next_states=jnp.array([0, 1, 1]),
        rewards=jnp.array([1.0, 1.0, -1000.0]),
        terminated=jnp.array([False, False, True]),
        gamma=1.0,
    )
    np.testing.assert_allclose(targets, [1 + 3, 1 + 5, -1000])  # no bootstrap
    np.testing.assert_array_equal(ql.greedy_actions(q), [1, 0, 0])  # tie -> 0


# --------------------------------------------------------------------- the binning


def _state(**fields):
    env = rl_pg.FlappyBird()
    _, state = jax.jit(env.reset_env)(jax.random.PRNGKey(0), env.default_params)
    return state.replace(**{k: jnp.asarray(v, jnp.float32) for k, v in fields.items()})


def test_binning_shapes():
    binning = ql.StateBinning()
    # floor((180 - 0 - 1) / 4) + 1 = 45; floor((190 + 350 - 1) / 4) + 1 = 135
    assert binning.shape == (135, 45, 20)
    assert binning.num_states == 121_500
    tutorial = ql.preset("tutorial").binning
    assert tutorial.shape == (135, 45)


def _coordinates(binning, state):
    return jax.jit(ql.StateBinning.coordinates, static_argnums=0)(binning, state)


def test_binning_hand_computed():
    binning = ql.StateBinning()
    state = _state(
        bird_y=244.0,
        bird_vel=-9.0,
        pipe_x=[100.0, 244.0, 388.0],
        pipe_gap_top=[120.0, 150.0, 130.0],
    )
    # Next pipe: pipe 0 (100 + 52 >= 57). dx = 100 + 52 - 57 = 95 -> bin 23;
    # dy = 244 - (120 + 100) = 24 -> floor((24 + 350) / 4) = 93; vel -9 -> 0.
    np.testing.assert_array_equal(_coordinates(binning, state), [93, 23, 0])
    index = jax.jit(ql.StateBinning.index, static_argnums=0)(binning, state)
    assert int(index) == (93 * 45 + 23) * 20 + 0


def test_binning_skips_a_passed_pipe_and_clips():
    binning = ql.StateBinning()
    state = _state(
        bird_y=100.0,
        bird_vel=10.0,
        pipe_x=[0.0, 144.0, 288.0],
        pipe_gap_top=[160.0, 150.0, 130.0],
    )
    # Pipe 0's right edge (52) is left of the bird (57): use pipe 1.
    # dx = 144 + 52 - 57 = 139 -> 34; dy = 100 - 250 = -150 -> 50; vel 10 -> 19.
    np.testing.assert_array_equal(_coordinates(binning, state), [50, 34, 19])
    far = _state(bird_y=-200.0, pipe_x=[300.0, 444.0, 588.0])
    # dx = 295 clips to bin 44; dy = -200 - gap bottom (< -350) clips to 0.
    np.testing.assert_array_equal(_coordinates(binning, far)[:2], [0, 44])
    low = _state(bird_y=390.0, pipe_gap_top=[100.0, 100.0, 100.0])
    assert int(_coordinates(binning, low)[0]) == 134  # dy = 190 -> clipped
    coarse = dataclasses.replace(binning, bin_size=10.0, use_velocity=False)
    # dx = 95 -> 9; dy = 24 -> floor(374 / 10) = 37; shape (54, 18)
    state = _state(pipe_x=[100.0, 244.0, 388.0], pipe_gap_top=[120.0] * 3)
    assert coarse.shape == (54, 18)
    np.testing.assert_array_equal(_coordinates(coarse, state), [37, 9])


def test_greedy_policy_is_hashable_by_value():
    a = ql.GreedyPolicy(ql.StateBinning())
    b = ql.GreedyPolicy(ql.StateBinning())
    assert a == b and hash(a) == hash(b)  # evaluate compiles once for both


# ---------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_envs=0), "num_envs must be an int >= 1"),
        (dict(num_envs=48), r"num_envs \(48\) must divide eval_every_steps"),
        (dict(epsilon=1.5), "epsilon must be a number in"),
        (dict(alpha=0.0), r"alpha must be a number in \(0.0, 1.0\]"),
        (dict(gamma=-0.1), "gamma must be a number in"),
        (dict(bin_size=0), r"bin_size must be a number in \(0.0, inf\)"),
        (dict(vertical_range=(5, 1)), "vertical_range must have low < high"),
        (dict(horizontal_range=(1,)), "horizontal_range must be a pair"),
        (dict(reward_crash=float("nan")), "reward_crash must be a number in"),
        (dict(stop_at_score=0), "stop_at_score must be None or an int"),
        (dict(use_velocity=1), "use_velocity must be a bool"),
        (dict(total_env_steps=1.5), "total_env_steps must be an int"),
        (dict(total_env_steps=1), r"total_env_steps \(1\) must be at least one chunk"),
        (dict(eval_max_score=10**9), "eval_max_score must be <="),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ql.QLearningConfig(**overrides)


def test_presets():
    tutorial = ql.preset("tutorial")
    assert tutorial.epsilon == 0.0 and not tutorial.use_velocity
    assert tutorial.num_envs == 1 and tutorial.alpha == 0.7 and tutorial.gamma == 1.0
    default = ql.preset("default", seed=3)
    assert default.seed == 3 and default.use_velocity and default.epsilon == 0.01
    with pytest.raises(ValueError, match="Unknown Q-learning preset"):
        ql.preset("nope")
    with pytest.raises(ValueError, match="epsilon"):
        ql.preset("default", epsilon=2.0)


def test_checkpoint_round_trip(tmp_path):
    config = ql.QLearningConfig(use_velocity=False, seed=7)
    q = np.random.default_rng(0).normal(size=(config.binning.num_states, 2))
    path = tmp_path / "table.npz"
    ql.save_checkpoint(path, q.astype(np.float32), config, env_steps=12)
    loaded, loaded_config = ql.load_checkpoint(path)
    np.testing.assert_array_equal(loaded, q.astype(np.float32))
    assert loaded_config == config
    assert [p.name for p in tmp_path.iterdir()] == ["table.npz"]  # no temporary


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a zip", b"\x00" * 64])
def test_a_broken_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "best.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="best.npz"):
        ql.load_checkpoint(path)
    with pytest.raises(ValueError, match="no such"):
        ql.load_checkpoint(tmp_path / "missing.npz")


# ----------------------------------------------------------------------- learning

SMALL = ql.QLearningConfig(
    total_env_steps=960_000,
    eval_every_steps=320_000,
    eval_episodes=8,
    eval_max_score=100,
    final_eval_episodes=8,
    stop_at_score=None,
)


@pytest.mark.slow
def test_qlearning_run_learns_and_writes_the_contract(tmp_path):
    # Q-learning runs through the one run driver (rl_pg.runs.driver.run).
    out = tmp_path / "run"
    result = train.run(SMALL, out, progress=False)
    for name in (
        "config.json",
        "metrics.csv",
        "eval.json",
        "learning_curve.png",
        "agent.gif",
        "checkpoints/best.npz",
        "checkpoints/last.npz",
    ):
        assert (out / name).is_file(), name
    data = json.loads((out / "eval.json").read_text())
    for field in ("median_score", "mean_score", "scores", "wall_clock_s", "env_steps"):
        assert field in data
    assert len(data["scores"]) == 8 and max(data["scores"]) <= 100
    config = json.loads((out / "config.json").read_text())
    assert set(config["versions"]) >= {"jax", "jaxlib", "flax", "optax", "gymnax"}
    assert len(result.metrics) == 3
    # An untrained (all-zero) table never flaps and scores 0 on every level; after
    # 960k steps the kept table is clearly better on the held-out test levels
    # (held-out medians 82.5, 9, 12 and 11 for seeds 0-3).
    assert data["median_score"] >= 3
    q, _ = ql.load_checkpoint(out / "checkpoints" / "best.npz")
    np.testing.assert_array_equal(q, result.best_params)
    # rl-pg eval reads the table of a Q-learning run directory.
    again = train.eval_main(out, tmp_path / "eval", num_episodes=8, max_score=100)
    assert again["scores"] == data["scores"]
    # A second run refuses the now non-empty directory before doing any work.
    with pytest.raises(FileExistsError, match="already exists"):
        train.run(SMALL, out, progress=False)


def test_untrained_table_scores_zero():
    env, params = rl_pg.FlappyBird(), rl_pg.FlappyBird().default_params
    binning = ql.StateBinning()
    q = jnp.zeros((binning.num_states, 2))
    result = ev.evaluate(
        ql.GreedyPolicy(binning), q, env, params, jax.random.PRNGKey(0), 8, 100
    )
    np.testing.assert_array_equal(result.scores, 0)


def test_train_traces_under_vmap_over_seeds():
    # eval_shape traces jit(vmap(train)) without compiling it (compiling the
    # whole run costs more than the rest of this file); the run driver runs the
    # same chunks for real above.
    config = dataclasses.replace(SMALL, use_velocity=False)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    state, metrics = jax.eval_shape(
        jax.jit(jax.vmap(functools.partial(ql.train, config))), keys
    )
    assert metrics.env_steps.shape == (3, config.num_chunks)
    assert metrics.val_median.shape == (3, config.num_chunks)
    assert state.best_params.shape == (3, config.binning.num_states, 2)


@pytest.mark.slow
def test_keep_checkpoints_all_keeps_every_table_and_variance_refuses_the_run(
    tmp_path,
):
    """`rl-pg train --algo qlearning --keep-checkpoints all` used to crash writing
    checkpoints/evaluations/ (never created); the variance study then pointed the
    user at --keep-checkpoints all instead of a policy-gradient run."""
    from rl_pg.variance import stages

    config = ql.QLearningConfig(
        num_envs=8,
        total_env_steps=4096,
        eval_every_steps=2048,
        eval_episodes=4,
        final_eval_episodes=4,
        eval_max_score=20,
    )
    out = tmp_path / "run"
    result = train.run(config, out, progress=False, gif=False, keep_checkpoints="all")
    kept = sorted((out / "checkpoints" / "evaluations").iterdir())
    assert [p.name for p in kept] == [f"env_steps_{n:012d}.npz" for n in (2048, 4096)]
    q, _ = ql.load_checkpoint(kept[-1])
    np.testing.assert_array_equal(q, result.state.q)
    with pytest.raises(ValueError, match="qlearning run.*reinforce, a2c, ppo, grpo"):
        stages.run_checkpoints(out)


def test_variance_refuses_a_value_based_run_by_its_config(tmp_path):
    from rl_pg.variance import stages

    for algo in ("qlearning", "dqn"):
        run = tmp_path / algo
        (run / "checkpoints" / "evaluations" / "env_steps_000000000008").mkdir(
            parents=True
        )
        (run / "config.json").write_text(json.dumps({"algo": algo}))
        with pytest.raises(ValueError, match=f"a {algo} run.*needs a run of"):
            stages.run_checkpoints(run)
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "config.json").write_text(json.dumps({"algo": "ppo"}))
    with pytest.raises(ValueError, match="keep-checkpoints all"):
        stages.run_checkpoints(tmp_path / "ppo")
