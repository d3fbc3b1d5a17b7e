"""Tests for rl_pg.policies: shapes, initialisation, distributions, transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_pg import policies


def _leaves(params):
    return jax.tree_util.tree_leaves_with_path(params)


@pytest.mark.parametrize("value", ["separate", "shared", None])
@pytest.mark.slow
def test_mlp_shapes_on_any_leading_dims(value):
    policy = policies.mlp_policy(3, hidden=(16, 16), value=value)
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros(5))
    obs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 5)), jnp.float32)
    logits, v = policy.apply(params, obs)
    assert logits.shape == (4, 6, 3) and v.shape == (4, 6)
    assert policy.has_value == (value is not None)
    assert policy.num_actions == 3
    # Leading dims are pure batch dims: [T, B, D] equals the flattened [T * B, D].
    flat_logits, flat_v = policy.apply(params, obs.reshape(24, 5))
    np.testing.assert_allclose(logits.reshape(24, 3), flat_logits, atol=1e-6)
    np.testing.assert_allclose(v.reshape(24), flat_v, atol=1e-6)
    single_logits, single_v = policy.apply(params, obs[0, 0])
    np.testing.assert_allclose(single_logits, logits[0, 0], atol=1e-6)
    assert single_v.shape == ()
    if value is None:
        np.testing.assert_array_equal(v, 0.0)
    else:
        assert np.any(np.asarray(v) != 0.0)


@pytest.mark.parametrize("value", ["separate", "shared", None])
@pytest.mark.slow
def test_mlp_and_cnn_take_empty_batches(value):
    """Zero rows keep their shape through the layers' one-batch-axis reshapes."""
    mlp = policies.mlp_policy(3, hidden=(8,), value=value)
    params = mlp.init(jax.random.PRNGKey(0), jnp.zeros(5))
    for shape in [(0, 5), (2, 0, 5), (0, 4, 5)]:
        logits, v = mlp.apply(params, jnp.zeros(shape))
        assert logits.shape == (*shape[:-1], 3) and v.shape == shape[:-1]
    cnn = policies.cnn_policy(2, value=value)
    params = cnn.init(jax.random.PRNGKey(0), jnp.zeros((16, 16, 3), jnp.uint8))
    logits, v = cnn.apply(params, jnp.zeros((0, 2, 16, 16, 3), jnp.uint8))
    assert logits.shape == (0, 2, 2) and v.shape == (0, 2)


@pytest.mark.slow
def test_mlp_value_modes_differ_in_parameters():
    sizes = {}
    for value in ["separate", "shared", None]:
        policy = policies.mlp_policy(2, hidden=(8,), value=value)
        params = policy.init(jax.random.PRNGKey(0), jnp.zeros(4))
        sizes[value] = sum(x.size for x in jax.tree.leaves(params))
    # None: 4*8+8 + 8*2+2 = 58; shared adds a head 8+1; separate a torso 40 and head 9.
    assert sizes == {None: 58, "shared": 67, "separate": 107}


def test_mlp_orthogonal_init_like_purejaxrl():
    policy = policies.mlp_policy(2, hidden=(64, 64), value="separate")
    params = policy.init(jax.random.PRNGKey(1), jnp.zeros(64))
    kernels = {
        jax.tree_util.keystr(path): np.asarray(x)
        for path, x in _leaves(params)
        if "kernel" in jax.tree_util.keystr(path)
    }
    biases = [x for path, x in _leaves(params) if "bias" in jax.tree_util.keystr(path)]
    assert all(np.all(np.asarray(b) == 0) for b in biases)
    hidden = [k for k in kernels.values() if k.shape == (64, 64)]
    heads = {k.shape[1]: k for k in kernels.values() if k.shape[1] in (1, 2)}
    # A square orthogonal kernel with gain g satisfies W^T W = g^2 I.
    for w in hidden:
        np.testing.assert_allclose(w.T @ w, 2.0 * np.eye(64), atol=1e-4)
    # Columns of a tall orthogonal kernel are orthonormal times the gain.
    np.testing.assert_allclose(
        heads[2].T @ heads[2], 0.01**2 * np.eye(2), atol=1e-7
    )  # policy head
    np.testing.assert_allclose(heads[1].T @ heads[1], [[1.0]], atol=1e-5)  # value
    # Hence the initial policy is close to uniform.
    obs = jnp.asarray(np.random.default_rng(0).normal(size=(100, 64)), jnp.float32)
    logits, _ = policy.apply(params, obs)
    assert np.max(np.abs(logits)) < 0.2


@pytest.mark.parametrize("value", ["shared", "separate", None])
@pytest.mark.slow
def test_cnn_shapes_and_uint8_scaling(value):
    policy = policies.cnn_policy(2, channels=(4, 8), hidden=(16,), value=value)
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.integers(0, 256, size=(3, 2, 20, 12, 3)), jnp.uint8)
    params = policy.init(jax.random.PRNGKey(0), pixels[0, 0])
    logits, v = policy.apply(params, pixels)
    assert logits.shape == (3, 2, 2) and v.shape == (3, 2)
    as_float = pixels.astype(jnp.float32) / 255.0
    logits_f, v_f = policy.apply(params, as_float)
    np.testing.assert_allclose(logits, logits_f, atol=1e-6)
    np.testing.assert_allclose(v, v_f, atol=1e-6)
    single, _ = policy.apply(params, pixels[1, 1])
    np.testing.assert_allclose(single, logits[1, 1], atol=1e-5)
    assert policy.has_value == (value is not None)


