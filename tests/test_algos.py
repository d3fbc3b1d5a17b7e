"""Tests for rl_pg.algos (PPO, A2C, REINFORCE, GRPO) and their shared loop."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rl_pg import estimators, returns
from rl_pg.algos import a2c, grpo, loop, ppo, reinforce
from rl_pg.trajectory import Trajectory

# ------------------------------------------------------------------------- configs


def test_defaults_are_valid_and_ppo_matches_reference_settings():
    config = ppo.PPOConfig()
    # REFERENCE.md s.10: the settings measured to reach 10,000 pipes.
    assert (config.num_envs, config.num_steps) == (64, 128)
    assert (config.update_epochs, config.num_minibatches) == (4, 4)
    assert (config.gamma, config.lam, config.clip_eps) == (0.99, 0.95, 0.2)
    assert (config.ent_coef, config.lr, config.reward_scale) == (0.01, 1e-3, 0.1)
    assert (config.adam_eps, config.max_grad_norm) == (1e-5, 0.5)
    assert config.hidden == (64, 64) and config.activation == "tanh"
    assert config.steps_per_update == 8192
    assert config.gradient_steps_per_update == 16
    for cls in (a2c.A2CConfig, reinforce.ReinforceConfig, grpo.GRPOConfig):
        assert cls().num_updates >= 1


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ppo.PPOConfig, dict(num_envs=0), "num_envs must be an int >= 1"),
        (
            ppo.PPOConfig,
            dict(num_envs=3, num_steps=5, num_minibatches=2),
            "must divide steps_per_update",
        ),
        (ppo.PPOConfig, dict(lr=-1.0), "lr must be a number in (0.0, 1.0]"),
        (ppo.PPOConfig, dict(gamma=1.5), "gamma must be a number in [0.0, 1.0]"),
        (ppo.PPOConfig, dict(clip_eps=0.0), "clip_eps"),
        (ppo.PPOConfig, dict(anneal_lr="yes"), "anneal_lr must be a bool"),
        (ppo.PPOConfig, dict(hidden=(64, 0)), "hidden must be"),
        (ppo.PPOConfig, dict(activation="sigmoid"), "activation must be one of"),
        (ppo.PPOConfig, dict(env_id="Pendulum-v1"), "env_id must be one of"),
        (ppo.PPOConfig, dict(total_env_steps=100), "at least one batch"),
        (ppo.PPOConfig, dict(stop_at_score=0), "stop_at_score"),
        (a2c.A2CConfig, dict(num_steps=2.5), "num_steps must be an int"),
        (reinforce.ReinforceConfig, dict(estimator="nope"), "estimator must be one"),
        (
            reinforce.ReinforceConfig,
            dict(estimator="rloo", group_size=1),
            "int >= 2 (leave-one-out",
        ),
        (grpo.GRPOConfig, dict(group_size=1), "group_size must be an int >= 2"),
        (grpo.GRPOConfig, dict(num_levels=6, num_minibatches=4), "must divide"),
        (grpo.GRPOConfig, dict(beta=-0.1), "beta"),
    ],
)
def test_config_validation_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match="Invalid " + cls.__name__) as info:
        cls(**kwargs)
    assert message in str(info.value)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        ppo.PPOConfig(num_envs=0, lr=0.0, gamma=2.0)
    text = str(info.value)
    assert "num_envs" in text and "lr" in text and "gamma" in text


def test_configs_are_hashable_static_pytrees():
    config = ppo.PPOConfig(hidden=[32, 32])  # lists (from JSON) become tuples
    assert config.hidden == (32, 32)
    assert hash(config) == hash(ppo.PPOConfig(hidden=(32, 32)))
    assert jax.tree.leaves(config) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1


def test_reinforce_passes_only_what_the_estimator_takes():
    config = reinforce.ReinforceConfig(estimator="constant_baseline", baseline=3.0)
    assert config.estimator_kwargs() == {"b": 3.0}
    assert not config.uses_critic
    config = reinforce.ReinforceConfig(estimator="rloo", group_size=4)
    assert config.estimator_kwargs() == {"group_size": 4}
    config = reinforce.ReinforceConfig(estimator="value_baseline")
    assert config.uses_critic
    assert loop.policy_spec(config)["value"] == "separate"
    assert set(config.estimator_kwargs()) == {"vf_coef", "ent_coef"}
    assert grpo.GRPOConfig(dr_grpo=True).estimator == "dr_grpo"


# --------------------------------------------------------------------- SGD pieces


@pytest.mark.parametrize(
    ("num_columns", "num_minibatches", "block_size"), [(8, 4, 1), (12, 3, 2), (6, 1, 3)]
)
def test_minibatch_columns_partition_whole_groups(
    num_columns, num_minibatches, block_size
):
    columns = np.asarray(
        loop.minibatch_columns(
            jax.random.PRNGKey(3), num_columns, num_minibatches, block_size
        )
    )
    assert columns.shape == (num_minibatches, num_columns // num_minibatches)
    np.testing.assert_array_equal(np.sort(columns.ravel()), np.arange(num_columns))
    groups = columns.reshape(-1, block_size)
    # Each block is one whole group g: columns g * G, ..., g * G + G - 1 in order.
    np.testing.assert_array_equal(
        groups - groups[:, :1], np.broadcast_to(np.arange(block_size), groups.shape)
    )
    assert np.all(groups[:, 0] % block_size == 0)
    with pytest.raises(ValueError, match="equal minibatches"):
        loop.minibatch_columns(jax.random.PRNGKey(0), 10, 3, 1)


def _toy_batch(num_steps=3, num_columns=4):
    shape = (num_steps, num_columns)
    return Trajectory(
        observations=jnp.arange(num_steps * num_columns * 2, dtype=jnp.float32).reshape(
            *shape, 2
        )
        / 10,
        actions=jnp.zeros(shape, jnp.int32),
        rewards=jnp.ones(shape),
        log_probs=jnp.zeros(shape),
        values=jnp.zeros(shape),
        next_values=jnp.zeros(shape),
        terminated=jnp.zeros(shape, bool),
        truncated=jnp.zeros(shape, bool),
        mask=jnp.ones(shape),
        level=jnp.zeros(shape, jnp.int32),
        score=jnp.zeros(shape, jnp.int32),
    )


@pytest.mark.slow
def test_one_epoch_one_minibatch_is_one_optimizer_step():
    # With M = 1 the shuffle only permutes columns, which a mean over columns
    # ignores: the result is one plain optax step on the whole batch.
    params = {"w": jnp.array([0.3, -0.2])}

    def loss_fn(p, batch):
        loss = jnp.mean((batch.observations @ p["w"] - batch.rewards) ** 2)
        aux = estimators.LossAux(*([jnp.zeros(())] * len(estimators.LossAux._fields)))
        return loss, aux

    optimizer = optax.sgd(0.1)
    batch = _toy_batch()
    new, _, stats = loop.sgd_on_batch(
        loss_fn,
        optimizer,
        params,
        optimizer.init(params),
        batch,
        jax.random.PRNGKey(0),
        num_epochs=1,
        num_minibatches=1,
    )
    grads = jax.grad(lambda p: loss_fn(p, batch)[0])(params)
    np.testing.assert_allclose(new["w"], params["w"] - 0.1 * grads["w"], rtol=1e-5)
    np.testing.assert_allclose(stats.loss, loss_fn(params, batch)[0], rtol=1e-5)
    np.testing.assert_allclose(stats.grad_norm, optax.tree.norm(grads), rtol=1e-5)


@pytest.mark.slow
def test_make_loss_scales_sum_estimators_to_a_per_step_mean():
    apply_fn = lambda p, obs: (obs @ p, jnp.zeros(obs.shape[:-1]))  # noqa: E731
    params = jnp.array([[0.1, -0.1], [0.2, 0.0]])
    batch = _toy_batch(num_steps=5)
    raw, _ = estimators.reinforce(params, batch, apply_fn=apply_fn)
    scaled, _ = loop.make_loss("reinforce", apply_fn, 5)(params, batch)
    np.testing.assert_allclose(scaled, raw / 5, rtol=1e-6)
    raw, _ = estimators.grpo(params, batch, apply_fn=apply_fn, group_size=2)
    same, _ = loop.make_loss("grpo", apply_fn, 5, group_size=2)(params, batch)
    np.testing.assert_allclose(same, raw, rtol=1e-6)


# ------------------------------------------------------------ one update per algo

_TINY = dict(hidden=(8,), eval_every_steps=1)


# The streaming loop (PPO's) is exercised end to end in tests/test_train.py; here
# the episodic loop runs once with a plain estimator and once with GRPO's epochs,
# minibatches and KL reference. Horizons exceed the 60 steps before the first pipe,
# so returns differ within a group.
@pytest.mark.parametrize(
    ("module", "config"),
    [
        (
            reinforce,
            reinforce.ReinforceConfig(
                estimator="rloo",
                num_levels=2,
                group_size=2,
                horizon=80,
                total_env_steps=640,
                **_TINY,
            ),
        ),
        (
            grpo,
            grpo.GRPOConfig(
                num_levels=2,
                group_size=2,
                horizon=80,
                num_minibatches=2,
                beta=0.1,
                total_env_steps=640,
                **_TINY,
            ),
        ),
    ],
    ids=["reinforce", "grpo"],
)
@pytest.mark.slow
def test_episodic_train_runs_and_counts_steps(module, config):
    config = dataclasses.replace(config, eval_every_steps=320)

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def updates(config, key, n):  # n updates, unreduced
        state = module.init(config, key)
        return jax.lax.scan(lambda s, _: module.update(config, s), state, None, n)

    # one program: the first updates of a scan of 16 (the pure train below
    # takes fewer, ~7: checked)
    state, every = updates(config, jax.random.PRNGKey(0), 16)
    metrics = jax.tree.map(lambda x: x[:2], every)
    assert metrics.loss.shape == (2,)
    assert np.all(np.isfinite(np.asarray(metrics.loss)))
    assert np.all(np.asarray(metrics.grad_norm) > 0)
    # only live steps count: the padding after a crash is not an env step
    live = np.asarray(metrics.live_steps)
    np.testing.assert_array_equal(metrics.env_steps, np.cumsum(live))
    np.testing.assert_array_equal(metrics.episodes, [4, 4])  # one per column
    assert np.all(live <= config.steps_per_update)
    assert np.any(live < config.steps_per_update)  # random birds crash early
    assert int(state.update) == 16 and state.stream is None
    # The pure train counts the budget (640) and the evaluations (every 320) in
    # live steps: it updates until each multiple of 320 is passed, so it takes
    # more updates than the 640 / 320 = 2 batches of slots would.
    run, out = jax.jit(module.train, static_argnums=0)(config, jax.random.PRNGKey(0))
    n = int(run.train.update)
    assert n <= 16
    steps = np.asarray(every.env_steps)[:n]
    assert n > config.num_updates == 2 and steps[-1] >= 640 > steps[-2]
    ends = [int(np.argmax(steps >= t)) for t in (320, 640)]  # first update past
    np.testing.assert_array_equal(out.env_steps, steps[ends])
    np.testing.assert_array_equal(out.metrics["update"], np.add(ends, 1))
    np.testing.assert_array_equal(
        out.metrics["train_episodes"], np.diff([-1, *ends]) * 4
    )
    first = every.loss[: ends[0] + 1]
    np.testing.assert_allclose(out.metrics["loss"][0], np.mean(first), rtol=1e-5)
    assert (state.ref_params is not None) == (module is grpo)
    if module is grpo:  # the reference stays at the initial params, params move
        diff = jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, state.ref_params
        )
        assert max(jax.tree.leaves(diff)) > 0
        assert np.all(np.asarray(metrics.kl) >= 0)


# ------------------------------------------------------- PPO as the references do it


def _random_batch(key, num_steps=6, num_columns=4):
    ks = jax.random.split(key, 6)
    shape = (num_steps, num_columns)
    return _toy_batch(num_steps, num_columns)._replace(
        observations=jax.random.normal(ks[0], (*shape, 2)),
        actions=jax.random.bernoulli(ks[1], 0.5, shape).astype(jnp.int32),
        rewards=jax.random.normal(ks[2], shape),
        log_probs=jnp.log(jnp.full(shape, 0.5)),
        values=jax.random.normal(ks[3], shape),
        next_values=jax.random.normal(ks[4], shape),
        terminated=jax.random.bernoulli(ks[5], 0.2, shape),
        truncated=jnp.zeros(shape, bool).at[2, 1].set(True),
    )


@pytest.mark.slow
def test_gae_transitions_flatten_one_gae_over_the_batch():
    batch = _random_batch(jax.random.PRNGKey(0))
    flat = loop.gae_transitions(batch, gamma=0.9, lam=0.8)
    want = returns.batch_gae(
        batch.rewards,
        batch.values,
        batch.next_values,
        batch.terminated,
        batch.truncated,
        0.9,
        0.8,
    )
    assert flat.advantages.shape == (1, 24)
    np.testing.assert_allclose(flat.advantages[0], np.asarray(want).ravel(), rtol=1e-6)
    assert flat.batch.observations.shape == (1, 24, 2)
    np.testing.assert_array_equal(
        flat.batch.observations[0, 5], batch.observations[1, 1]
    )  # time-major: transition t * B + b
    # shuffling [1, N] columns mixes time steps and envs in each minibatch
    columns = np.asarray(loop.minibatch_columns(jax.random.PRNGKey(1), 24, 4))
    assert len(set((columns[0] // 4).tolist())) > 1
    assert len(set((columns[0] % 4).tolist())) > 1


@pytest.mark.slow
def test_ppo_clip_with_precomputed_advantages_and_value_clipping():
    def apply_fn(p, obs):
        return obs @ p["pi"], obs @ p["v"]

    params = {"pi": jnp.array([[0.3, -0.2], [0.1, 0.4]]), "v": jnp.array([1.0, -2.0])}
    batch = _random_batch(jax.random.PRNGKey(2))
    kw = dict(apply_fn=apply_fn, gamma=0.9, lam=0.8)
    plain, aux = estimators.ppo_clip(params, batch, **kw)
    adv = loop.gae_transitions(batch, 0.9, 0.8).advantages.reshape(6, 4)
    given, aux_given = estimators.ppo_clip(
        params, batch, advantages=adv, **kw | dict(gamma=0.0, lam=0.0)
    )
    np.testing.assert_allclose(given, plain, rtol=1e-6)
    np.testing.assert_allclose(aux_given.value_loss, aux.value_loss, rtol=1e-6)
    # value clipping: 0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2), mean/step
    _, clipped = estimators.ppo_clip(params, batch, clip_value_loss=True, **kw)
    v = np.asarray(batch.observations @ params["v"])
    old = np.asarray(batch.values)
    target = np.asarray(adv) + old
    v_clip = old + np.clip(v - old, -0.2, 0.2)
    want = 0.5 * np.maximum((v - target) ** 2, (v_clip - target) ** 2).sum() / 4
    np.testing.assert_allclose(clipped.value_loss, want, rtol=1e-5)
    assert float(clipped.value_loss) > float(aux.value_loss)
    with pytest.raises(ValueError, match="clip_value_loss"):
        estimators.get_estimator("ppo_clip", apply_fn=apply_fn, clip_value_loss=1)
