"""Rules, shapes, levels, API conformance and bad input of the FlappyBird env."""

import functools
import warnings
from functools import partial

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnax.wrappers.purerl import FlattenObservationWrapper, LogWrapper

import rl_pg
from rl_pg.envs import EnvState, features, gap_top, level_seed
from rl_pg.envs.render import render_gray, render_rgb, write_gif
from rl_pg.scripted import scripted_action

ENV_IDS = ["FlappyBird-v0", "FlappyBird-lidar-v0", "FlappyBird-pixels-v0"]
KEY = jax.random.PRNGKey(0)


def _state(params, **overrides):
    """A mid-flight state with pipes far away unless overridden."""
    _, state = rl_pg.make("FlappyBird-v0")[0].reset(KEY, params)
    state = state.replace(pipe_x=jnp.array([200.0, 344.0, 488.0]))
    return state.replace(
        **{k: jnp.asarray(v, jnp.float32) for k, v in overrides.items()}
    )


@pytest.fixture(scope="module")
def features_env():
    return rl_pg.make("FlappyBird-v0")


def _step(env_params, state, action):
    env, params = env_params
    return jax.jit(env.step_env)(KEY, state, action, params)


def test_gravity_adds_one_per_step_up_to_max_fall_speed(features_env):
    _, params = features_env
    for vel, expected in [(-9.0, -8.0), (0.0, 1.0), (9.0, 10.0), (10.0, 10.0)]:
        state = _state(params, bird_vel=vel, bird_y=100.0)
        _, new, _, _, _ = _step(features_env, state, 0)
        assert float(new.bird_vel) == expected
        assert float(new.bird_y) == 100.0 + expected  # y += vel after gravity


def test_flap_sets_velocity_and_rotation_without_gravity(features_env):
    _, params = features_env
    state = _state(params, bird_vel=5.0, bird_y=100.0, bird_rot=-30.0)
    _, new, _, _, _ = _step(features_env, state, 1)
    assert float(new.bird_vel) == -9.0  # no +1 gravity on a flap step
    assert float(new.bird_y) == 91.0
    assert float(new.bird_rot) == 45.0


def test_rotation_decreases_by_three_down_to_minus_ninety(features_env):
    _, params = features_env
    for rot, expected in [(45.0, 42.0), (-87.0, -90.0), (-90.0, -90.0)]:
        _, new, _, _, _ = _step(features_env, _state(params, bird_rot=rot), 0)
        assert float(new.bird_rot) == expected


def test_no_flap_above_the_flap_ceiling_and_top_penalty(features_env):
    _, params = features_env
    # At y = -48 (not > -2 * 24) a flap is ignored: gravity applies instead.
    state = _state(params, bird_vel=-5.0, bird_y=-48.0)
    _, new, reward, terminated, _ = _step(features_env, state, 1)
    assert float(new.bird_vel) == -4.0
    assert float(reward) == pytest.approx(-0.5)  # y < 0: touching the top
    assert not bool(terminated)  # no ceiling crash
    state = _state(params, bird_vel=-5.0, bird_y=-47.0)
    _, new, _, _, _ = _step(features_env, state, 1)
    assert float(new.bird_vel) == -9.0


def test_ground_clamps_position_and_crashes(features_env):
    _, params = features_env
    state = _state(params, bird_vel=10.0, bird_y=375.0)
    _, new, reward, terminated, _ = _step(features_env, state, 0)
    # y += min(10, 404.48 - 375 - 24) = 5.48, then y + 24 >= 403.48: crash.
    assert float(new.bird_y) == pytest.approx(380.48, abs=1e-4)
    assert bool(terminated)
    assert float(reward) == -1.0
    assert float(new.bird_vel) == 0.0  # the reference zeroes it on a crash
    # Within a pixel of the ground is a crash too (y + 24 >= 404.48 - 1): from 370
    # at 9 + 1 px/step the bird stops at 380 (404 < 404.48) and crashes there.
    state = _state(params, bird_vel=9.0, bird_y=370.0)
    _, new, _, terminated, _ = _step(features_env, state, 0)
    assert float(new.bird_y) == 380.0 and bool(terminated)


