"""Parity with flappy-bird-gymnasium 0.4.0: same pipes, same actions, same game.

Each episode: the reference picks actions (random with a flap probability, or a
scripted controller that passes many pipes) with its pipe generator replaced by
our level's gaps; the recorded actions are replayed through rl_pg's env.
"""

import jax
import numpy as np
import pygame
import pytest
from reference_driver import reference_episode, replay

import rl_pg
from rl_pg.envs.lidar import clip_start

FIELDS = ("reward", "terminated", "score", "bird_y", "bird_vel", "pipe_x")


def _compare(env_id, policies, episodes, max_steps, seed):
    env, params = rl_pg.make(env_id)
    rng = np.random.default_rng(seed)
    results = []
    for ep in range(episodes):
        key = jax.random.PRNGKey(1000 * seed + ep)
        policy = policies[ep % len(policies)]
        ref = reference_episode(
            key, params, env_id != "FlappyBird-v0", policy, max_steps, rng
        )
        ours = replay(env, params, key, ref["action"])
        results.append((policy, ref, ours))
    return results


@pytest.mark.slow  # many random-policy episodes of the Python reference
def test_features_match_reference_exactly():
    policies = ["scripted", 0.05, 0.1, 0.2, 0.5]
    results = _compare("FlappyBird-v0", policies, episodes=60, max_steps=4000, seed=1)
    scripted_scores = []
    for policy, ref, ours in results:
        np.testing.assert_allclose(ours["obs0"], ref["obs0"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours["obs"], ref["obs"], rtol=0, atol=2e-6)
        for field in FIELDS:
            np.testing.assert_allclose(
                np.asarray(ours[field], float),
                np.asarray(ref[field], float),
                rtol=0,
                atol=1e-4,
                err_msg=f"{field} differs (policy {policy})",
            )
        # Termination step: the episode ends exactly where the reference's does.
        assert ours["terminated"][-1] == ref["terminated"][-1]
        assert not ours["terminated"][:-1].any()
        if policy == "scripted":
            scripted_scores.append(ref["score"][-1])
    # The scripted controller exercises many pipe respawns.
    assert np.mean(scripted_scores) > 20, scripted_scores


def test_random_policy_episode_length_matches_reference_fact():
    # REFERENCE.md: with p = 0.5 every episode lasts 50 steps.
    results = _compare("FlappyBird-v0", [0.5], episodes=10, max_steps=200, seed=2)
    assert all(len(ref["action"]) == 50 for _, ref, _ in results)


@pytest.mark.slow  # many random-policy episodes of the Python reference
def test_lidar_matches_reference():
    policies = ["scripted", 0.05, 0.1, 0.5]
    results = _compare(
        "FlappyBird-lidar-v0", policies, episodes=8, max_steps=500, seed=3
    )
    errors = []
    for _, ref, ours in results:
        for field in FIELDS:  # rewards include the LIDAR-only private-zone penalty
            np.testing.assert_allclose(
                np.asarray(ours[field], float), np.asarray(ref[field], float), atol=1e-4
            )
        errors.append(np.abs(ours["obs"] - ref["obs"]).ravel() * 196)
    errors = np.concatenate(errors)
    # Exact up to float32 rounding, except rare rays whose float32 endpoint lands
    # on the other side of an integer than the reference's float64 one.
    assert np.quantile(errors, 0.999) < 1e-3
    assert errors.max() < 3.0  # pixels


@pytest.mark.slow  # many random-policy episodes of the Python reference
def test_lidar_matches_reference_to_float32_rounding():
    # Not a single pixel off: the clipping is SDL's and the ray ends round like
    # the reference's float64 ones.
    policies = ["scripted", 0.05, 0.1, 0.5]
    results = _compare(
        "FlappyBird-lidar-v0", policies, episodes=8, max_steps=500, seed=5
    )
    for _, ref, ours in results:
        np.testing.assert_allclose(ours["obs0"], ref["obs0"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours["obs"], ref["obs"], rtol=0, atol=1e-6)


def test_clipline_matches_pygame():
    rng = np.random.default_rng(0)
    n = 20_000
    x1, y1, x2, y2 = (rng.integers(-100, 400, n) for _ in range(4))
    y2[:2000] = y1[:2000] + rng.integers(-2, 3, 2000)  # near-horizontal
    x2[2000:4000] = x1[2000:4000] + rng.integers(-2, 3, 2000)  # near-vertical
    left, top = rng.integers(-60, 300, n), rng.integers(-300, 420, n)
    w, h = rng.integers(1, 60, n), rng.integers(1, 330, n)
    args = [np.asarray(a, np.float32) for a in (x1, y1, x2, y2, left, top, w, h)]
    hit, x, y = map(np.asarray, jax.jit(clip_start)(*args))
    for i in range(n):
        rect = pygame.Rect(int(left[i]), int(top[i]), int(w[i]), int(h[i]))
        ref = rect.clipline(int(x1[i]), int(y1[i]), int(x2[i]), int(y2[i]))
        assert bool(ref) == bool(hit[i]), i
        if ref:
            assert ref[0] == (x[i], y[i]), i


@pytest.mark.parametrize("env_id", ["FlappyBird-v0", "FlappyBird-lidar-v0"])
@pytest.mark.slow
def test_reference_reset_observation(env_id):
    env, params = rl_pg.make(env_id)
    results = _compare(env_id, [0.5], episodes=1, max_steps=5, seed=4)
    _, ref, ours = results[0]
    np.testing.assert_allclose(ours["obs0"], ref["obs0"], atol=1e-5)
