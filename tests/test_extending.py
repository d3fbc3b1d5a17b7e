"""Adding an estimator touches its declaration and its registry entry only.

The toy estimator below is the whole change a user makes: a declaration of its
per-step weights, one ``surrogate_loss`` line and one ``register`` call. Training,
the study's fast path and the CLI then read it from the registry.
"""

import jax
import numpy as np
import pytest

from rl_pg import estimators
from rl_pg.estimators import EstimatorSpec, Surrogate, WeightInputs
from rl_pg.trajectory import Trajectory
from rl_pg.variance import run_study

NAME = "half_reward_to_go_toy"


def _half_reward_to_go_toy(batch: Trajectory, inputs: WeightInputs) -> Surrogate:
    """Half the reward-to-go estimate: w_t = G_t / (2 B)."""
    to_go = estimators._reward_to_go_feature(batch)
    return Surrogate(
        estimators._column_weights(
            batch, "reward_to_go", to_go, 0.5 / batch.mask.shape[1]
        )
    )


@pytest.fixture(scope="module")
def toy():
    loss = estimators.surrogate_loss(_half_reward_to_go_toy)
    spec = estimators.register(
        EstimatorSpec(
            NAME,
            loss,
            per_trajectory=True,
            mean_factor=lambda g, t: 0.5,
            in_study=False,
        )
    )
    yield spec
    estimators.REGISTRY.pop(NAME)
    estimators.ESTIMATORS.pop(NAME)


@pytest.mark.slow
def test_a_registered_toy_estimator_reaches_the_study_through_the_registry(toy):
    assert toy.weights is not None  # derived from the declaration, not written twice
    rows = run_study(
        problem="enumerable",
        estimators=[NAME, "reward_to_go"],
        batch_sizes=(4, 16),
        num_batches=8,
        max_batches_per_size=32,
        reference_trajectories=1024,
        reference_groups=16,
        chunk=1024,
    )
    by = {(r["checkpoint"], r["estimator"], r["batch_size"]): r for r in rows}
    for (label, name, n), r in by.items():
        if name != NAME:
            continue
        full = by[(label, "reward_to_go", n)]
        # the same batches, every estimate exactly half of reward_to_go's
        np.testing.assert_allclose(r["variance"], 0.25 * full["variance"], rtol=1e-4)
        np.testing.assert_allclose(r["cos_true"], full["cos_true"], atol=1e-5)
        # exact mode reads the declared mean factor: E = g / 2
        assert np.isfinite(r["exact_bias2"]) and r["exact_bias2"] > 0


@pytest.mark.slow
def test_the_toy_loss_gradient_is_its_declared_weighting(toy):
    from rl_pg import enumerable

    mdp = enumerable.DEFAULT_MDP
    policy = enumerable.tabular_policy(mdp.num_states, mdp.num_actions)
    params = policy.init(jax.random.PRNGKey(0), None)
    params["logits"] = params["logits"].at[:, 1].set(0.7)  # not uniform
    batch = enumerable.sample_batch(jax.random.PRNGKey(1), params, 16, mdp)
    grad = jax.grad(lambda p: toy.loss(p, batch, apply_fn=policy.apply)[0])(params)
    half = jax.grad(
        lambda p: estimators.reward_to_go(p, batch, apply_fn=policy.apply)[0]
    )(params)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(half), strict=True):
        np.testing.assert_allclose(a, 0.5 * b, rtol=1e-5, atol=1e-7)


def test_training_logs_a_user_loss_whatever_aux_it_returns(toy):
    """A user's loss may return ``{}`` or some of LossAux's fields (the README's
    median_baseline does): training logs those, pg_loss the loss and 0 the rest."""
    from rl_pg import enumerable
    from rl_pg.algos import loop

    mdp = enumerable.DEFAULT_MDP
    policy = enumerable.tabular_policy(mdp.num_states, mdp.num_actions)
    params = policy.init(jax.random.PRNGKey(0), None)
    batch = enumerable.sample_batch(jax.random.PRNGKey(1), params, 8, mdp)
    name = "user_loss_toy"
    for aux, expected in [
        ({}, {"entropy": 0.0}),
        (None, {"entropy": 0.0}),
        ({"entropy": 0.25}, {"entropy": 0.25}),
    ]:

        def user_loss(params, batch, *, apply_fn, aux=aux):
            loss, _ = toy.loss(params, batch, apply_fn=apply_fn)
            return 2.0 * loss, aux

        estimators.register(EstimatorSpec(name, user_loss, in_study=False))
        try:
            loss = loop.make_loss(name, policy.apply, batch_length=4)
            (value, logged), _ = jax.value_and_grad(loss, has_aux=True)(params, batch)
        finally:
            estimators.REGISTRY.pop(name)
            estimators.ESTIMATORS.pop(name)
        assert isinstance(logged, estimators.LossAux)
        assert float(logged.pg_loss) == pytest.approx(4 * float(value))  # unscaled
        assert float(logged.entropy) == expected["entropy"]
        assert float(logged.clip_fraction) == 0.0
    with pytest.raises(ValueError, match="LossAux, or a dict of some of its fields"):
        estimators.as_loss_aux({"my_metric": 1.0}, 0.0, name)