@pytest.mark.slow
def test_score_window_counts_each_pipe_once(features_env):
    _, params = features_env
    # Bird centre 74 passes a pipe when pipe_x + 26 <= 74 < pipe_x + 30,
    # i.e. pipe_x in (44, 48]; pipes move 4 px a step, so exactly one step.
    gaps = jnp.array([150.0, 150.0, 150.0])
    scores, rewards = [], []
    state = _state(params, bird_y=200.0, bird_vel=-9.0).replace(
        pipe_x=jnp.array([60.0, 204.0, 348.0]), pipe_gap_top=gaps
    )
    for _ in range(8):
        state = state.replace(bird_y=jnp.float32(200.0), bird_vel=jnp.float32(0.0))
        _, state, reward, terminated, info = _step(features_env, state, 0)
        scores.append(int(info["score"]))
        rewards.append(float(reward))
        assert not bool(terminated)
    # pipe_x before each step: 60, 56, 52, 48 (scores), 44, 40, ...
    assert scores == [0, 0, 0, 1, 1, 1, 1, 1]
    assert rewards[3] == 1.0 and rewards[2] == pytest.approx(0.1)


def test_pipe_respawns_at_spawn_x_with_the_levels_next_gap(features_env):
    _, params = features_env
    state = _state(params, bird_y=200.0).replace(
        pipe_x=jnp.array([-49.0, 95.0, 239.0]), next_pipe=jnp.int32(7)
    )
    _, new, _, _, _ = _step(features_env, state, 0)
    # -49 - 4 = -53 < -52: the leftmost pipe leaves, pipe 7 of the level enters.
    np.testing.assert_allclose(new.pipe_x, [91.0, 235.0, 397.6], atol=1e-4)
    assert float(new.pipe_gap_top[2]) == float(
        gap_top(state.level, jnp.int32(7), params)
    )
    assert int(new.next_pipe) == 8


def test_pipe_collision_uses_truncated_boxes(features_env):
    _, params = features_env
    gaps = jnp.array([150.0, 150.0, 150.0])
    # Upper pipe bottom at y = 150: the bird's box [y, y + 24) overlaps when
    # int(y) < 150 and the pipe's columns overlap the bird's [57, 91).
    for y, crash in [(149.0, True), (151.0, False), (226.0, False), (227.0, True)]:
        state = _state(params, bird_y=y - 1.0, bird_vel=0.0).replace(
            pipe_x=jnp.array([70.0, 214.0, 358.0]) + 4.0, pipe_gap_top=gaps
        )
        _, new, _, terminated, _ = _step(features_env, state, 0)
        assert float(new.bird_y) == y
        assert bool(terminated) == crash, y


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.slow
def test_jit_vmap_shapes_dtypes_and_spaces(env_id):
    env, params = rl_pg.make(env_id)
    keys = jax.random.split(KEY, 8)
    obs, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, params)
    space = env.observation_space(params)
    assert obs.shape == (8, *space.shape) and obs.dtype == space.dtype
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    actions = jnp.array([0, 1] * 4)
    obs, state, reward, terminated, truncated, info = step(keys, state, actions, params)
    assert obs.shape == (8, *space.shape) and obs.dtype == space.dtype
    assert reward.dtype == jnp.float32 and reward.shape == (8,)
    assert terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_
    assert info["score"].shape == (8,)
    for o in obs:
        assert space.contains(o)
    assert env.action_space(params).n == 2


def test_features_stay_in_the_declared_box():
    env, params = rl_pg.make("FlappyBird-v0")
    space = env.observation_space(params)

    @jax.jit
    def run(key):
        def body(carry, key):
            obs, state = carry
            key_act, key_step = jax.random.split(key)
            action = jax.random.bernoulli(key_act, 0.1).astype(jnp.int32)
            obs, state, *_ = env.step(key_step, state, action, params)
            return (obs, state), obs

        carry = env.reset(key, params)
        return jax.lax.scan(body, carry, jax.random.split(key, 3000))[1]

    obs = run(KEY)
    assert bool(jnp.all((obs >= space.low) & (obs <= space.high)))


