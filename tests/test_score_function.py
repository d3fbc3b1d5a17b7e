"""Tests for rl_pg.score_function (Mohamed et al. 2020, section 3 toy)."""

import csv
import functools
import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss

from rl_pg import score_function as sf

MU, SIGMA = 1.0, 1.0
SQRT_PI = math.sqrt(math.pi)
UNBIASED_CASES = [
    ("square", 0.5),
    ("square", 5.0),
    ("exp", 0.5),
    ("exp", 5.0),
    ("cos", 1.0),
    ("cos", 5.0),
]


def gauss_hermite_mean(g, num_nodes=200):
    """E_{eps ~ N(0, 1)}[g(eps)] with numpy only (independent of the library rules)."""
    nodes, weights = hermegauss(num_nodes)
    return np.sum(weights * g(nodes), axis=-1) / weights.sum()


# ----------------------------------------------------------------------------------
# Closed forms and analytic gradients.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cost", list(sf.COSTS))
@pytest.mark.parametrize("k", [-0.2, 0.5, 1.0, 3.0])
def test_closed_form_expectation_matches_quadrature(cost, k):
    with jax.enable_x64(True):
        f = lambda eps: np.asarray(sf.COSTS[cost].fn(MU + SIGMA * eps, k))
        expected = gauss_hermite_mean(f)
    assert sf.analytic_expectation(cost, k) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("cost", list(sf.COSTS))
@pytest.mark.parametrize("k", [-0.2, 0.5, 5.0])
def test_analytic_gradient_matches_central_differences(cost, k):
    h = 1e-5
    e = lambda mu, sigma: sf.analytic_expectation(cost, k, mu=mu, sigma=sigma)
    numeric = [
        (e(MU + h, SIGMA) - e(MU - h, SIGMA)) / (2 * h),
        (e(MU, SIGMA + h) - e(MU, SIGMA - h)) / (2 * h),
    ]
    np.testing.assert_allclose(
        sf.analytic_gradient(cost, k), numeric, rtol=1e-6, atol=1e-9
    )


def test_analytic_gradient_hand_computed():
    # square: d/dmu ((mu - k)^2 + sigma^2) = 2 (mu - k) = -8 at k = 5; d/dsigma = 2.
    np.testing.assert_allclose(sf.analytic_gradient("square", 5.0), [-8.0, 2.0])
    # cos: E = cos(k mu) exp(-k^2 sigma^2 / 2); k = 2:
    #   d/dmu    = -k sin(k mu) exp(-k^2 sigma^2 / 2) = -2 sin(2) e^-2
    #   d/dsigma = -k^2 sigma cos(k mu) exp(...)     = -4 cos(2) e^-2
    expected = [-2 * math.sin(2) * math.exp(-2), -4 * math.cos(2) * math.exp(-2)]
    np.testing.assert_allclose(sf.analytic_gradient("cos", 2.0), expected)
    # exp: E = exp(-k mu^2 / d) / sqrt(d), d = 1 + 2 k sigma^2; k = 1, d = 3:
    #   d/dmu    = -2 k mu / d E                                  = -(2/3) E
    #   d/dsigma = (2 k^2 mu^2 2 sigma / d^2 - k 2 sigma / d) E    = (4/9 - 2/3) E
    value = math.exp(-1 / 3) / math.sqrt(3)
    np.testing.assert_allclose(
        sf.analytic_gradient("exp", 1.0), [-2 / 3 * value, (4 / 9 - 2 / 3) * value]
    )


