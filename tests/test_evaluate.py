"""Tests for rl_pg.evaluate: held-out levels, the score cap, determinism, eval.json."""

import json

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiles import compiles

import rl_pg
from rl_pg import evaluate as ev

# evaluate is jitted with act_fn static and the episode count as a shape: one
# act_fn and N = 8 everywhere compile it once for the whole module.
N = 8
NEVER = (1e9, 0.0)  # (threshold, p_flap): never flaps


def scripted(params, obs, state, key):
    """Flap below ``threshold`` px, and otherwise with probability ``p_flap``."""
    threshold, p_flap = params
    coin = jax.random.bernoulli(key, p_flap)
    return ((state.bird_y > threshold) | coin).astype(jnp.int32)


def pipe_step(i: int) -> int:
    """The step at which pipe i (0-based) is passed, by hand.

    Pipe i < 3 starts at x = 288 + 144 i and moves 4 px/step; it is passed when its
    x before the move is 48 (centre x + 26 <= 74 < x + 30): step 61 + 36 i. Pipe 0
    leaves at step 86 (x = -56 < -52) and respawns at 397.6, so pipe 3 is passed
    when 397.6 - 4 j = 45.6, j = 88 moves later: step 86 + 88 + 1 = 175. From then
    on the pipes come every 36, 36, 41 steps (REFERENCE.md s. 1): 113 per three.
    """
    if i < 3:
        return 61 + 36 * i
    return 175 + 113 * ((i - 3) // 3) + (0, 36, 72)[(i - 3) % 3]


@pytest.fixture(scope="module")
def env_and_params():
    return rl_pg.make("FlappyBird-v0")


@pytest.fixture(scope="module")
def wide_gap():
    # A 400 px gap puts the lower pipe below the ground: hovering never crashes.
    return rl_pg.make("FlappyBird-v0", pipe_gap=400.0)


def test_held_out_keys_follow_the_documented_stream():
    keys = ev.held_out_keys(3)
    base = jax.random.PRNGKey(ev.HELD_OUT_SEED)
    for i in range(3):
        np.testing.assert_array_equal(keys[i], jax.random.fold_in(base, i))
    np.testing.assert_array_equal(ev.held_out_keys(5)[:3], keys)  # a prefix
    validation = ev.held_out_keys(3, ev.VALIDATION_SEED)
    assert not np.any(np.all(np.asarray(validation) == np.asarray(keys), axis=1))


def test_max_steps_covers_the_slowest_pipe_cycle(env_and_params):
    _, params = env_and_params
    for max_score in (1, 2, 3, 4, 5, 6, 7, 10, 10_000):
        cap = int(ev.max_steps_for(max_score, params))
        assert pipe_step(max_score - 1) <= cap <= pipe_step(max_score - 1) * 1.01 + 400
    assert pipe_step(9_999) == 376_691  # 37.67 steps per pipe
    assert int(ev.max_steps_for(ev.MAX_SCORE_LIMIT, params)) < 2**31 - 1


def test_never_flapping_falls_to_the_ground(env_and_params):
    env, params = env_and_params
    result = ev.evaluate(scripted, NEVER, env, params, jax.random.PRNGKey(0), N, 10)
    # y_t = 244 + sum_k min(-9 + k, 10): 373 after 30 steps, then
    # min(10, 404.48 - 373 - 24) = 7.48 puts the bird on the ground at step 31.
    np.testing.assert_array_equal(result.scores, 0)
    np.testing.assert_array_equal(result.lengths, 31)
    assert bool(jnp.all(result.crashed)) and bool(jnp.all(result.finished))


def test_max_score_caps_and_stops_episodes(wide_gap):
    env, params = wide_gap
    for max_score in (3, 20, 10_000):  # 10,000 pipes: 376,691 steps, ~2 s
        result = ev.evaluate(
            scripted, (300.0, 0.0), env, params, jax.random.PRNGKey(0), N, max_score
        )
        np.testing.assert_array_equal(result.scores, max_score)
        np.testing.assert_array_equal(result.lengths, pipe_step(max_score - 1))
        assert not bool(jnp.any(result.crashed))
        assert bool(jnp.all(result.finished))


def test_evaluate_is_deterministic_for_a_key(env_and_params):
    env, params = env_and_params
    policy = (250.0, 0.05)
    a = ev.evaluate(scripted, policy, env, params, jax.random.PRNGKey(3), N, 20)
    b = ev.evaluate(scripted, policy, env, params, jax.random.PRNGKey(3), N, 20)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = ev.evaluate(scripted, policy, env, params, jax.random.PRNGKey(4), N, 20)
    assert not np.array_equal(a.lengths, c.lengths)  # the key drives the actions


def test_greedy_scores_depend_on_levels_not_on_the_key(env_and_params):
    env, params = env_and_params
    greedy = (250.0, 0.0)
    a = ev.evaluate(scripted, greedy, env, params, jax.random.PRNGKey(0), N, 50)
    b = ev.evaluate(scripted, greedy, env, params, jax.random.PRNGKey(1), N, 50)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert len(set(np.asarray(a.lengths).tolist())) > 1  # levels differ
    other = ev.held_out_keys(N, seed=123)
    c = ev.evaluate(
        scripted, greedy, env, params, jax.random.PRNGKey(0), 50, reset_keys=other
    )
    assert not np.array_equal(a.lengths, c.lengths)


def test_the_median_is_known_once_both_middle_ranks_are():
    """Crashed episodes fill the lowest ranks, finished uncrashed ones the highest;
    the median of N needs ranks (N + 1) // 2 and N // 2 + 1 (two when N is even)."""

    def known(crashed, survived):
        n = len(crashed)
        crashed, survived = np.array(crashed, bool), np.array(survived, bool)
        carry = ev._EvalCarry(None, crashed | survived, crashed, None)
        return bool(ev._median_known(carry, n))

    assert not known([1, 1, 0, 0], [0, 0, 0, 0])  # rank 3 of 4 still running
    assert known([1, 1, 1, 0], [0, 0, 0, 0])
    assert known([1, 1, 0, 0], [0, 0, 1, 1])  # ranks 3 and 4 finished high
    assert not known([1, 0, 0, 0], [0, 0, 0, 1])  # rank 2 unknown
    assert not known([1, 1, 0, 0], [0, 0, 0, 1])  # rank 3 unknown
    assert not known([1, 1, 0, 0, 0], [0, 0, 0, 0, 0])  # rank 3 of 5
    assert known([1, 1, 1, 0, 0], [0, 0, 0, 0, 0])
    assert known([0, 0, 0, 0, 0], [0, 0, 1, 1, 1])


def test_median_only_gives_the_same_median(env_and_params):
    env, params = env_and_params
    key = jax.random.PRNGKey(0)
    for threshold in (230.0, 250.0):
        policy = (threshold, 0.0)
        full = ev.evaluate(scripted, policy, env, params, key, N, 1000)
        fast = ev.evaluate(
            scripted, policy, env, params, key, N, 1000, median_only=True
        )
        assert float(jnp.median(fast.scores)) == float(jnp.median(full.scores))
        assert int(fast.lengths.max()) <= int(full.lengths.max())
        # Finished episodes agree exactly; the others are lower bounds.
        done = np.asarray(fast.finished)
        np.testing.assert_array_equal(
            np.asarray(fast.scores)[done], np.asarray(full.scores)[done]
        )
        assert np.all(np.asarray(fast.scores) <= np.asarray(full.scores))


def test_invalid_arguments_raise(env_and_params):
    env, params = env_and_params
    with pytest.raises(ValueError, match="max_score"):
        ev.evaluate(scripted, NEVER, env, params, jax.random.PRNGKey(0), N, 0)
    with pytest.raises(ValueError, match="max_score"):  # int32 step counts
        ev.evaluate(scripted, NEVER, env, params, jax.random.PRNGKey(0), N, 10**9)
    with pytest.raises(ValueError, match="num_episodes"):
        ev.evaluate(scripted, NEVER, env, params, jax.random.PRNGKey(0), 0, 5)
    with pytest.raises(ValueError, match="max_score must be an int"):
        ev.evaluate(scripted, NEVER, env, params, jax.random.PRNGKey(0), N, True)
    for keys in (jnp.zeros((0, 2), jnp.uint32), jnp.zeros(2, jnp.uint32)):
        with pytest.raises(ValueError, match=r"reset_keys must be \[N >= 1, 2\]"):
            ev.evaluate(
                scripted, NEVER, env, params, jax.random.PRNGKey(0), reset_keys=keys
            )


def test_write_eval_json_fields(tmp_path):
    result = ev.EvalResult(
        scores=jnp.array([3, 10, 7, 10]),
        lengths=jnp.array([100, 300, 200, 300]),
        crashed=jnp.array([True, False, True, False]),
        finished=jnp.ones(4, bool),
    )
    path = tmp_path / "eval.json"
    written = ev.write_eval_json(path, result, 12.5, 1_000, max_score=10)
    data = json.loads(path.read_text())
    assert data == written
    assert data["median_score"] == 8.5  # (7 + 10) / 2
    assert data["mean_score"] == 7.5  # 30 / 4
    assert data["scores"] == [3, 10, 7, 10]
    assert data["wall_clock_s"] == 12.5 and data["env_steps"] == 1_000
    assert data["num_crashed"] == 2 and data["max_score"] == 10
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary


def test_agent_gif_stops_at_the_crash(env_and_params, tmp_path):
    env, params = env_and_params
    path = tmp_path / "agent.gif"
    n = ev.agent_gif(
        scripted, NEVER, env, params, path, jax.random.PRNGKey(0), max_frames=40
    )
    # Crash after 31 steps: states 0, 2, ..., 30 and the crash state 31.
    assert n == 17
    frames = iio.imread(path)
    assert frames.shape == (17, 512, 288, 3)


@pytest.mark.parametrize("pipe_speed", [3.0, 6.0])
def test_physics_constants_reach_score_window_step_caps_and_binning(pipe_speed):
    # EnvParams is the one home of the physics: with other pipe speeds every pipe
    # still counts exactly once (the score window is one move wide: a copied 4 px
    # window counts some pipes twice at 3 px/step and misses some at 6), the
    # evaluation's step cap still lets a never-crashing bird reach max_score (a
    # copied 38 steps per pipe is too few at 3 px/step), and Q-learning's state
    # reads the changed geometry.
    from rl_pg.algos import qlearning

    env, params = rl_pg.make("FlappyBird-v0", pipe_gap=400.0, pipe_speed=pipe_speed)
    result = ev.evaluate(
        scripted, (300.0, 0.0), env, params, jax.random.PRNGKey(0), N, 30
    )
    np.testing.assert_array_equal(result.scores, 30)
    assert not bool(jnp.any(result.crashed)) and bool(jnp.all(result.finished))
    # pipes come every (spawn_x + pipe_width) / speed / 3 steps on average
    per_pipe = (params.spawn_x + params.pipe_width) / pipe_speed / 3
    np.testing.assert_allclose(np.asarray(result.lengths) / 30, per_pipe, rtol=0.05)
    assert int(ev.max_steps_for(30, params)) >= int(result.lengths[0])
    moved = params.replace(bird_x=60.0, pipe_width=48.0, flap_vel=-8.0, pipe_gap=120.0)
    binning = qlearning.StateBinning.for_params(moved, bin_size=4.0)
    assert (binning.bird_x, binning.pipe_width, binning.pipe_gap) == (60, 48, 120)
    assert binning.velocity_range == (-9, 10)  # start velocity -9, max fall 10
    moved = moved.replace(bird_start_vel=-7.0, max_fall_vel=12.0)
    assert qlearning.StateBinning.for_params(moved).velocity_range == (-8, 12)
    default = qlearning.QLearningConfig().binning
    assert default == qlearning.StateBinning()
    assert (default.bird_x, default.pipe_gap, default.velocity_range) == (
        57.0,
        100.0,
        (-9, 10),
    )


@pytest.mark.slow
def test_other_gymnax_envs_are_scored_by_episode_return():
    from rl_pg.algos import ppo
    from rl_pg.envs import scored

    env, params = scored.make("CartPole-v1")
    assert params.max_steps_in_episode == 500
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    total = 0.0
    for t in range(5):
        obs, state, reward, terminated, truncated, info = env.step(
            jax.random.PRNGKey(t), state, 1, params
        )
        total += float(reward)
        assert float(info["score"]) == total == float(state.score)
        assert int(state.time) == t + 1 and "final_observation" in info

    def always(action):
        return lambda params, obs, state, key: jnp.int32(action)

    # pushing one way topples the pole within ~10 steps: return = length
    result = ev.evaluate(always(1), None, env, params, jax.random.PRNGKey(0), N, 10**4)
    scores, lengths = np.asarray(result.scores), np.asarray(result.lengths)
    assert scores.dtype == np.float32 and bool(jnp.all(result.crashed))
    np.testing.assert_array_equal(scores, lengths)
    assert scores.min() >= 5 and scores.max() < 20
    # the time limit (500, not Flappy Bird's pipe-based cap) ends the episode
    short = params.replace(max_steps_in_episode=7)
    result = ev.evaluate(always(1), None, env, short, jax.random.PRNGKey(0), N, 10**4)
    np.testing.assert_array_equal(result.scores, 7)
    assert not bool(jnp.any(result.crashed))
    for bad, why in [
        ("Pendulum-v1", "no discrete action space"),
        ("Breakout-MinAtar", "no flat"),
        ("Nope-v0", "not a gymnax environment id"),
    ]:
        with pytest.raises(ValueError, match=why):
            ppo.PPOConfig(env_id=bad)


@pytest.mark.slow
def test_evaluations_of_one_policy_compile_once(caplog, tmp_path):
    """The held-out evaluation and the GIF of other params under another config
    of the same policy (seed, learning rate) reuse the compilations: the
    algorithm's act_fn and env come from cached factories (static jit args)."""
    from rl_pg.algos import base, registry

    algorithm = registry.get("ppo")
    configs = [
        algorithm.config_cls(seed=seed, lr=lr, final_eval_episodes=N, eval_max_score=2)
        for seed, lr in ((0, 3e-4), (1, 1e-3))
    ]
    params = [
        algorithm.params(algorithm.init(c, jax.random.PRNGKey(i)))
        for i, c in enumerate(configs)
    ]

    def evaluate_and_draw(i):
        env, env_params = algorithm.make_env(configs[i])
        jax.block_until_ready(base.held_out(algorithm, configs[i], params[i]))
        act_fn = algorithm.act_fn(configs[i])
        path = tmp_path / f"{i}.gif"
        ev.agent_gif(act_fn, params[i], env, env_params, path, jax.random.PRNGKey(i))

    jax.clear_caches()  # another test in this worker may have compiled them
    assert compiles(lambda: evaluate_and_draw(0), caplog)  # the log shows them
    assert compiles(lambda: evaluate_and_draw(1), caplog) == []