def _stacked_features(state, params):
    """The observation as first written (stack and concatenate): the oracle."""
    w, h = params.screen_width, params.screen_height
    hidden = state.pipe_x > w
    x = jnp.where(hidden, w, state.pipe_x) / w
    top = jnp.where(hidden, 0.0, state.pipe_gap_top) / h
    bottom = jnp.where(hidden, h, state.pipe_gap_top + params.pipe_gap) / h
    bird = [state.bird_y / h, state.bird_vel / params.max_fall_vel, state.bird_rot / 90]
    return jnp.concatenate(
        [jnp.stack([x, top, bottom], -1).reshape(-1), jnp.stack(bird)]
    )


@pytest.mark.slow
def test_features_hand_computed_and_bit_equal_to_the_stacked_form():
    _, params = rl_pg.make("FlappyBird-v0")
    state = _state(params, bird_y=256.0, bird_vel=-5.0, bird_rot=-45.0).replace(
        pipe_x=jnp.array([-20.0, 124.0, 300.0]),
        pipe_gap_top=jnp.array([100.0, 150.0, 170.0]),
    )
    # pipes (x / 288, top / 512, (top + 100) / 512); the third is right of the
    # screen (300 > 288), so (1, 0, 1); bird 256 / 512, -5 / 10, -45 / 90
    expected = [-20 / 288, 100 / 512, 200 / 512, 124 / 288, 150 / 512, 250 / 512]
    expected += [1.0, 0.0, 1.0, 0.5, -0.5, -0.5]
    obs = features(state, params)
    assert obs.shape == (12,) and obs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(obs), expected, rtol=1e-6)
    # batched and jitted, as step computes it, on random states (some pipes
    # hidden, some left of the screen): bit-equal to the stacked form
    keys = jax.random.split(KEY, 4)
    states = state.replace(
        bird_y=jax.random.uniform(keys[0], (256,), minval=-100.0, maxval=420.0),
        bird_vel=jax.random.uniform(keys[1], (256,), minval=-9.0, maxval=10.0),
        bird_rot=jax.random.uniform(keys[2], (256,), minval=-93.0, maxval=45.0),
        pipe_x=jax.random.uniform(keys[3], (256, 3), minval=-60.0, maxval=600.0),
        pipe_gap_top=jnp.tile(jnp.array([100.0, 130.0, 170.0]), (256, 1)),
    )
    axes = jax.tree.map(lambda x: 0 if x.ndim and x.shape[0] == 256 else None, states)
    batched = jax.jit(jax.vmap(features, (axes, None)))(states, params)
    oracle = jax.jit(jax.vmap(_stacked_features, (axes, None)))(states, params)
    assert bool(jnp.any(states.pipe_x > 288)) and bool(jnp.any(states.pipe_x < 0))
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(oracle))


def test_levels_are_a_function_of_the_reset_key_only():
    env, params = rl_pg.make("FlappyBird-v0")
    actions = jax.random.bernoulli(KEY, 0.08, (400,)).astype(jnp.int32)

    @jax.jit
    def run(reset_key, step_key):
        obs, state = env.reset(reset_key, params)

        def body(state, inp):
            key, action = inp
            obs, state, reward, *_ = env.step_env(key, state, action, params)
            return state, (obs, reward, state.pipe_gap_top)

        keys = jax.random.split(step_key, actions.shape[0])
        return jax.lax.scan(body, state, (keys, actions))[1]

    a = run(jax.random.PRNGKey(1), jax.random.PRNGKey(2))
    b = run(jax.random.PRNGKey(1), jax.random.PRNGKey(99))  # other step keys
    c = run(jax.random.PRNGKey(3), jax.random.PRNGKey(2))  # another level
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])
    # typed keys select the same level as raw keys with the same data
    typed = jax.random.wrap_key_data(jax.random.PRNGKey(1))
    assert int(level_seed(typed)) == int(level_seed(jax.random.PRNGKey(1)))


def test_gap_distributions():
    _, params = rl_pg.make("FlappyBird-v0")
    level = level_seed(KEY)
    gaps = np.asarray(gap_top(level, jnp.arange(20_000), params))
    assert set(np.unique(gaps)) == set(range(100, 171, 10))
    counts = np.bincount(((gaps - 100) / 10).astype(int))
    assert counts.min() > 0.9 * 2500 and counts.max() < 1.1 * 2500
    cont = np.asarray(
        gap_top(level, jnp.arange(20_000), params.replace(continuous_gaps=True))
    )
    assert cont.min() == 80 and cont.max() == 221
    assert len(np.unique(cont)) == 142


