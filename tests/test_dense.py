"""The layer-by-layer gradient phase (rl_pg.variance.dense) against jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rl_pg import enumerable, policies
from rl_pg.trajectory import Trajectory
from rl_pg.variance import dense, kernels, problems

T, C, D, F = 5, 8, 6, 2


def _columns(key, num_actions, obs_dim=D, one_hot=False):
    """Observations, actions and two distinct random weightings, padding zeroed."""
    k_obs, k_act, k_w, k_len = jax.random.split(key, 4)
    if one_hot:
        obs = jax.nn.one_hot(jax.random.randint(k_obs, (T, C), 0, obs_dim), obs_dim)
    else:
        obs = jax.random.normal(k_obs, (T, C, obs_dim))
    actions = jax.random.randint(k_act, (T, C), 0, num_actions)
    weights = jax.random.normal(k_w, (T, C, F))
    lengths = jax.random.randint(k_len, (C,), 1, T + 1)
    live = jnp.arange(T)[:, None] < lengths
    return (
        jnp.where(live[..., None], obs, 0.0),
        jnp.where(live, actions, 0),
        jnp.where(live[..., None], weights, 0.0),
    )


def _expected(apply_fn, params, columns):
    """Per column and weighting: jax.grad of sum_t w_t log pi(a_t|s_t), flattened."""
    obs, actions, weights = columns
    out = np.zeros((F, C, ravel_pytree(params)[0].size))
    for c in range(C):
        for f in range(F):

            def objective(p, c=c, f=f):
                logits, _ = apply_fn(p, obs[:, c])
                log_pi = policies.log_prob(logits, actions[:, c])
                return jnp.sum(weights[:, c, f] * log_pi)

            out[f, c] = ravel_pytree(jax.grad(objective)(params))[0]
    return out


def _perturbed(params, key):  # nonzero biases and a non-uniform policy
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        x + 0.3 * jax.random.normal(k, x.shape)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


@pytest.mark.parametrize(
    "activation, value",
    [("tanh", "separate"), ("relu", "shared"), ("gelu", None), ("silu", "separate")],
)
@pytest.mark.parametrize("block_columns", [None, 2])
@pytest.mark.slow
def test_mlp_gradients_equal_jax_grad_per_trajectory(activation, value, block_columns):
    policy = policies.mlp_policy(3, (16, 8), activation, value)
    key = jax.random.PRNGKey(0)
    params = _perturbed(policy.init(key, jnp.zeros(D)), jax.random.PRNGKey(1))
    columns = _columns(jax.random.PRNGKey(2), 3)
    found = jax.jit(
        lambda p, cols: dense.dense_column_grads(policy.apply, p, cols, block_columns)
    )(params, columns)
    expected = _expected(policy.apply, params, columns)
    for f in range(F):
        np.testing.assert_allclose(found[f], expected[f], rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_tabular_policy_and_sharded_block_layout():
    policy = enumerable.mdp_policy()
    num_states = enumerable.DEFAULT_MDP.num_states
    params = _perturbed(policy.init(None, None), jax.random.PRNGKey(3))
    columns = _columns(jax.random.PRNGKey(4), policy.num_actions, num_states, True)
    expected = _expected(policy.apply, params, columns)
    # columns as on 2 devices: blocks of 2 columns from each half
    found = dense.dense_column_grads(policy.apply, params, columns, 4, multiple=2)
    for f in range(F):
        np.testing.assert_allclose(found[f], expected[f], rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_a_wrong_weighting_or_step_is_caught():
    """The comparison would fail on shifted weights or swapped weightings."""
    policy = policies.mlp_policy(3, (16, 8))
    params = _perturbed(
        policy.init(jax.random.PRNGKey(0), jnp.zeros(D)), jax.random.PRNGKey(1)
    )
    obs, actions, weights = _columns(jax.random.PRNGKey(2), 3)
    found = dense.dense_column_grads(policy.apply, params, (obs, actions, weights))
    shifted = _expected(policy.apply, params, (obs, actions, jnp.roll(weights, 1, 0)))
    assert not np.allclose(found[0], shifted[0], rtol=1e-3, atol=1e-4)
    assert not np.allclose(found[0], found[1], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_score_and_rtg_equals_the_vmap_of_vjp_path(monkeypatch):
    policy = policies.mlp_policy(2, (16, 16))
    params = _perturbed(
        policy.init(jax.random.PRNGKey(0), jnp.zeros(D)), jax.random.PRNGKey(5)
    )
    obs, actions, weights = _columns(jax.random.PRNGKey(6), 2)
    problem = problems.Problem(policy.apply, None, 1)
    traj = _trajectory(obs, actions, weights)
    new = kernels.score_and_rtg(problem, block_steps=2 * T)(params, traj)
    monkeypatch.setattr(dense, "dense_column_grads", lambda *args: None)
    old = kernels.score_and_rtg(problem, block_steps=2 * T)(params, traj)
    for a, b in zip(new, old, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _trajectory(obs, actions, weights):
    live = (weights[..., 0] != 0).astype(jnp.float32)
    zeros = jnp.zeros((T, C))
    done = jnp.zeros((T, C), bool).at[-1].set(True)
    return Trajectory(
        observations=obs,
        actions=actions,
        rewards=weights[..., 1],
        log_probs=zeros,
        values=zeros,
        next_values=zeros,
        terminated=done,
        truncated=jnp.zeros((T, C), bool),
        mask=live,
        level=jnp.zeros((T, C), jnp.int32),
        score=jnp.zeros((T, C), jnp.int32),
    )


def _skip(params, obs):  # a skip connection around the hidden layer
    h = jnp.tanh(obs @ params["a"])
    return (h + jnp.tanh(h @ params["b"])) @ params["c"], jnp.zeros(obs.shape[:-1])


def _shared(params, obs):  # one kernel used twice
    return jnp.tanh(obs @ params["a"]) @ params["a"].T[:, :3], jnp.zeros(obs.shape[:-1])


def _mixing(params, obs):  # rows mixed: logits centred over the batch
    z = obs @ params["c6"]
    return z - jnp.mean(z, axis=0), jnp.zeros(obs.shape[:-1])


def _low_rank(params, obs):  # a kernel made of two parameters
    return obs @ (params["a"] @ params["c"]), jnp.zeros(obs.shape[:-1])


def _weight_norm(params, obs):  # a kernel scaled by another parameter
    return obs @ (params["c"] * params["s"]), jnp.zeros(obs.shape[:-1])


def _scalar_bias(params, obs):  # a [1] "bias" broadcast over the logits
    return obs @ params["c"] + params["s1"], jnp.zeros(obs.shape[:-1])


@pytest.mark.parametrize(
    "apply_fn", [_skip, _shared, _mixing, _low_rank, _weight_norm, _scalar_bias]
)
def test_other_policies_are_not_taken_for_dense_chains(apply_fn):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "a": jax.random.normal(k[0], (D, D)),
        "b": jax.random.normal(k[1], (D, D)),
        "c": jax.random.normal(k[2], (D, 3)),
        "c6": jax.random.normal(k[3], (D, 3)),
        "s": jnp.ones(3),
        "s1": jnp.ones(1),
    }
    params = {
        "_skip": {n: params[n] for n in "abc"},
        "_shared": {"a": params["a"]},
        "_mixing": {"c6": params["c6"]},
        "_low_rank": {n: params[n] for n in "ac"},
        "_weight_norm": {n: params[n] for n in ("c", "s")},
        "_scalar_bias": {n: params[n] for n in ("c", "s1")},
    }[apply_fn.__name__]
    assert dense.dense_chain(apply_fn, params, 10, D, jnp.float32) is None


@pytest.mark.slow
def test_cnn_policy_is_not_a_dense_chain():
    policy = policies.cnn_policy(2, channels=(4,), kernel_sizes=(3,), strides=(1,))
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 1)))
    obs = jnp.zeros((T, C, 8, 8, 1))
    columns = (obs, jnp.zeros((T, C), jnp.int32), jnp.zeros((T, C, F)))
    assert dense.dense_column_grads(policy.apply, params, columns) is None


@pytest.mark.parametrize("use_dense", [True, False])
@pytest.mark.slow
def test_given_outputs_are_written_over(use_dense, monkeypatch):
    """Outputs passed back for reuse (as the study donates them) do not leak into
    the results; the critic's entries, zero in any earlier output, stay zero."""
    policy = policies.mlp_policy(2, (16, 16))
    params = _perturbed(
        policy.init(jax.random.PRNGKey(0), jnp.zeros(D)), jax.random.PRNGKey(7)
    )
    traj = _trajectory(*_columns(jax.random.PRNGKey(8), 2))
    if not use_dense:
        monkeypatch.setattr(dense, "dense_column_grads", lambda *args: None)
    grads = kernels.score_and_rtg(problems.Problem(policy.apply, None, 1), 2 * T)
    fresh = grads(params, traj)
    critic = ravel_pytree(_critic_mask(params))[0] > 0
    assert np.all(fresh[0][:, critic] == 0) and np.all(fresh[1][:, critic] == 0)
    stale = tuple(jnp.where(critic, 0.0, v) * jnp.ones_like(fresh[0]) for v in (1, 7))
    reused = grads(params, traj, stale)
    for a, b in zip(fresh, reused, strict=True):
        np.testing.assert_array_equal(a, b)


def _critic_mask(params):  # 1 on the critic's leaves
    return {
        "params": {
            name: jax.tree.map(
                lambda x, name=name: jnp.full(
                    x.shape, float(name.startswith("critic") or name == "Dense_1")
                ),
                sub,
            )
            for name, sub in params["params"].items()
        }
    }


def test_a_block_size_that_does_not_divide_the_columns_is_an_error():
    policy = policies.mlp_policy(2, (16,))
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros(D))
    columns = (jnp.zeros((T, 8, D)), jnp.zeros((T, 8), jnp.int32), jnp.zeros((T, 8, F)))
    with pytest.raises(ValueError, match="must divide the columns"):
        dense.dense_column_grads(policy.apply, params, columns, block_columns=3)
