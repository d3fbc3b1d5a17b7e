"""Tests for rl_pg.evaluate: held-out levels, the score cap, determinism, eval.json."""

import json

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_max_steps_covers_the_slowest_pipe_cycle():
    for max_score in (1, 2, 3, 4, 10, 10_000):
        assert ev.max_steps_for(max_score) >= pipe_step(max_score - 1)
    # pipe_step itself is checked against the environment, up to pipe 9,999
    # (step 376,691), in test_max_score_caps_and_stops_episodes.


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