def test_truncation_at_max_steps_and_auto_reset():
    env, params = rl_pg.make("FlappyBird-v0", max_steps_in_episode=5)
    obs0, state = env.reset(KEY, params)
    step = jax.jit(env.step)
    for _ in range(5):
        # flap only when falling: the bird stays alive
        action = int(state.bird_vel > 0)
        obs, state, reward, terminated, truncated, info = step(
            KEY, state, action, params
        )
    assert bool(truncated) and not bool(terminated)
    assert int(state.time) == 0  # auto-reset
    assert info["final_observation"].shape == obs.shape


def test_invalid_actions_do_not_flap_and_are_flagged(features_env):
    env, params = features_env
    _, state = env.reset(KEY, params)
    _, ref, _, _, info0 = jax.jit(env.step_env)(KEY, state, 0, params)
    assert not bool(info0["invalid_action"])
    for bad in (2, -1, 7):
        _, new, _, _, info = jax.jit(env.step_env)(KEY, state, bad, params)
        assert bool(info["invalid_action"])
        for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(x, y)


def test_bad_ids_and_params_raise_before_compiling():
    with pytest.raises(ValueError, match="Unknown env id"):
        rl_pg.make("FlappyBird-v9")
    with pytest.raises(ValueError, match="Unknown keyword"):
        rl_pg.make("FlappyBird-v0", gravty=2.0)
    with pytest.raises(ValueError, match="pipe_gap must be > 0"):
        rl_pg.make("FlappyBird-v0", pipe_gap=-10.0)
    with pytest.raises(ValueError, match="max_steps_in_episode"):
        rl_pg.make("FlappyBird-v0", max_steps_in_episode=0)
    with pytest.raises(ValueError, match="min_rot must be < 0"):
        rl_pg.make("FlappyBird-v0", min_rot=0.0)
    with pytest.raises(ValueError, match="obs_mode"):
        rl_pg.FlappyBird("rgb")
    with pytest.raises(ValueError, match="pixel_shape"):
        rl_pg.make("FlappyBird-pixels-v0", pixel_shape=(84,))
    with pytest.raises(ValueError, match="not in registered"):
        gymnax.make("FlappyBird-v9")


@pytest.mark.slow
def test_gymnax_make_and_wrappers():
    env, params = gymnax.make("FlappyBird-pixels-v0")
    assert env.name == "FlappyBird-pixels-v0"
    wrapped = LogWrapper(FlattenObservationWrapper(env))
    obs, state = wrapped.reset(KEY, params)
    assert obs.shape == (84 * 84,)
    out = jax.jit(wrapped.step)(KEY, state, 1, params)
    assert out[0].shape == (84 * 84,)
    assert "returned_episode_returns" in out[-1]


@pytest.mark.slow
def test_gymnasium_adapter_passes_env_checker():
    from gymnasium.utils.env_checker import check_env

    from rl_pg.envs.gymnasium_adapter import GymnasiumFlappyBird

    for env_id in ENV_IDS:
        env, params = rl_pg.make(env_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no spec" notice only
            check_env(GymnasiumFlappyBird(env, params, render_mode="rgb_array"))


@pytest.mark.slow
def test_renderer_shapes_and_pixel_observation(tmp_path):
    env, params = rl_pg.make("FlappyBird-pixels-v0")
    keys = jax.random.split(KEY, 4)
    obs, states = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    frames = jax.jit(jax.vmap(render_rgb, in_axes=(0, None)))(states, params)
    assert frames.shape == (4, 512, 288, 3) and frames.dtype == jnp.uint8
    np.testing.assert_array_equal(
        obs[..., 0], jax.vmap(render_gray, (0, None))(states, params)
    )
    # the bird is drawn where the state says
    frame = np.asarray(frames[0])
    bird_pixel = frame[int(states.bird_y[0]) + 12, 57 + 17]
    assert tuple(bird_pixel) == (250, 200, 40)
    path = tmp_path / "a.gif"
    write_gif(frames, path)
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError):
        write_gif(frames[..., 0], path)