@pytest.mark.parametrize("cost", list(sf.COSTS))
@pytest.mark.parametrize("k", [0.5, 2.0])
def test_stein_identities_link_score_pathwise_and_analytic(cost, k):
    # E[f(x) eps] / sigma = E[f'(x)] = dE/dmu and
    # E[f(x) (eps^2 - 1)] / sigma = E[f'(x) eps] = dE/dsigma (Gaussian integration
    # by parts): the score-function and pathwise integrands have the same mean.
    with jax.enable_x64(True):
        f = lambda x: sf.COSTS[cost].fn(x, k)
        df = jax.vmap(jax.grad(f))
        x = lambda eps: jnp.asarray(MU + SIGMA * eps)
        score = [
            gauss_hermite_mean(lambda e: np.asarray(f(x(e))) * e / SIGMA),
            gauss_hermite_mean(lambda e: np.asarray(f(x(e))) * (e**2 - 1) / SIGMA),
        ]
        path = [
            gauss_hermite_mean(lambda e: np.asarray(df(x(e)))),
            gauss_hermite_mean(lambda e: np.asarray(df(x(e))) * e),
        ]
    analytic = sf.analytic_gradient(cost, k)
    np.testing.assert_allclose(score, analytic, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(path, analytic, rtol=1e-9, atol=1e-12)


def test_normal_score_closed_form():
    x, mu, sigma = 0.3, 1.0, 2.0
    expected = [(x - mu) / sigma**2, ((x - mu) ** 2 - sigma**2) / sigma**3]
    np.testing.assert_allclose(sf.normal_score(x, mu, sigma), expected, rtol=1e-6)


# ----------------------------------------------------------------------------------
# The single-draw estimators.
# ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_registry_names_and_signature():
    assert list(sf.ESTIMATORS) == [
        "score_function",
        "score_function_baseline",
        "pathwise",
        "measure_valued",
        "measure_valued_coupled",
    ]
    key = jax.random.key(3)
    # sample_estimates vmaps the estimator over split(fold_in(key, 0), SAMPLE_CHUNK).
    draw_keys = jax.random.split(jax.random.fold_in(key, 0), sf.SAMPLE_CHUNK)[:4]
    f = lambda x: jnp.cos(2.0 * x)
    for name, estimator in sf.ESTIMATORS.items():
        batch = sf.sample_estimates(name, "cos", 2.0, key=key, num_samples=4)
        assert batch.shape == (4, 2), name
        # Determinism: the same key gives the same draws.
        np.testing.assert_array_equal(
            batch, sf.sample_estimates(name, "cos", 2.0, key=key, num_samples=4)
        )
        # jit of one draw agrees with the jitted vmap.
        single = jax.jit(functools.partial(estimator, f=f, mu=1.0, sigma=1.0))
        for i, draw_key in enumerate(draw_keys):
            estimate = single(draw_key)
            assert estimate.shape == (2,), name
            np.testing.assert_allclose(estimate, batch[i], rtol=1e-4, err_msg=name)


def test_score_function_is_cost_times_score():
    key = jax.random.key(0)
    f = lambda x: (x - 5.0) ** 2
    x = 1.0 + 2.0 * jax.random.normal(key)
    expected = f(x) * np.array([(x - 1.0) / 4.0, ((x - 1.0) ** 2 - 4.0) / 8.0])
    np.testing.assert_allclose(sf.score_function(key, f, 1.0, 2.0), expected, rtol=1e-5)
    # A zero baseline is the plain score function.
    np.testing.assert_allclose(
        sf.score_function_baseline(key, f, 1.0, 2.0, baseline=jnp.zeros(2)),
        expected,
        rtol=1e-5,
    )


def test_pathwise_square_cost_hand_computed():
    # f = (x - k)^2 at x = mu + sigma eps: grad = 2 (x - k) (1, eps).
    key = jax.random.key(1)
    eps = jax.random.normal(key)
    x = 1.0 + 0.5 * eps
    np.testing.assert_allclose(
        sf.pathwise(key, lambda x: (x - 3.0) ** 2, 1.0, 0.5),
        [2 * (x - 3.0), 2 * (x - 3.0) * eps],
        rtol=1e-5,
    )


@pytest.mark.slow
def test_sampling_distributions_of_the_measure_valued_parts():
    n = 2**17

    @jax.jit
    def draw(key):
        key_rayleigh, key_maxwell, key_uniform = jax.random.split(key, 3)
        radius = jax.vmap(sf.sample_rayleigh)(jax.random.split(key_rayleigh, n))
        maxwell = jax.vmap(sf.sample_double_sided_maxwell)(
            jax.random.split(key_maxwell, n)
        )
        return radius, maxwell, jax.random.uniform(key_uniform, (n,))

    radius, maxwell, uniform = (
        np.asarray(a, np.float64) for a in draw(jax.random.key(7))
    )

    def check(samples, expected):
        se = samples.std() / math.sqrt(n)
        assert abs(samples.mean() - expected) < 5 * se

    check(radius, math.sqrt(math.pi / 2))  # Rayleigh(1): E R = sqrt(pi / 2)
    check(radius**2, 2.0)  # E R^2 = 2
    check(maxwell, 0.0)
    check(maxwell**2, 3.0)  # double-sided Maxwell: E M^2 = E eps^4 = 3
    check(maxwell**4, 15.0)  # E M^4 = E eps^6 = 15
    coupled = maxwell * uniform  # the coupled negative part must be N(0, 1)
    check(coupled**2, 1.0)
    check(coupled**4, 3.0)
    check(np.abs(coupled), math.sqrt(2 / math.pi))


@pytest.mark.slow
@pytest.mark.parametrize("estimator", list(sf.ESTIMATORS))
@pytest.mark.parametrize("cost,k", UNBIASED_CASES)
def test_estimators_are_unbiased(estimator, cost, k):
    check = sf.unbiasedness_check(
        estimator, cost, k, key=jax.random.key(11), num_samples=2**18
    )
    assert np.all(np.abs(check.z_score) < 4.5), check


# ----------------------------------------------------------------------------------
# Baselines.
# ----------------------------------------------------------------------------------


def test_optimal_baseline_square_cost_hand_computed():
    # F = d^2 + sigma^2, F'' = 2, F'''' = 0, d = mu - k:
    #   b_mu = F + sigma^2 F'' = d^2 + 3 sigma^2 = 19;
    #   b_sigma = F + 2 sigma^2 F'' = d^2 + 5 sigma^2 = 21.
    np.testing.assert_allclose(sf.optimal_baseline("square", 5.0), [19.0, 21.0])


@pytest.mark.parametrize("cost", list(sf.COSTS))
@pytest.mark.parametrize("k", [0.5, 3.0, 10.0])
def test_quadrature_baseline_matches_exact(cost, k):
    f = lambda x: sf.COSTS[cost].fn(x, k)
    quadrature = sf.quadrature_optimal_baseline(f, jnp.float32(MU), jnp.float32(SIGMA))
    np.testing.assert_allclose(
        quadrature, sf.optimal_baseline(cost, k), rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------------------------
# Exact variances.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.5, 5.0])
@pytest.mark.slow
def test_square_cost_variances_closed_form(k):
    # Square cost at sigma = 1, d = mu - k, eps ~ N(0, 1) (E eps^2,4,6,8 = 1,3,15,105),
    # R ~ Rayleigh (E R = sqrt(pi/2), E R^2 = 2, Var R = 2 - pi/2),
    # M ~ Maxwell (E M^2 = 3, E M^4 = 15), U ~ U(0, 1).
    d = MU - k
    expected = {
        # (d + eps)^2 eps: E = d^4 + 18 d^2 + 15, minus (2 d)^2.
        # (d + eps)^2 (eps^2 - 1): E = 2 d^4 + 60 d^2 + 78, minus 2^2.
        "score_function": [d**4 + 14 * d**2 + 15, 2 * d**4 + 60 * d**2 + 74],
        # b = (d^2 + 3, d^2 + 5): (2 d eps + eps^2 - 3) eps and
        # (2 d eps + eps^2 - 5)(eps^2 - 1).
        "score_function_baseline": [8 * d**2 + 6, 40 * d**2 + 24],
        # 2 (d + eps) and 2 (d + eps) eps.
        "pathwise": [4.0, 4 * (d**2 + 2)],
        # (Var (d + R)^2 + Var (d - R)^2) / (2 pi) and Var (d + M)^2 + Var (d + eps)^2
        # = (12 d^2 + 6) + (4 d^2 + 2).
        "measure_valued": [
            ((16 - 4 * math.pi) * d**2 + 8) / (2 * math.pi),
            16 * d**2 + 8,
        ],
        # (d + R)^2 - (d - R)^2 = 4 d R: Var = 16 d^2 (2 - pi/2) / (2 pi);
        # (d + M)^2 - (d + M U)^2 = 2 d M (1 - U) + M^2 (1 - U^2):
        # E[.^2] = 4 d^2 3 / 3 + 15 (8 / 15) = 4 d^2 + 8, minus 2^2.
        "measure_valued_coupled": [
            8 * d**2 * (2 - math.pi / 2) / math.pi,
            4 * d**2 + 4,
        ],
    }
    for estimator, values in expected.items():
        np.testing.assert_allclose(
            sf.estimator_variances("square", k, estimator), values, rtol=1e-9
        )


@pytest.mark.parametrize("k", [-0.2, 0.5, 5.0])
def test_exp_score_function_variance_closed_form(k):
    # Var = E[f^2 eps^2] / sigma^2 - eta_mu^2 with f^2 = exp(-2 k x^2), and
    # E[g eps^2] = G + sigma^2 G'' (G = E[g], primes d/dmu), so it is the closed form
    # of the exp cost at 2 k. k = -0.2 exercises the heavy-tail quadrature scale.
    with jax.enable_x64(True):
        g = lambda mu: sf.expected_exp_cost(mu, SIGMA, 2 * k)
        second_moment = float(g(MU) + SIGMA**2 * jax.grad(jax.grad(g))(MU))
    expected = second_moment / SIGMA**2 - sf.analytic_gradient("exp", k)[0] ** 2
    assert sf.estimator_variance("exp", k, "score_function", "mu") == pytest.approx(
        expected, rel=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "cost,k,estimator",
    [
        ("cos", 1.0, "measure_valued_coupled"),
        ("cos", 5.0, "pathwise"),
        ("exp", 1.0, "score_function_baseline"),
        ("exp", 5.0, "measure_valued"),
        ("square", 2.0, "measure_valued_coupled"),
    ],
)
def test_variance_matches_brute_force_monte_carlo(cost, k, estimator):
    exact = sf.estimator_variances(cost, k, estimator)
    mc = sf.monte_carlo_moments(
        estimator, cost, k, key=jax.random.key(5), num_samples=2**18
    )
    # Stated accuracy 1% plus the Monte Carlo noise (4.5 standard errors).
    assert np.all(np.abs(exact - mc.variance) < 0.01 * exact + 4.5 * mc.variance_stderr)
    # The test would notice a 5% error: the MC standard error is well below that.
    assert np.all(mc.variance_stderr < 0.01 * exact)


@pytest.mark.slow
def test_variance_is_zero_for_a_constant_cost():
    # k = 0: f = 1, the exact gradient is 0 and pathwise / measure-valued / baseline
    # estimates are identically 0; the score function is f s with Var = E s^2 = (1, 2).
    for cost in ("exp", "cos"):
        np.testing.assert_array_equal(sf.estimator_variances(cost, 0.0, "pathwise"), 0)
        np.testing.assert_array_equal(
            sf.estimator_variances(cost, 0.0, "measure_valued"), 0
        )
        np.testing.assert_allclose(
            sf.estimator_variances(cost, 0.0, "score_function"), [1.0, 2.0]
        )


@pytest.mark.slow
def test_vector_k_matches_scalar_k():
    ks = np.array([-3.0, 0.5, 1.0, 5.0, 10.0])
    vector = sf.estimator_variance("cos", ks, "measure_valued", "sigma")
    scalar = [sf.estimator_variance("cos", k, "measure_valued", "sigma") for k in ks]
    np.testing.assert_allclose(vector, scalar, rtol=1e-12)


def test_baseline_never_increases_variance():
    ks = np.arange(0, 41) / 4.0
    for cost in sf.COSTS:
        plain = sf.estimator_variances(cost, ks, "score_function")
        baseline = sf.estimator_variances(cost, ks, "score_function_baseline")
        assert np.all(baseline <= plain * (1 + 1e-9))


def test_paper_qualitative_results():
    ks = np.arange(-12, 41) / 4.0
    # Square cost (Mohamed et al. 2020, Fig. 2 left): pathwise far below the score
    # function everywhere; at k = 5, 4 against 495 for the mean.
    path = sf.estimator_variances("square", ks, "pathwise")
    score = sf.estimator_variances("square", ks, "score_function")
    assert np.all(path < score / 3)
    assert score[ks == 5.0, 0] / path[ks == 5.0, 0] > 100
    # Cos cost (Fig. 2 right): the pathwise variance grows like k^2 (f' = -k sin(k x))
    # while the score-function one stays bounded, so for large k the ordering flips.
    path = sf.estimator_variances("cos", ks, "pathwise")
    score = sf.estimator_variances("cos", ks, "score_function")
    assert np.all(score[ks >= 5] <= 1.0 + 1e-9)
    assert np.all(path[ks >= 5] > 10 * score[ks >= 5])


def test_infinite_and_undefined_cases():
    # 1 + 2 k sigma^2 <= 0: E[exp(-k x^2)] infinite, refuse.
    with pytest.raises(ValueError, match="infinite"):
        sf.analytic_gradient("exp", -0.5)
    with pytest.raises(ValueError, match="infinite"):
        sf.estimator_variance("exp", [-1.0, 1.0], "pathwise", "mu")
    with pytest.raises(ValueError, match="infinite"):
        sf.sample_estimates(
            "pathwise", "exp", -3.0, key=jax.random.key(0), num_samples=8
        )
    # -1/2 < k <= -1/4: the gradient exists, the variances do not.
    assert not sf.second_moment_finite("exp", -0.25)
    assert np.all(np.isinf(sf.estimator_variances("exp", -0.25, "measure_valued")))
    assert np.isfinite(sf.analytic_gradient("exp", -0.25)).all()
    for bad in [
        lambda: sf.analytic_gradient("quartic", 1.0),
        lambda: sf.estimator_variance("cos", 1.0, "reinforce", "mu"),
        lambda: sf.estimator_variance("cos", 1.0, "pathwise", "tau"),
        lambda: sf.analytic_gradient("cos", 1.0, sigma=0.0),
    ]:
        with pytest.raises(ValueError):
            bad()


def test_quadrature_check_refuses_unresolved_integrands():
    # exp(-50 x^2) is a peak of width 0.1, narrower than the node spacing.
    with pytest.raises(ArithmeticError, match="did not converge"):
        sf.estimator_variance("exp", 50.0, "score_function", "mu")


# ----------------------------------------------------------------------------------
# Monte Carlo behaviour and the seed's warning.
# ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_naive_estimator_is_biased():
    d = MU - 5.0
    # E_p[f grad_mu p] = (1/sigma^2) int f eps phi(eps)^2 deps, phi^2 = N(0, 1/2) /
    # (2 sqrt pi): E_{N(0,1/2)}[(d + eps)^2 eps] = 2 d / 2 = d -> d / (2 sqrt pi).
    # grad_sigma: E_{N(0,1/2)}[(d + eps)^2 (eps^2 - 1)] = -d^2/2 + 1/4.
    limit = [d / (2 * SQRT_PI), (0.25 - d**2 / 2) / (2 * SQRT_PI)]
    np.testing.assert_allclose(sf.naive_limit("square", 5.0), limit, rtol=1e-10)
    naive = sf.monte_carlo_moments(
        "naive", "square", 5.0, key=jax.random.key(2), num_samples=2**18
    )
    analytic = sf.analytic_gradient("square", 5.0)  # (-8, 2)
    assert np.all(np.abs(naive.mean - limit) < 4.5 * naive.mean_stderr)
    assert np.all(np.abs(naive.mean - analytic) > 100 * naive.mean_stderr)
    comparison = sf.naive_vs_score(
        "square", 5.0, key=jax.random.key(2), sample_sizes=[10, 1000, 2**18]
    )
    np.testing.assert_allclose(comparison.naive_mean[-1], naive.mean, rtol=1e-9)
    score_stderr = np.sqrt(sf.estimator_variances("square", 5.0, "score_function"))
    assert np.all(
        np.abs(comparison.score_mean[-1] - analytic) < 4.5 * score_stderr / 2**9
    )


@pytest.mark.slow
def test_mean_convergence_follows_the_standard_error():
    sizes = [10, 100, 1000, 10**4, 2**17]
    result = sf.mean_convergence(
        "pathwise", "cos", 1.0, key=jax.random.key(9), sample_sizes=sizes
    )
    exact_stderr = np.sqrt(sf.estimator_variances("cos", 1.0, "pathwise") / 2**17)
    np.testing.assert_allclose(result.stderr[-1], exact_stderr, rtol=0.02)
    assert np.all(result.abs_error[-1] < 4.5 * exact_stderr)
    assert result.mean.shape == (len(sizes), 2)


# ----------------------------------------------------------------------------------
# The experiment script.
# ----------------------------------------------------------------------------------


def load_script():
    path = Path(__file__).parents[1] / "experiments" / "score_function_toy.py"
    spec = importlib.util.spec_from_file_location("score_function_toy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_experiment_script_end_to_end(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "run"
    script.main(["--out", str(out), "--num-samples", "1000"])
    for name in [
        "variance.csv",
        "variance_square.png",
        "variance_exp.png",
        "variance_cos.png",
        "convergence.png",
        "convergence.csv",
        "naive_vs_score.csv",
        "naive_vs_score.png",
        "config.json",
    ]:
        assert (out / name).stat().st_size > 0, name
    with (out / "variance.csv").open() as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == ["cost", "k", "estimator", "param", "variance"]
        rows = list(reader)
    # The k grid the script wrote (read from its output, not assumed): -3 to 10 in
    # steps of 1/4, which holds the values the paper and the report discuss.
    grid = {float(r["k"]) for r in rows if r["cost"] == "square"}
    assert grid == {float(k) for k in np.arange(-12, 41) / 4.0}
    assert {-3.0, 0.5, 1.0, 5.0, 10.0} <= grid
    for cost in sf.COSTS:
        chosen = [r for r in rows if r["cost"] == cost]
        ks = {float(r["k"]) for r in chosen}
        expected = {k for k in grid if k > -0.5} if cost == "exp" else grid
        assert ks == expected, cost
        assert len(chosen) == len(expected) * len(sf.ESTIMATORS) * 2
        assert {r["estimator"] for r in chosen} == set(sf.ESTIMATORS)
        assert {r["param"] for r in chosen} == {"mu", "sigma"}
    row = next(
        r
        for r in rows
        if (r["cost"], float(r["k"]), r["estimator"], r["param"])
        == ("square", 5.0, "pathwise", "sigma")
    )
    assert float(row["variance"]) == pytest.approx(72.0)
    assert all(
        math.isinf(float(r["variance"]))
        for r in rows
        if r["cost"] == "exp" and float(r["k"]) == -0.25
    )
    assert "wrote" in capsys.readouterr().out

    # A second run into the same, now non-empty, directory is refused.
    with pytest.raises(SystemExit) as excinfo:
        script.main(["--out", str(out), "--num-samples", "1000"])
    assert excinfo.value.code == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_experiment_script_refuses_non_empty_out(tmp_path, capsys):
    script = load_script()
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path)])
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
