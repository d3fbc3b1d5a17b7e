"""Tests for rl_pg.returns: hand-computed values, identities, rlax as an oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from rl_pg import returns

F = jnp.float32


def _flags(*values: int) -> jax.Array:
    return jnp.array(values, bool)


# ---------------------------------------------------------------- hand-computed values


def test_reward_to_go_single_episode_with_padding():
    rewards = jnp.array([1.0, 2.0, 3.0, 100.0])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # the 100 is padding
    # G_3 = 0 (masked); G_2 = 3; G_1 = 2 + 3 = 5; G_0 = 1 + 5 = 6
    np.testing.assert_allclose(returns.reward_to_go(rewards, mask), [6, 5, 3, 0])


def test_reward_to_go_resets_at_done():
    rewards = jnp.array([1.0, 2.0, 3.0, 4.0])
    done = _flags(0, 1, 0, 0)  # episode 1: steps 0-1, episode 2: steps 2-3
    # G_3 = 4; G_2 = 3 + 4 = 7; G_1 = 2 (done: nothing flows in); G_0 = 1 + 2 = 3
    np.testing.assert_allclose(
        returns.reward_to_go(rewards, jnp.ones(4), done), [3, 2, 7, 4]
    )


def test_total_return_broadcasts_per_episode():
    rewards = jnp.array([1.0, 2.0, 3.0, 4.0])
    # One episode, step 3 padded: R = 1 + 2 + 3 = 6 at every step.
    np.testing.assert_allclose(
        returns.total_return(rewards, jnp.array([1.0, 1.0, 1.0, 0.0])), [6, 6, 6, 6]
    )
    # Two episodes [1, 2] and [3, 4]: R = 3 and 7.
    np.testing.assert_allclose(
        returns.total_return(rewards, jnp.ones(4), _flags(0, 1, 0, 0)), [3, 3, 7, 7]
    )


def test_discounted_returns_terminated():
    # gamma = 0.5, terminal at t = 2 (next_values ignored there, 9s are garbage):
    # G_2 = 1; G_1 = 1 + 0.5 * 1 = 1.5; G_0 = 1 + 0.5 * 1.5 = 1.75
    g = returns.discounted_returns(
        jnp.ones(3), _flags(0, 0, 1), _flags(0, 0, 0), jnp.full(3, 9.0), 0.5
    )
    np.testing.assert_allclose(g, [1.75, 1.5, 1.0])


def test_discounted_returns_truncated_and_sequence_end():
    # Truncated at t = 1 with V(s_2^final) = 4; the sequence end t = 2 bootstraps from
    # next_values[2] = 2; next_values[0] = 9 is not read (t = 0 is not a cut).
    # G_2 = 1 + 0.5 * 2 = 2; G_1 = 1 + 0.5 * 4 = 3; G_0 = 1 + 0.5 * G_1 = 2.5
    g = returns.discounted_returns(
        jnp.ones(3), _flags(0, 0, 0), _flags(0, 1, 0), jnp.array([9.0, 4.0, 2.0]), 0.5
    )
    np.testing.assert_allclose(g, [2.5, 3.0, 2.0])


def test_gae_hand_computed():
    # Two episodes in one column: steps 0-1 (truncated at 1), step 2 (terminated).
    rewards = jnp.array([1.0, 0.0, 2.0])
    values = jnp.array([0.5, 1.0, 1.5])
    next_values = jnp.array([100.0, 7.0, 3.0])  # 100 is never read: t = 0 is no cut
    terminated, truncated = _flags(0, 0, 1), _flags(0, 1, 0)
    gamma, lam = 0.9, 0.8
    # t = 2 terminated: delta = 2 - 1.5 = 0.5;                      A_2 = 0.5
    # t = 1 truncated:  delta = 0 + 0.9 * 7 - 1 = 5.3; done, so     A_1 = 5.3
    # t = 0:            delta = 1 + 0.9 * values[1] - 0.5 = 1.4
    #                   A_0 = 1.4 + 0.9 * 0.8 * 5.3 = 5.216
    a = returns.gae(rewards, values, next_values, terminated, truncated, gamma, lam)
    np.testing.assert_allclose(a, [5.216, 5.3, 0.5], rtol=1e-6)
    lam_ret = returns.lambda_returns(
        rewards, values, next_values, terminated, truncated, gamma, lam
    )
    np.testing.assert_allclose(lam_ret, np.asarray(a) + np.asarray(values), rtol=1e-6)


# -------------------------------------------------------------------------- identities


def _random_sequences(seed, num, length, with_truncation=True):
    """[num, length] rewards, values, next_values, terminated, truncated (numpy)."""
    rng = np.random.default_rng(seed)
    rewards, values, next_values = rng.normal(size=(3, num, length)).astype(np.float32)
    terminated = rng.random((num, length)) < 0.2
    truncated = rng.random((num, length)) < 0.15 * with_truncation
    return rewards, values, next_values, terminated, truncated


def test_gae_lambda_one_is_discounted_returns_minus_values():
    r, v, nv, term, trunc = _random_sequences(0, 64, 12)
    gamma = 0.97
    adv = jax.vmap(returns.gae, in_axes=(0, 0, 0, 0, 0, None, None))(
        r, v, nv, term, trunc, gamma, 1.0
    )
    ret = jax.vmap(returns.discounted_returns, in_axes=(0, 0, 0, 0, None))(
        r, term, trunc, nv, gamma
    )
    np.testing.assert_allclose(adv, ret - v, atol=1e-5)


def test_gae_lambda_zero_is_td_error():
    r, v, nv, term, trunc = _random_sequences(1, 8, 10)
    gamma = 0.9
    adv = jax.vmap(returns.gae, in_axes=(0, 0, 0, 0, 0, None, None))(
        r, v, nv, term, trunc, gamma, 0.0
    )
    # V(s_{t+1}): next_values where truncated or at t = T - 1, values[t + 1] elsewhere.
    v_next = np.where(trunc, nv, np.concatenate([v[:, 1:], nv[:, -1:]], axis=1))
    delta = r + gamma * (1 - np.asarray(term)) * v_next - v
    np.testing.assert_allclose(adv, delta, atol=1e-6)


def test_reward_to_go_is_undiscounted_return_without_bootstrap():
    r, _, _, term, trunc = _random_sequences(2, 16, 9)
    done = term | trunc
    rtg = jax.vmap(returns.reward_to_go)(r, jnp.ones_like(r), done)
    ret = jax.vmap(returns.discounted_returns, in_axes=(0, 0, 0, 0, None))(
        r, done, jnp.zeros_like(done), jnp.zeros_like(r), 1.0
    )
    np.testing.assert_allclose(rtg, ret, atol=1e-5)


def test_total_return_is_reward_to_go_plus_past():
    r, _, _, term, _ = _random_sequences(3, 16, 9)
    mask = jnp.ones_like(r)
    total = jax.vmap(returns.total_return)(r, mask, term)
    rtg = np.asarray(jax.vmap(returns.reward_to_go)(r, mask, term))
    # At each episode start, R equals the reward-to-go.
    starts = np.concatenate([np.ones((16, 1), bool), np.asarray(term)[:, :-1]], axis=1)
    np.testing.assert_allclose(np.asarray(total)[starts], rtg[starts], atol=1e-5)
    # Without done flags, R is the sum of the whole sequence.
    np.testing.assert_allclose(
        jax.vmap(returns.total_return)(r, mask),
        np.broadcast_to(np.sum(r, axis=1, keepdims=True), r.shape),
        atol=1e-5,
    )


# ------------------------------------------------------------------------- rlax oracle


def test_gae_matches_rlax_without_truncation():
    r, v, nv, term, trunc = _random_sequences(4, 32, 11, False)
    gamma, lam = 0.95, 0.7
    ours = jax.vmap(returns.gae, in_axes=(0, 0, 0, 0, 0, None, None))(
        r, v, nv, term, trunc, gamma, lam
    )

    def oracle(r, v, nv, term):
        # rlax: values at times [0, T], discount_t = gamma (1 - terminal_t).
        values = jnp.concatenate([v, nv[-1:]])
        return rlax.truncated_generalized_advantage_estimation(
            r, gamma * (1.0 - term.astype(F)), lam, values
        )

    np.testing.assert_allclose(ours, jax.vmap(oracle)(r, v, nv, term), atol=1e-5)


def test_discounted_and_lambda_returns_match_rlax_without_truncation():
    r, v, nv, term, trunc = _random_sequences(5, 32, 11, False)
    gamma, lam = 0.9, 0.6
    discounts = gamma * (1.0 - term.astype(F))
    ours = jax.vmap(returns.discounted_returns, in_axes=(0, 0, 0, 0, None))(
        r, term, trunc, nv, gamma
    )
    oracle = jax.vmap(rlax.discounted_returns)(r, discounts, nv[:, -1])
    np.testing.assert_allclose(ours, oracle, atol=1e-5)

    ours_lam = jax.vmap(returns.lambda_returns, in_axes=(0, 0, 0, 0, 0, None, None))(
        r, v, nv, term, trunc, gamma, lam
    )
    # rlax v_t is V(s_{t+1}) for t in [1, T].
    v_tp1 = jnp.concatenate([v[:, 1:], nv[:, -1:]], axis=1)
    oracle_lam = jax.vmap(rlax.lambda_returns, in_axes=(0, 0, 0, None))(
        r, discounts, v_tp1, lam
    )
    np.testing.assert_allclose(ours_lam, oracle_lam, atol=1e-5)


# ---------------------------------------------------------------- padding and batching


@pytest.mark.parametrize("garbage", [1e6, np.nan])
def test_padding_after_termination_changes_nothing(garbage):
    r, v, nv, _, _ = _random_sequences(6, 1, 8)
    r, v, nv = r[0], v[0], nv[0]
    term = _flags(0, 0, 0, 1, 0, 0, 0, 0)
    mask = jnp.array([1.0, 1, 1, 1, 0, 0, 0, 0])
    pad = mask == 0
    r2, v2, nv2 = (jnp.where(pad, garbage, x) for x in (r, v, nv))
    term2 = jnp.where(pad, True, term)
    trunc2 = pad
    no_trunc = jnp.zeros(8, bool)
    live = slice(0, 4)
    pairs = [
        (returns.reward_to_go(r, mask), returns.reward_to_go(r2, mask, term2)),
        (returns.total_return(r, mask), returns.total_return(r2, mask, term2 | trunc2)),
        (
            returns.discounted_returns(r, term, no_trunc, nv, 0.9),
            returns.discounted_returns(r2, term2, trunc2, nv2, 0.9),
        ),
        (
            returns.gae(r, v, nv, term, no_trunc, 0.9, 0.8),
            returns.gae(r2, v2, nv2, term2, trunc2, 0.9, 0.8),
        ),
    ]
    for clean, dirty in pairs:
        np.testing.assert_allclose(clean[live], dirty[live], rtol=1e-6)
        assert np.all(np.isfinite(dirty[live]))


@pytest.mark.slow
def test_batch_helpers_map_over_axis_one():
    r, v, nv, term, trunc = _random_sequences(7, 5, 6)
    tm = lambda x: jnp.swapaxes(x, 0, 1)  # [B, T] -> [T, B]
    mask = jnp.ones_like(r)
    done = term | trunc
    checks = [
        (
            returns.batch_gae(tm(r), tm(v), tm(nv), tm(term), tm(trunc), 0.9, 0.5),
            jax.vmap(returns.gae, in_axes=(0, 0, 0, 0, 0, None, None))(
                r, v, nv, term, trunc, 0.9, 0.5
            ),
        ),
        (
            returns.batch_lambda_returns(
                tm(r), tm(v), tm(nv), tm(term), tm(trunc), 0.9, 0.5
            ),
            jax.vmap(returns.lambda_returns, in_axes=(0, 0, 0, 0, 0, None, None))(
                r, v, nv, term, trunc, 0.9, 0.5
            ),
        ),
        (
            returns.batch_discounted_returns(tm(r), tm(term), tm(trunc), tm(nv), 0.9),
            jax.vmap(returns.discounted_returns, in_axes=(0, 0, 0, 0, None))(
                r, term, trunc, nv, 0.9
            ),
        ),
        (
            returns.batch_reward_to_go(tm(r), tm(mask), tm(done)),
            jax.vmap(returns.reward_to_go)(r, mask, done),
        ),
        (
            returns.batch_total_return(tm(r), tm(mask), tm(done)),
            jax.vmap(returns.total_return)(r, mask, done),
        ),
    ]
    for batched, reference in checks:
        np.testing.assert_allclose(batched, tm(reference), atol=1e-6)


def test_jit_and_grad():
    r, v, nv, term, trunc = (x[0] for x in _random_sequences(8, 1, 7))
    fn = lambda v: returns.gae(r, v, nv, term, trunc, 0.9, 0.8)
    np.testing.assert_allclose(jax.jit(fn)(v), fn(v), atol=1e-6)
    # d A_t / d V(s_t) = -1 on the diagonal.
    jac = jax.jacobian(fn)(v)
    np.testing.assert_allclose(np.diag(jac), -np.ones(7), atol=1e-6)


def test_rank_is_checked():
    x = jnp.zeros((3, 2))
    with pytest.raises(AssertionError):
        returns.reward_to_go(x, x)
    with pytest.raises(AssertionError):
        returns.gae(x, x, x, x.astype(bool), x.astype(bool), 0.9, 0.9)


def test_a_discount_outside_the_unit_interval_is_refused():
    x, flags = jnp.zeros(3), jnp.zeros(3, bool)
    for gamma, lam in [(-0.5, 0.9), (1.5, 0.9), (0.9, 2.0)]:
        with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
            returns.gae(x, x, x, flags, flags, gamma, lam)
    with pytest.raises(ValueError, match="gamma must be in"):
        returns.batch_discounted_returns(
            x[:, None], flags[:, None], flags[:, None], x[:, None], 2.0
        )
    returns.gae(x, x, x, flags, flags, jnp.float32(1.5), 0.9)  # arrays: vmappable


def test_length_one_sequence():
    g = returns.gae(
        jnp.array([2.0]),
        jnp.array([0.5]),
        jnp.array([1.0]),
        _flags(0),
        _flags(0),
        0.5,
        1,
    )
    # Cut by the sequence end: A = 2 + 0.5 * 1 - 0.5 = 2
    chex.assert_trees_all_close(g, jnp.array([2.0]))


def test_an_empty_sequence_has_empty_returns():
    """T = 0: every function returns an array of shape (0,) (discounted_returns
    read next_values[-1])."""
    e, flags = jnp.zeros((0,)), _flags()
    for g in (
        returns.reward_to_go(e, e, flags),
        returns.total_return(e, e, flags),
        returns.discounted_returns(e, flags, flags, e, 0.9),
        returns.gae(e, e, e, flags, flags, 0.9, 0.8),
        returns.lambda_returns(e, e, e, flags, flags, 0.9, 0.8),
    ):
        assert g.shape == (0,) and g.dtype == jnp.float32