def test_state_is_a_pytree_of_arrays():
    env, params = rl_pg.make("FlappyBird-v0")
    _, state = env.reset(KEY, params)
    assert isinstance(state, EnvState)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def _rollout_both_steps(env, params, params_axis, num_envs=32, num_steps=80):
    """Outputs of FlappyBird.step and of gymnax's generic Environment.step."""
    from gymnax.environments.environment import Environment

    keys = jax.random.split(KEY, num_envs)
    _, state = jax.vmap(env.reset, in_axes=(0, params_axis))(keys, params)
    axes = (0, 0, 0, params_axis)
    ours = jax.jit(jax.vmap(env.step, in_axes=axes))
    generic = jax.jit(
        jax.vmap(lambda k, s, a, p: Environment.step(env, k, s, a, p), in_axes=axes)
    )
    results = []
    for t in range(num_steps):
        key = jax.random.fold_in(KEY, t)
        actions = jax.random.bernoulli(key, 0.2, (num_envs,)).astype(jnp.int32)
        step_keys = jax.random.split(key, num_envs)
        out_ours = ours(step_keys, state, actions, params)
        out_generic = generic(step_keys, state, actions, params)
        results.append((out_ours, out_generic))
        state = out_ours[1]
    return results


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("first_pipe_x", [288.0, 100.0])
@pytest.mark.slow
def test_step_matches_gymnax_generic_step(env_id, first_pipe_x):
    # FlappyBird.step computes the reset observation once per batch when fresh
    # pipes are out of sight (default), per env otherwise (first_pipe_x=100);
    # either way every output equals gymnax's generic step, resets included.
    env, params = rl_pg.make(env_id, first_pipe_x=first_pipe_x, max_steps_in_episode=30)
    resets = 0
    for out_ours, out_generic in _rollout_both_steps(env, params, None):
        for x, y in zip(
            jax.tree.leaves(out_ours), jax.tree.leaves(out_generic), strict=True
        ):
            np.testing.assert_array_equal(x, y)
        resets += int(jnp.sum(out_ours[3] | out_ours[4]))
    assert resets > 10


@pytest.mark.slow
def test_step_matches_gymnax_generic_step_with_per_env_params():
    # vmapped params turn the shared-reset conds into selects: still equal.
    env, params = rl_pg.make("FlappyBird-pixels-v0", max_steps_in_episode=30)
    num_envs = 16
    params = jax.tree.map(lambda x: jnp.full((num_envs,), x), params)
    params = params.replace(first_pipe_x=jnp.linspace(60.0, 300.0, num_envs))
    results = _rollout_both_steps(env, params, 0, num_envs=num_envs, num_steps=40)
    for out_ours, out_generic in results:
        for x, y in zip(
            jax.tree.leaves(out_ours), jax.tree.leaves(out_generic), strict=True
        ):
            np.testing.assert_array_equal(x, y)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("layout", ["flat", "nested", "per_env_params"])