def test_log_prob_and_sample():
    logits = jnp.array([[0.0, 1.0, -1.0], [2.0, 2.0, 2.0]])
    log_pi = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
    lp = policies.log_prob(logits, jnp.array([1, 2]))
    np.testing.assert_allclose(lp, [log_pi[0, 1], log_pi[1, 2]], rtol=1e-6)
    # Leading dims broadcast: log_prob of every action sums (in prob) to one.
    all_actions = jnp.broadcast_to(jnp.arange(3)[:, None], (3, 2))
    probs = jnp.exp(policies.log_prob(jnp.broadcast_to(logits, (3, 2, 3)), all_actions))
    np.testing.assert_allclose(probs.sum(0), [1.0, 1.0], rtol=1e-6)
    # An action outside [0, A) is nan, not a wrapped or clipped index.
    bad = policies.log_prob(jnp.broadcast_to(logits[0], (3, 3)), jnp.array([-1, 3, 2]))
    assert np.isnan(bad[:2]).all() and bad[2] == pytest.approx(log_pi[0, 2], rel=1e-6)

    n = 20000
    samples = policies.sample(
        jax.random.PRNGKey(0), jnp.broadcast_to(logits[0], (n, 3))
    )
    assert samples.dtype == jnp.int32 and samples.shape == (n,)
    p = np.exp(log_pi[0])
    freq = np.bincount(np.asarray(samples), minlength=3) / n
    # Within 5 binomial standard errors.
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n))
    again = policies.sample(jax.random.PRNGKey(0), jnp.broadcast_to(logits[0], (n, 3)))
    np.testing.assert_array_equal(samples, again)


def test_entropy():
    uniform = jnp.zeros((2, 4))
    np.testing.assert_allclose(policies.entropy(uniform), np.log(4.0) * np.ones(2))
    logits = jnp.array([0.3, -1.2, 2.0])
    p = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(policies.entropy(logits), -(p * np.log(p)).sum(), 1e-6)
    # Impossible actions (-inf logits) contribute 0, with finite gradients.
    masked = jnp.array([0.0, -jnp.inf, 0.0])
    np.testing.assert_allclose(policies.entropy(masked), np.log(2.0), rtol=1e-6)
    grad = jax.grad(lambda x: policies.entropy(x))(masked)
    assert np.all(np.isfinite(grad))


@pytest.mark.slow
def test_jit_vmap_grad_through_apply():
    policy = policies.mlp_policy(2, hidden=(8,), value="shared")
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros(3))
    obs = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    actions = jnp.array([0, 1, 1, 0, 1])

    def objective(p, o, a):
        logits, v = policy.apply(p, o)
        return policies.log_prob(logits, a) + v

    direct = objective(params, obs, actions)
    np.testing.assert_allclose(jax.jit(objective)(params, obs, actions), direct, 1e-6)
    mapped = jax.vmap(objective, in_axes=(None, 0, 0))(params, obs, actions)
    np.testing.assert_allclose(mapped, direct, rtol=1e-6)
    grads = jax.grad(lambda p: objective(p, obs, actions).sum())(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_init_is_deterministic_per_key():
    policy = policies.mlp_policy(2)
    a = policy.init(jax.random.PRNGKey(3), jnp.zeros(4))
    b = policy.init(jax.random.PRNGKey(3), jnp.zeros(4))
    c = policy.init(jax.random.PRNGKey(4), jnp.zeros(4))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert any(
        np.any(x != y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True)
    )


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (policies.mlp_policy, {"num_actions": 0}),
        (policies.mlp_policy, {"num_actions": True}),
        (policies.mlp_policy, {"num_actions": 2.0}),
        (policies.mlp_policy, {"num_actions": 2, "hidden": (8.0,)}),
        (policies.mlp_policy, {"num_actions": 2, "value": "both"}),
        (policies.mlp_policy, {"num_actions": 2, "activation": "sigmoidish"}),
        (policies.mlp_policy, {"num_actions": 2, "hidden": (8, 0)}),
        (policies.cnn_policy, {"num_actions": 2, "channels": (4,), "strides": (1, 2)}),
    ],
)
def test_factories_validate_arguments(factory, kwargs):
    with pytest.raises(ValueError):
        factory(**kwargs)


def test_numpy_integers_are_ints():
    """np.int64 sizes (e.g. read from an array) build the same policy as ints."""
    policy = policies.mlp_policy(np.int64(3), hidden=np.array([4, 4]))
    assert type(policy.num_actions) is int and policy.num_actions == 3
    obs = jnp.zeros(5)
    shapes = jax.tree.map(jnp.shape, policy.init(jax.random.PRNGKey(0), obs))
    ints = policies.mlp_policy(3, hidden=(4, 4))
    assert shapes == jax.tree.map(jnp.shape, ints.init(jax.random.PRNGKey(0), obs))
