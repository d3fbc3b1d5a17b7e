"""Episodic, grouped and streaming rollouts on FlappyBird."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rl_pg
from rl_pg.policies import mlp_policy
from rl_pg.rollout import (
    episodic_rollout,
    grouped_rollout,
    stream_init,
    streaming_rollout,
)

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def setup():
    env, env_params = rl_pg.make("FlappyBird-v0")
    policy = mlp_policy(2, hidden=(16,))
    params = policy.init(KEY, jnp.zeros(12))
    return env, env_params, policy, params


@pytest.mark.slow
def test_episodic_masks_and_truncation(setup):
    env, env_params, policy, params = setup
    reset_keys = jax.random.split(KEY, 16)
    run = jax.jit(
        lambda k: episodic_rollout(
            k, params, policy.apply, env, env_params, reset_keys, horizon=60
        )
    )
    traj = run(jax.random.PRNGKey(1))
    assert traj.observations.shape == (60, 16, 12)
    for field in ("actions", "rewards", "mask", "terminated", "truncated", "level"):
        assert getattr(traj, field).shape == (60, 16)
    mask = np.asarray(traj.mask)
    term = np.asarray(traj.terminated)
    trunc = np.asarray(traj.truncated)
    for b in range(16):
        ends = np.flatnonzero(term[:, b])
        assert len(ends) <= 1
        length = ends[0] + 1 if len(ends) else 60
        np.testing.assert_array_equal(mask[:, b], np.arange(60) < length)
        assert trunc[-1, b] == (len(ends) == 0) and not trunc[:-1, b].any()
        # the crash reward is the last live reward
        if len(ends):
            assert float(traj.rewards[ends[0], b]) == -1.0
    # random policies crash into the first pipe quickly: most episodes end
    assert term.any(axis=0).sum() >= 8
    # log_probs are those of the actions under the policy
    logits, _ = policy.apply(params, traj.observations)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), traj.actions[..., None], -1)
    np.testing.assert_allclose(lp[..., 0], traj.log_probs, atol=1e-5)
    # deterministic for a fixed key
    again = run(jax.random.PRNGKey(1))
    for x, y in zip(traj, again, strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_time_limit_ends_an_episodic_rollout_as_truncated(setup):
    """max_steps_in_episode = 5 within a 12-step horizon: the episode ends after
    its 5th step as truncated (not terminated) and bootstraps from the state it
    reached; bad keys and horizons are refused before tracing."""
    _, _, policy, params = setup
    env, env_params = rl_pg.make("FlappyBird-v0", max_steps_in_episode=5)
    traj = jax.jit(
        lambda k: grouped_rollout(
            k,
            params,
            policy.apply,
            env,
            env_params,
            jax.random.split(KEY, 2),
            2,
            np.int64(12),  # numpy ints are ints
        )  # fmt: skip
    )(jax.random.PRNGKey(3))
    np.testing.assert_array_equal(traj.mask.sum(0), [5, 5, 5, 5])
    np.testing.assert_array_equal(np.flatnonzero(traj.truncated.any(1)), [4])
    assert not traj.terminated.any()
    np.testing.assert_array_equal(traj.next_values[4], traj.values[5])
    for keys, horizon, match in [
        (KEY, 12, "batch of keys"),
        (jax.random.split(KEY, 2), 0, "horizon must be an int >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            grouped_rollout(
                KEY, params, policy.apply, env, env_params, keys, 2, horizon
            )


def test_grouped_rollouts_share_levels_and_differ_in_actions(setup):
    env, env_params, policy, params = setup
    level_keys = jax.random.split(KEY, 3)
    traj = jax.jit(
        lambda k: grouped_rollout(
            k, params, policy.apply, env, env_params, level_keys, 4, horizon=150
        )
    )(jax.random.PRNGKey(2))
    assert traj.actions.shape == (150, 12)
    np.testing.assert_array_equal(traj.level[0], np.repeat(np.arange(3), 4))
    obs0 = np.asarray(traj.observations[0])
    for level in range(3):
        group = obs0[4 * level : 4 * level + 4]
        assert (group == group[0]).all()  # same level, same first observation
    assert not (obs0[0] == obs0[4]).all()  # different levels differ
    actions = np.asarray(traj.actions)
    assert not (actions[:, 0] == actions[:, 1]).all()


@pytest.mark.slow
def test_streaming_autoreset_and_bootstrap_values(setup):
    env, _, policy, params = setup
    env_params = env.default_params.replace(max_steps_in_episode=40)
    stream = stream_init(KEY, env, env_params, 8)
    run = jax.jit(
        lambda k, s: streaming_rollout(
            k, params, policy.apply, env, env_params, s, horizon=100
        )
    )
    stream, traj = run(jax.random.PRNGKey(3), stream)
    assert traj.mask.shape == (100, 8) and bool(jnp.all(traj.mask == 1))
    done = np.asarray(traj.terminated | traj.truncated)
    level = np.asarray(traj.level)
    # the episode counter steps exactly after each episode end
    np.testing.assert_array_equal(level[1:], level[:-1] + done[:-1])
    # no episode lasts more than 40 steps: the time limit truncates
    for b in range(8):
        ends = np.flatnonzero(done[:, b])
        assert np.diff(np.concatenate([[-1], ends])).max() <= 40
    # where an episode continues, next_values is the next step's value
    cont = ~done[:-1]
    np.testing.assert_allclose(
        np.asarray(traj.next_values[:-1])[cont],
        np.asarray(traj.values[1:])[cont],
        atol=1e-5,
    )
    # a second call continues the same streams
    stream2, traj2 = run(jax.random.PRNGKey(4), stream)
    np.testing.assert_array_equal(traj2.level[0], stream.episode)


@pytest.mark.slow
def test_bootstrap_values_equal_a_second_pass_per_step(setup):
    # next_values without a second network pass per step equals what a second
    # pass gives where it is read: truncated steps (time limit: V of the final
    # observation, not of the reset one) and the batch's last step.
    env, _, _, _ = setup
    policy = mlp_policy(2, hidden=(16,), value="separate")
    params = policy.init(KEY, jnp.zeros(12))
    env_params = env.default_params.replace(max_steps_in_episode=30)
    stream = stream_init(KEY, env, env_params, 8)

    def reference(key, stream):
        step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

        def body(s, k):
            key_act, key_step = jax.random.split(k)
            logits, _ = policy.apply(params, s.obs)
            action = jax.random.categorical(key_act, logits).astype(jnp.int32)
            obs, state, _, term, trunc, info = step(
                jax.random.split(key_step, 8), s.env_state, action, env_params
            )
            _, next_value = policy.apply(params, info["final_observation"])
            done = (term | trunc).astype(jnp.int32)
            return s._replace(obs=obs, env_state=state, episode=s.episode + done), (
                next_value
            )

        return jax.lax.scan(body, stream, jax.random.split(key, 100))[1]

    key = jax.random.PRNGKey(5)
    _, traj = jax.jit(
        lambda k, s: streaming_rollout(
            k, params, policy.apply, env, env_params, s, horizon=100
        )
    )(key, stream)
    want = np.asarray(jax.jit(reference)(key, stream))
    trunc = np.asarray(traj.truncated & ~traj.terminated)
    cut = trunc.copy()
    cut[-1] = False
    assert cut.sum() >= 8  # the 30-step limit cuts episodes inside the batch
    np.testing.assert_allclose(np.asarray(traj.next_values)[trunc], want[trunc], 1e-5)
    # the reset observation's value (values[t + 1]) would be wrong there
    assert not np.allclose(np.asarray(traj.values)[1:][cut[:-1]], want[cut])
    # episodic: the cut at T - 1 bootstraps from V of the state after the last step
    reset_keys = jax.random.split(KEY, 4)
    ep = episodic_rollout(
        key, params, policy.apply, env, env_params, reset_keys, horizon=20
    )
    alive = np.asarray(ep.truncated[-1])
    assert alive.any()
    np.testing.assert_allclose(
        np.asarray(ep.next_values[:-1]), np.asarray(ep.values[1:]), atol=1e-6
    )
    assert np.all(np.isfinite(np.asarray(ep.next_values[-1])))