@pytest.mark.slow
def test_auto_reset_of_few_many_or_no_ended_envs_equals_generic_step(layout):
    # Under vmap, step hashes fresh levels for the ended envs only (gathered
    # into a smaller batch when at most 1/8 ended): every step with none, few
    # and many ended envs must equal gymnax's generic step. "nested" vmaps a
    # batch of batches (seeds x envs), "per_env_params" takes the path that
    # hashes every env.
    from gymnax.environments.environment import Environment

    env, params = rl_pg.make("FlappyBird-v0", max_steps_in_episode=150)
    shape = {"flat": (256,), "nested": (4, 64), "per_env_params": (128,)}[layout]
    num_envs = int(np.prod(shape))
    params_axis = None
    if layout == "per_env_params":
        params = jax.tree.map(lambda x: jnp.full((num_envs,), x), params)
        params = params.replace(gravity=jnp.linspace(0.8, 1.2, num_envs))
        params_axis = 0

    def batched(step):
        step = jax.vmap(step, in_axes=(0, 0, 0, params_axis))
        if layout == "nested":  # envs: (4, 64) keys, states and actions
            step = jax.vmap(step, in_axes=(0, 0, 0, None))
        return jax.jit(step)

    ours = batched(env.step)
    generic = batched(lambda k, s, a, p: Environment.step(env, k, s, a, p))
    keys = jax.random.split(KEY, num_envs)
    _, state = jax.vmap(env.reset, in_axes=(0, params_axis))(keys, params)
    flap_prob = jnp.linspace(0.02, 0.5, num_envs)  # spreads the crashes
    reshape = partial(jax.tree.map, lambda x: x.reshape(*shape, *x.shape[1:]))
    state = reshape(state)
    ended = []
    for t in range(200):
        key = jax.random.fold_in(KEY, t)
        actions = jax.random.bernoulli(key, flap_prob).astype(jnp.int32)
        step_keys = jax.random.split(key, num_envs)
        step_keys, actions = reshape((step_keys, actions))
        args = (step_keys, state, actions)
        out_ours = ours(*args, params)
        _assert_trees_equal(out_ours, generic(*args, params))
        ended.append(int(jnp.sum(out_ours[3] | out_ours[4])))
        state = out_ours[1]
    ended = np.array(ended)
    # all three cases happened: no env ended, up to 1/8 of them, more
    assert (ended == 0).any() and (ended > num_envs // 8).any()
    assert ((ended > 0) & (ended <= num_envs // 8)).sum() > 20


@pytest.mark.slow
def test_vmapped_step_is_differentiable_in_params():
    # the auto-reset's batch rule (custom_vmap) sits outside autodiff
    env, params = rl_pg.make("FlappyBird-v0")
    keys = jax.random.split(KEY, 128)
    _, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)

    def total_reward(flap_vel):
        p = params.replace(flap_vel=flap_vel)
        out = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            keys, state, jnp.ones(128, jnp.int32), p
        )
        return out[2].sum()

    assert np.isfinite(jax.grad(total_reward)(-9.0))


@pytest.mark.slow
def test_lidar_ray_directions():
    from rl_pg.envs.lidar import ray_cos_sin

    # Integer angles come from a table of float64 values rounded to float32
    # (a few moved by one float32 step, to round sums like the reference).
    for rot, num_rays in ((20.0, 180), (-3.0, 180), (-90.0, 90)):
        cos, sin = ray_cos_sin(jnp.float32(rot), num_rays)
        angles = np.radians(np.arange(num_rays) * 180 / num_rays - 90 - rot)
        np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=1e-7)
        np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=1e-7)
    # Other angles: the angle addition formula.
    for rot, num_rays in ((12.5, 180), (7.0, 7), (-33.3, 100)):
        cos, sin = ray_cos_sin(jnp.float32(rot), num_rays)
        angles = np.radians(np.arange(num_rays) * 180 / num_rays - 90 - rot)
        np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=1e-6)
        np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=1e-6)


# EnvParams is the one home of the game's constants: changing one changes every
# place that depends on it.

_PERTURBED = {  # a changed value for each field (one that shows in a rollout)
    "max_steps_in_episode": 40,
    "base_width": 120.0,  # the ground box then ends before the rays' reach
    "ground_y": 380.0,
    "bird_start_y": 200.0,
    "bird_start_vel": -5.0,
    "bird_start_rot": 10.0,
    "flap_ceiling": 150.0,
    "min_rot": -60.0,
    "continuous_gaps": True,
    "first_pipe_x": 200.0,
    "spawn_x": 350.0,
    "gap_top_base": 60,
    "gap_offset_min": 0,
    "gap_offset_step": 12,
    "gap_offset_count": 5,
    "continuous_gap_count": 50,
    "private_zone": 60.0,
    "lidar_rot_threshold": 0.0,
}


@functools.cache
def _rollout(env_id, static=(), num_steps=200, num_envs=6):
    """A jitted ``params -> outputs`` of ``num_steps`` auto-resetting steps:
    half the birds follow the scripted controller (they pass pipes, which
    respawn), half flap at random with mixed rates (some fly low, some high)."""
    env, _ = rl_pg.make(env_id, **dict(static))
    keys = jax.random.split(KEY, num_envs)
    flap_prob = jnp.linspace(0.04, 0.3, num_envs)

    @jax.jit
    def run(params):
        _, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)

        def body(state, t):
            key = jax.random.fold_in(KEY, t)
            actions = jax.random.bernoulli(key, flap_prob).astype(jnp.int32)
            scripted = jax.vmap(scripted_action, in_axes=(0, None))(state, params)
            actions = jnp.where(jnp.arange(num_envs) % 2 == 0, scripted, actions)
            out = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(key, num_envs), state, actions, params
            )
            return out[1], out

        return jax.lax.scan(body, state, jnp.arange(num_steps))[1]

    return run


def _rollout_outputs(env_id, static=(), **overrides):
    _, params = rl_pg.make(env_id, **dict(static), **overrides)
    return _rollout(env_id, static)(params)


def _differs(a, b):
    return any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.slow
def test_every_env_param_changes_the_game():
    # No constant is dead (rot_vel was) or shadowed by a copied default: each
    # EnvParams field, changed, changes some output of a rollout in some mode.
    import dataclasses

    modes = {
        "FlappyBird-v0": (),
        "FlappyBird-lidar-v0": (),
        "FlappyBird-pixels-v0": (("pixel_shape", (24, 24)),),
    }
    base = {m: _rollout_outputs(m, static) for m, static in modes.items()}
    continuous = {"continuous_gaps": True}
    base_continuous = _rollout_outputs("FlappyBird-v0", **continuous)
    dead = []
    # base_height: the ground box's height, kept for pygame's ground Rect; rays
    # point forward from above the ground, so none can reach the box's bottom
    # (only its top edge, at ground_y), in the reference as here.
    unreachable = {"base_height"}
    for field in dataclasses.fields(rl_pg.EnvParams):
        if field.name in unreachable:
            continue
        default = field.default
        value = _PERTURBED.get(field.name, default * 1.25 + 1.0)
        changed = any(
            _differs(out, _rollout_outputs(m, modes[m], **{field.name: value}))
            for m, out in base.items()
        )
        if field.name == "continuous_gap_count":  # read in continuous mode only
            changed = _differs(
                base_continuous,
                _rollout_outputs(
                    "FlappyBird-v0", **continuous, continuous_gap_count=50
                ),
            )
        if not changed:
            dead.append(field.name)
    assert not dead, f"EnvParams fields that change nothing: {dead}"


def _drive(env_params, state, steps, hold_y=200.0):
    """``steps`` no-flap ``step_env`` calls, holding the bird at ``hold_y``
    (so it never crashes); the outputs, stacked."""
    env, params = env_params

    def body(state, _):
        state = state.replace(bird_y=jnp.float32(hold_y), bird_vel=jnp.float32(0.0))
        out = env.step_env(KEY, state, 0, params)
        return out[1], out

    return jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps)[1])(state)


@pytest.mark.parametrize("pipe_speed", [2.0, 3.0, 4.0, 5.0, 7.0])
def test_score_window_follows_pipe_speed(pipe_speed):
    # Each pipe counts exactly once at any speed: the window is one step's
    # scroll wide (the reference writes its speed, 4, as a literal).
    env_params = rl_pg.make("FlappyBird-v0", pipe_speed=pipe_speed)
    params = env_params[1]
    gaps = jnp.array([150.0, 150.0, 150.0])
    state = _state(params).replace(
        pipe_x=jnp.array([120.0, 264.0, 408.0]), pipe_gap_top=gaps
    )
    _, _, reward, terminated, info = _drive(env_params, state, int(300 / pipe_speed))
    # centres cross the bird's (74) at pipe_x = 48 and 192 (from 120 and 264)
    assert not terminated.any()
    assert int(jnp.sum(reward == 1.0)) == 2 and int(info["score"][-1]) == 2


def test_rotation_and_features_follow_their_constants():
    env_params = rl_pg.make("FlappyBird-v0", rot_vel=4.0, min_rot=-60.0)
    params = env_params[1]
    state = _state(params, bird_rot=45.0, bird_vel=0.0)
    rots = np.asarray(_drive(env_params, state, 40)[1].bird_rot).tolist()
    # 4 degrees a step while above -60, so 45, 41, ..., -59, then -63 (the
    # reference's "if rot > min: rot -= vel")
    assert rots[:3] == [41.0, 37.0, 33.0] and rots[-1] == -63.0
    obs, new, *_ = _step(env_params, state.replace(bird_rot=jnp.float32(-30.0)), 0)
    assert float(obs[-1]) == pytest.approx(float(new.bird_rot) / 60.0)
    env_params = rl_pg.make("FlappyBird-v0", max_fall_vel=20.0)
    state = _state(env_params[1], bird_vel=15.0)
    obs, new, *_ = _step(env_params, state, 0)
    assert float(new.bird_vel) == 16.0  # gravity keeps adding below the cap
    assert float(obs[-2]) == pytest.approx(16.0 / 20.0)
