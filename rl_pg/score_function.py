"""Score-function, pathwise and measure-valued gradients of a Gaussian expectation.

The toy problem of Mohamed, Rosca, Figurnov, Mnih 2020 (JMLR 21(132), "Monte Carlo
Gradient Estimation in Machine Learning"), section 3: for x ~ N(mu, sigma^2) estimate

    eta = grad_theta E_{N(x | mu, sigma^2)}[f(x; k)],    theta = (mu, sigma),

for the costs f(x; k) = (x - k)^2, exp(-k x^2) and cos(k x). With eps = (x - mu) / sigma
~ N(0, 1), the single-draw estimators of (d/dmu, d/dsigma) are

- ``score_function`` (section 4): f(x) grad_theta log N(x | mu, sigma^2)
  = f(x) (eps / sigma, (eps^2 - 1) / sigma);
- ``score_function_baseline`` (section 7, control variates): (f(x) - b_i) times the
  i-th score, with the variance-optimal constant b_i = E[f s_i^2] / E[s_i^2];
- ``pathwise`` (section 5): grad_theta f(mu + sigma eps) = f'(x) (1, eps);
- ``measure_valued`` (section 6, Table 1): c_theta (f(x+) - f(x-)), from the weak
  derivatives of the Gaussian density N = N(x | mu, sigma^2),
      d/dmu N    = (x - mu) / sigma^2 N = 1 / (sigma sqrt(2 pi)) (p+(x) - p-(x)),
                   p+- the law of x+- = mu +- sigma R, R ~ Rayleigh(1)
                   = Weibull(shape 2, scale sqrt 2);
      d/dsigma N = (eps^2 - 1) / sigma N = 1 / sigma (p+(x) - N),
                   p+ the law of x+ = mu + sigma M, M ~ double-sided Maxwell
                   (density m^2 phi(m)), and x- = mu + sigma Z, Z ~ N(0, 1);
  with independent draws for the positive and negative parts;
- ``measure_valued_coupled``: the same with common random numbers (section 7, coupling):
  one R for both x+ and x-, and Z = M U with U ~ Uniform(0, 1), which is exactly
  N(0, 1), so x+ and x- share M.

Single-draw estimators have the signature ``(key, f, mu, sigma) -> [2]`` and are pure
and jittable; batch them with ``jax.vmap`` over keys. The functions that take a cost by
name (``analytic_gradient``, ``estimator_variance``, ...) are Python-level: they
validate their arguments and raise ``ValueError`` where E[f] is infinite (the exp cost
with 1 + 2 k sigma^2 <= 0).

Variances are computed by Gauss quadrature in float64 rather than by sampling; see
``estimator_variances`` for the rules and how their accuracy is checked.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss

Array = jax.Array
ScalarCost = Callable[[Array], Array]
Estimator = Callable[[Array, ScalarCost, Array, Array], Array]

PARAMS = ("mu", "sigma")

# --------------------------------------------------------------------------------------
# Costs and their closed-form Gaussian expectations.
# --------------------------------------------------------------------------------------


def square_cost(x: Array, k: Array) -> Array:
    """f(x; k) = (x - k)^2."""
    return (x - k) ** 2


def exp_cost(x: Array, k: Array) -> Array:
    """f(x; k) = exp(-k x^2)."""
    return jnp.exp(-k * x**2)


def cos_cost(x: Array, k: Array) -> Array:
    """f(x; k) = cos(k x)."""
    return jnp.cos(k * x)


def expected_square_cost(mu: Array, sigma: Array, k: Array) -> Array:
    """E_{N(x | mu, sigma^2)}[(x - k)^2] = (mu - k)^2 + sigma^2."""
    return (mu - k) ** 2 + sigma**2


def expected_exp_cost(mu: Array, sigma: Array, k: Array) -> Array:
    """E_{N(x | mu, sigma^2)}[exp(-k x^2)] = exp(-k mu^2 / d) / sqrt(d).

    d = 1 + 2 k sigma^2.

    Completing the square in the Gaussian integral. For d <= 0 (only possible for
    k < 0) the integrand grows like exp(|k| x^2) at least as fast as the density decays
    and the expectation is infinite: this returns inf there (with a zero gradient, not
    nan). Python-level functions refuse such k with a ValueError.
    """
    d = 1.0 + 2.0 * k * sigma**2
    safe_d = jnp.where(d > 0, d, 1.0)
    value = jnp.exp(-k * mu**2 / safe_d) / jnp.sqrt(safe_d)
    return jnp.where(d > 0, value, jnp.inf)


def expected_cos_cost(mu: Array, sigma: Array, k: Array) -> Array:
    """E_{N(x | mu, sigma^2)}[cos(k x)] = cos(k mu) exp(-k^2 sigma^2 / 2).

    The real part of the Gaussian characteristic function E[exp(i k x)].
    """
    return jnp.cos(k * mu) * jnp.exp(-0.5 * k**2 * sigma**2)


class Cost(NamedTuple):
    """A cost f(x; k) with its closed-form expectation under N(mu, sigma^2)."""

    fn: Callable[[Array, Array], Array]  # (x, k) -> f(x; k), elementwise
    expectation: Callable[[Array, Array, Array], Array]  # (mu, sigma, k) -> E[f]


COSTS: dict[str, Cost] = {
    "square": Cost(square_cost, expected_square_cost),
    "exp": Cost(exp_cost, expected_exp_cost),
    "cos": Cost(cos_cost, expected_cos_cost),
}


def expectation_defined(cost: str, k: float, *, sigma: float = 1.0) -> bool:
    """Whether E[f(x; k)] is finite under N(mu, sigma^2): false only for the exp cost
    with 1 + 2 k sigma^2 <= 0."""
    _check_cost(cost)
    return cost != "exp" or 1.0 + 2.0 * k * sigma**2 > 0


def second_moment_finite(cost: str, k: float, *, sigma: float = 1.0) -> bool:
    """Whether every estimator here has a finite variance at (cost, k, sigma).

    The square and cos costs are polynomially bounded, so yes. For the exp cost every
    estimator's square contains exp(-2 k x^2) (times polynomials) integrated against a
    density with Gaussian tails exp(-(x - mu)^2 / (2 sigma^2)) (the Rayleigh and Maxwell
    densities have the same tails), which is finite iff 1 + 4 k sigma^2 > 0. So for
    -1 / (2 sigma^2) < k <= -1 / (4 sigma^2) the gradient exists but no estimator has a
    finite variance.
    """
    _check_cost(cost)
    return cost != "exp" or 1.0 + 4.0 * k * sigma**2 > 0


def expectation_gradient(
    expectation: Callable[[Array, Array], Array], mu: Array, sigma: Array
) -> Array:
    """Gradient of a closed-form expectation E(mu, sigma), by autodiff.

    Args:
        expectation: (mu, sigma) -> E_{N(x | mu, sigma^2)}[f(x)] (k already bound).
        mu: scalar mean.
        sigma: scalar standard deviation.

    Returns:
        [2] array (dE/dmu, dE/dsigma).
    """
    d_mu, d_sigma = jax.grad(expectation, argnums=(0, 1))(mu, sigma)
    return jnp.stack([d_mu, d_sigma])


def analytic_expectation(
    cost: str, k: float, *, mu: float = 1.0, sigma: float = 1.0
) -> float:
    """Closed-form E_{N(x | mu, sigma^2)}[f(x; k)] (Python-level, float64)."""
    _check_problem(cost, k, sigma)
    with jax.enable_x64(True):
        return float(COSTS[cost].expectation(mu, sigma, k))


def analytic_gradient(
    cost: str, k: float, *, mu: float = 1.0, sigma: float = 1.0
) -> np.ndarray:
    """Exact (d/dmu, d/dsigma) E[f(x; k)]: jax.grad of the closed form, in float64.

    Returns:
        [2] float64 numpy array.
    """
    _check_problem(cost, k, sigma)
    with jax.enable_x64(True):
        expectation = functools.partial(COSTS[cost].expectation, k=k)
        grad = expectation_gradient(expectation, jnp.float64(mu), jnp.float64(sigma))
        return np.asarray(grad)


# --------------------------------------------------------------------------------------
# The Gaussian density and its score.
# --------------------------------------------------------------------------------------


def log_normal_density(x: Array, mu: Array, sigma: Array) -> Array:
    """log N(x | mu, sigma^2) = -(x - mu)^2 / (2 sigma^2) - log(sigma sqrt(2 pi))."""
    return -0.5 * ((x - mu) / sigma) ** 2 - jnp.log(sigma) - 0.5 * math.log(2 * math.pi)


def normal_density(x: Array, mu: Array, sigma: Array) -> Array:
    """N(x | mu, sigma^2)."""
    return jnp.exp(log_normal_density(x, mu, sigma))


def normal_score(x: Array, mu: Array, sigma: Array) -> Array:
    """grad_theta log N(x | mu, sigma^2) = ((x - mu) / sigma^2, ((x - mu)^2 - sigma^2)
    / sigma^3), by autodiff of the log-density (the log-derivative trick).

    Returns:
        [2] array (d/dmu, d/dsigma).
    """
    d_mu, d_sigma = jax.grad(log_normal_density, argnums=(1, 2))(x, mu, sigma)
    return jnp.stack([d_mu, d_sigma])


# --------------------------------------------------------------------------------------
# Single-draw gradient estimators: (key, f, mu, sigma) -> [2] estimate of grad E[f].
# --------------------------------------------------------------------------------------


def score_function(key: Array, f: ScalarCost, mu: Array, sigma: Array) -> Array:
    """Score-function (REINFORCE, log-derivative) estimate from one draw.

        grad_theta E_p[f(x)] = E_p[f(x) grad_theta log p(x; theta)],
        estimate: f(x) grad_theta log N(x | mu, sigma^2), x ~ N(mu, sigma^2).

    Mohamed et al. 2020, section 4. Needs only f(x), not its derivative.

    Args:
        key: PRNG key.
        f: scalar cost x -> f(x).
        mu: scalar mean.
        sigma: scalar standard deviation (> 0).

    Returns:
        [2] estimate of (d/dmu, d/dsigma) E[f].
    """
    x = mu + sigma * jax.random.normal(key)
    return f(x) * normal_score(x, mu, sigma)


def score_function_baseline(
    key: Array,
    f: ScalarCost,
    mu: Array,
    sigma: Array,
    *,
    baseline: Array | None = None,
) -> Array:
    """Score-function estimate with a constant baseline (control variate), one draw.

        estimate_i: (f(x) - b_i) s_i(x),  s = grad_theta log N(x | mu, sigma^2),

    unbiased for any constant b because E[s_i] = 0. Its variance
    E[(f - b_i)^2 s_i^2] - eta_i^2 is minimised by b_i* = E[f s_i^2] / E[s_i^2]
    (set the derivative in b_i to zero); Mohamed et al. 2020, section 7 (control
    variates, baselines).

    Args:
        key: PRNG key.
        f: scalar cost x -> f(x).
        mu: scalar mean.
        sigma: scalar standard deviation (> 0).
        baseline: [2] constants (b_mu, b_sigma). None (default) uses b* computed by
            Gauss-Hermite quadrature of f (``quadrature_optimal_baseline``): a
            deterministic number, so the estimator's variance is not inflated by noise
            in an estimated baseline. A constant never biases the estimate, so a
            quadrature error only costs optimality. ``optimal_baseline`` gives the
            exact b* for the named costs.

    Returns:
        [2] estimate of (d/dmu, d/dsigma) E[f].
    """
    if baseline is None:
        baseline = quadrature_optimal_baseline(f, mu, sigma)
    x = mu + sigma * jax.random.normal(key)
    return (f(x) - baseline) * normal_score(x, mu, sigma)


def pathwise(key: Array, f: ScalarCost, mu: Array, sigma: Array) -> Array:
    """Pathwise (reparameterisation) estimate from one draw.

        x = mu + sigma eps, eps ~ N(0, 1);
        estimate: grad_theta f(mu + sigma eps) = f'(x) (1, eps).

    Mohamed et al. 2020, section 5. Needs f differentiable.

    Args:
        key: PRNG key.
        f: scalar, differentiable cost x -> f(x).
        mu: scalar mean.
        sigma: scalar standard deviation (> 0).

    Returns:
        [2] estimate of (d/dmu, d/dsigma) E[f].
    """
    eps = jax.random.normal(key)
    d_mu, d_sigma = jax.grad(lambda m, s: f(m + s * eps), argnums=(0, 1))(mu, sigma)
    return jnp.stack([d_mu, d_sigma])


def sample_rayleigh(key: Array) -> Array:
    """R ~ Rayleigh(1), density r exp(-r^2 / 2) on r > 0, as sqrt(2 E), E ~ Exp(1).

    Equivalently Weibull(shape 2, scale sqrt 2); Mohamed et al. 2020, Table 1.
    """
    return jnp.sqrt(2.0 * jax.random.exponential(key))


def sample_double_sided_maxwell(key: Array) -> Array:
    """M ~ standard double-sided Maxwell, density m^2 phi(m) on the real line.

    |M| is chi-distributed with 3 degrees of freedom (the length of a standard normal
    3-vector) and the sign is symmetric; E[M^2] = 3, E[M^4] = 15.
    """
    key_norm, key_sign = jax.random.split(key)
    radius = jnp.linalg.norm(jax.random.normal(key_norm, (3,)))
    return jnp.where(jax.random.bernoulli(key_sign), radius, -radius)


def measure_valued(key: Array, f: ScalarCost, mu: Array, sigma: Array) -> Array:
    """Measure-valued (weak-derivative) estimate, independent positive/negative draws.

    grad_theta_i N(x | theta) = c_i (p_i+(x) - p_i-(x)) gives
    grad_theta_i E[f] = c_i (E_{p_i+}[f] - E_{p_i-}[f]); Mohamed et al. 2020, section 6,
    Table 1:

        mu:    c = 1 / (sigma sqrt(2 pi)), x+ = mu + sigma R+, x- = mu - sigma R-,
               R+-  ~ Rayleigh(1) i.i.d.;
        sigma: c = 1 / sigma, x+ = mu + sigma M, M ~ double-sided Maxwell,
               x- = mu + sigma Z, Z ~ N(0, 1) independent of M.

    Each component uses its own draws (four evaluations of f in all).

    Args:
        key: PRNG key.
        f: scalar cost x -> f(x).
        mu: scalar mean.
        sigma: scalar standard deviation (> 0).

    Returns:
        [2] estimate of (d/dmu, d/dsigma) E[f].
    """
    key_mu_pos, key_mu_neg, key_sigma_pos, key_sigma_neg = jax.random.split(key, 4)
    c_mu = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    d_mu = c_mu * (
        f(mu + sigma * sample_rayleigh(key_mu_pos))
        - f(mu - sigma * sample_rayleigh(key_mu_neg))
    )
    d_sigma = (
        f(mu + sigma * sample_double_sided_maxwell(key_sigma_pos))
        - f(mu + sigma * jax.random.normal(key_sigma_neg))
    ) / sigma
    return jnp.stack([d_mu, d_sigma])


def measure_valued_coupled(key: Array, f: ScalarCost, mu: Array, sigma: Array) -> Array:
    """Measure-valued estimate with coupled (common random number) parts, one draw.

    As ``measure_valued`` but the two parts share their randomness (Mohamed et al. 2020,
    section 7, coupling and common random numbers):

        mu:    x+- = mu +- sigma R with a single R ~ Rayleigh(1);
        sigma: x+ = mu + sigma M, x- = mu + sigma M U, M ~ double-sided Maxwell,
               U ~ Uniform(0, 1). M U ~ N(0, 1) exactly (|M U| has density
               int_x^inf sqrt(2/pi) m exp(-m^2/2) dm = sqrt(2/pi) exp(-x^2/2)), so
               x- has the right marginal and the estimate stays unbiased.

    Coupling lowers the variance when f(x+) and f(x-) are positively correlated; for the
    mean the mirrored pair mu +- sigma R is negatively correlated wherever f is
    monotone, and coupling then raises the variance (see the square cost).

    Args:
        key: PRNG key.
        f: scalar cost x -> f(x).
        mu: scalar mean.
        sigma: scalar standard deviation (> 0).

    Returns:
        [2] estimate of (d/dmu, d/dsigma) E[f].
    """
    key_rayleigh, key_maxwell, key_uniform = jax.random.split(key, 3)
    radius = sample_rayleigh(key_rayleigh)
    maxwell = sample_double_sided_maxwell(key_maxwell)
    uniform = jax.random.uniform(key_uniform)
    c_mu = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    d_mu = c_mu * (f(mu + sigma * radius) - f(mu - sigma * radius))
    d_sigma = (f(mu + sigma * maxwell) - f(mu + sigma * maxwell * uniform)) / sigma
    return jnp.stack([d_mu, d_sigma])


ESTIMATORS: dict[str, Estimator] = {
    "score_function": score_function,
    "score_function_baseline": score_function_baseline,
    "pathwise": pathwise,
    "measure_valued": measure_valued,
    "measure_valued_coupled": measure_valued_coupled,
}


def naive_density_gradient(key: Array, f: ScalarCost, mu: Array, sigma: Array) -> Array:
    """The seed's warning: f(x) grad_theta p(x; theta), x ~ p, from one draw.

    NOT an estimate of grad E_p[f]: its mean is E_p[f grad_theta p] =
    int f(x) p(x) grad_theta p(x) dx, not int f(x) grad_theta p(x) dx. Dividing by p
    (the log-derivative trick, ``score_function``) fixes it. See ``naive_limit``.

    Returns:
        [2] array f(x) (d/dmu, d/dsigma) N(x | mu, sigma^2).
    """
    x = mu + sigma * jax.random.normal(key)
    d_mu, d_sigma = jax.grad(normal_density, argnums=(1, 2))(x, mu, sigma)
    return f(x) * jnp.stack([d_mu, d_sigma])


# --------------------------------------------------------------------------------------
# Quadrature rules (numpy float64) and expectations under the sampling distributions.
# --------------------------------------------------------------------------------------

NUM_NODES = 300  # Gauss-Hermite nodes; numpy's hermegauss overflows above ~350.
NUM_UNIFORM_NODES = 150  # Gauss-Legendre nodes on [0, 1] for the coupled sigma part.
_LOG_MIN_WEIGHT = -115.0  # drop 2-D nodes with weight < e^-115 ~ 1e-50 of the mass


class _Rules(NamedTuple):
    normal_nodes: np.ndarray  # [N] probabilists' Gauss-Hermite nodes
    normal_log_weights: np.ndarray  # [N] log weights, sum of weights = 1
    plane_nodes: np.ndarray  # [P, 2] tensor-product nodes, pruned
    plane_log_weights: np.ndarray  # [P]
    uniform_nodes: np.ndarray  # [U] Gauss-Legendre nodes on [0, 1]
    uniform_weights: np.ndarray  # [U], sum to 1


@functools.cache
def _rules(num_nodes: int, num_uniform_nodes: int) -> _Rules:
    nodes, weights = hermegauss(num_nodes)
    log_weights = np.log(weights / weights.sum())
    plane_nodes = np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2)
    plane_log_weights = (log_weights[:, None] + log_weights[None, :]).reshape(-1)
    keep = plane_log_weights > _LOG_MIN_WEIGHT
    uniform_nodes, uniform_weights = leggauss(num_uniform_nodes)
    return _Rules(
        normal_nodes=nodes,
        normal_log_weights=log_weights,
        plane_nodes=plane_nodes[keep],
        plane_log_weights=plane_log_weights[keep],
        uniform_nodes=0.5 * (uniform_nodes + 1.0),
        uniform_weights=0.5 * uniform_weights,
    )


def _pad_rules(rules: _Rules, like: _Rules) -> _Rules:
    """Pad ``rules`` with zero-weight nodes to the array shapes of ``like``, so both
    run through one compiled ``_variance_grid`` (compiling costs more than running)."""

    def pad(array: np.ndarray, target: np.ndarray, value: float) -> np.ndarray:
        if array.shape[0] > target.shape[0]:
            raise ValueError("the rule to pad is larger than the target")
        widths = [(0, target.shape[0] - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
        return np.pad(array, widths, constant_values=value)

    return _Rules(
        normal_nodes=pad(rules.normal_nodes, like.normal_nodes, 0.0),
        normal_log_weights=pad(rules.normal_log_weights, like.normal_nodes, -np.inf),
        plane_nodes=pad(rules.plane_nodes, like.plane_nodes, 0.0),
        plane_log_weights=pad(rules.plane_log_weights, like.plane_nodes, -np.inf),
        uniform_nodes=pad(rules.uniform_nodes, like.uniform_nodes, 0.5),
        uniform_weights=pad(rules.uniform_weights, like.uniform_nodes, 0.0),
    )


def _weighted_sum(log_weights: Array, values: Array) -> Array:
    """sum_i w_i values[i] over the leading axis. Nodes whose weight is below 1e-300
    carry no mass; they are masked so an overflowed integrand there cannot turn the sum
    into inf * 0 = nan."""
    keep = log_weights > -690.0
    weights = jnp.where(keep, jnp.exp(log_weights), 0.0)
    weights = weights.reshape(weights.shape + (1,) * (values.ndim - 1))
    keep = keep.reshape(weights.shape)
    return jnp.sum(jnp.where(keep, weights * values, 0.0), axis=0)


def _normal_mean(g: Callable[[Array], Array], rules: _Rules, scale: Array) -> Array:
    """E_{eps ~ N(0, 1)}[g(eps)] by Gauss-Hermite quadrature in eps = scale * y.

    int g(eps) phi(eps) deps = int g(a y) [a phi(a y) / phi(y)] phi(y) dy: the rule in y
    with weights w_i a exp(-(a^2 - 1) y_i^2 / 2) is exact for any a > 0; a > 1 spreads
    the nodes to cover an integrand with heavier-than-Gaussian tails.
    """
    y = rules.normal_nodes
    log_weights = (
        rules.normal_log_weights + jnp.log(scale) - 0.5 * (scale**2 - 1.0) * y**2
    )
    return _weighted_sum(log_weights, g(scale * y))


def _maxwell_mean(g: Callable[[Array], Array], rules: _Rules, scale: Array) -> Array:
    """E_M[g(M)], M ~ double-sided Maxwell = E_{eps ~ N(0, 1)}[eps^2 g(eps)]."""
    return _normal_mean(lambda eps: _times(eps**2, g(eps)), rules, scale)


def _rayleigh_mean(g: Callable[[Array], Array], rules: _Rules, scale: Array) -> Array:
    """E_R[g(R)], R ~ Rayleigh(1), by smooth Gaussian quadratures only.

    Split g into even and odd parts. R = |z| for z ~ N(0, I_2), and the even part
    g_e(|z|) is smooth in z, so E[g_e(R)] is a 2-D Gauss-Hermite integral. The odd part:
    int_0^inf g_o(r) r exp(-r^2/2) dr = (1/2) int_R g_o(r) r exp(-r^2/2) dr
    = sqrt(pi / 2) E_eps[eps g(eps)] (the even part of g integrates to 0 against eps).
    A rule on [0, inf) would instead see the kink of g at r = 0 in the 1-D variable.
    """
    y = rules.plane_nodes
    log_weights = (
        rules.plane_log_weights
        + 2.0 * jnp.log(scale)
        - 0.5 * (scale**2 - 1.0) * jnp.sum(y**2, axis=-1)
    )
    radius = scale * jnp.sqrt(jnp.sum(y**2, axis=-1))
    even = _weighted_sum(log_weights, 0.5 * (g(radius) + g(-radius)))
    odd = _normal_mean(lambda eps: _times(eps, g(eps)), rules, scale)
    return even + math.sqrt(0.5 * math.pi) * odd


def _uniform_mean(g: Callable[[Array], Array], rules: _Rules) -> Array:
    """E_{U ~ Uniform(0, 1)}[g(U)] by Gauss-Legendre; g maps [U] -> [U, ...]."""
    values = g(rules.uniform_nodes)
    weights = rules.uniform_weights.reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.sum(weights * values, axis=0)


def _times(a: Array, b: Array) -> Array:
    """a[i] * b[i, ...]: broadcast a leading-axis vector against b."""
    return a.reshape(a.shape + (1,) * (b.ndim - a.ndim)) * b


def _tail_scale(cost: str, k: Array, sigma: Array) -> Array:
    """Quadrature scale a for _normal_mean and _rayleigh_mean.

    For the exp cost with k < 0 the squared estimators grow like exp(-2 k sigma^2 eps^2)
    against phi(eps); a^2 = 1 / (1 + 4 k sigma^2) makes the y^2 terms cancel, leaving a
    polynomial times exp(linear in y), which Gauss-Hermite integrates well.
    """
    if cost != "exp":
        return jnp.ones_like(k)
    return 1.0 / jnp.sqrt(1.0 + 4.0 * jnp.minimum(k, 0.0) * sigma**2)


_BASELINE_NODES = 300
_BASELINE_MIN_WEIGHT = 1e-30  # float32-safe: keeps |eps| <~ 11.5


@functools.cache
def _baseline_rule() -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = hermegauss(_BASELINE_NODES)
    weights = weights / weights.sum()
    keep = weights > _BASELINE_MIN_WEIGHT
    return nodes[keep], weights[keep]


def quadrature_optimal_baseline(f: ScalarCost, mu: Array, sigma: Array) -> Array:
    """Variance-optimal constant baselines b_i* = E[f s_i^2] / E[s_i^2] by quadrature.

    With s = ((eps / sigma), (eps^2 - 1) / sigma), E[s_mu^2] = 1 / sigma^2 and
    E[s_sigma^2] = 2 / sigma^2, so

        b_mu = E[f(x) eps^2],   b_sigma = E[f(x) (eps^2 - 1)^2] / 2,

    computed with a 300-node Gauss-Hermite rule from which nodes of weight < 1e-30 are
    dropped (|eps| <~ 11.5), which keeps the evaluation finite in float32. Jittable and
    works for any vectorisable f; for very heavy-tailed f (the exp cost near
    k = -1 / (2 sigma^2)) it is inaccurate, which costs optimality but never bias.

    Returns:
        [2] array (b_mu, b_sigma).
    """
    nodes, weights = _baseline_rule()
    eps = jnp.asarray(nodes)
    weights = jnp.asarray(weights)
    values = jax.vmap(f)(mu + sigma * eps)
    b_mu = jnp.sum(weights * values * eps**2)
    b_sigma = 0.5 * jnp.sum(weights * values * (eps**2 - 1.0) ** 2)
    return jnp.stack([b_mu, b_sigma])


def _stein_baseline(
    expectation: Callable[[Array, Array], Array], mu: Array, sigma: Array
) -> Array:
    """Exact b* from the closed form F(mu, sigma) = E[f], via Gaussian integration by
    parts E[He_n(eps) g(eps)] = E[g^(n)(eps)] (He_2 = eps^2 - 1, He_4 = eps^4 - 6 eps^2
    + 3) and d^n/deps^n f(mu + sigma eps) = sigma^n f^(n)(x), E[f^(n)(x)] = d^n F/dmu^n:

        b_mu    = E[f eps^2]             = F + sigma^2 F''
        b_sigma = E[f (eps^2 - 1)^2] / 2 = F + 2 sigma^2 F'' + sigma^4 F'''' / 2

    using (eps^2 - 1)^2 = He_4 + 4 He_2 + 2; primes are d/dmu.
    """
    d2 = jax.grad(jax.grad(expectation))
    d4 = jax.grad(jax.grad(d2))
    value = expectation(mu, sigma)
    second = d2(mu, sigma)
    fourth = d4(mu, sigma)
    b_mu = value + sigma**2 * second
    b_sigma = value + 2.0 * sigma**2 * second + 0.5 * sigma**4 * fourth
    return jnp.stack([b_mu, b_sigma])


def optimal_baseline(
    cost: str, k: float, *, mu: float = 1.0, sigma: float = 1.0
) -> np.ndarray:
    """Exact variance-optimal constant baselines (b_mu, b_sigma) for a named cost.

    See ``_stein_baseline``; e.g. the square cost gives b_mu = (mu - k)^2 + 3 sigma^2
    and b_sigma = (mu - k)^2 + 5 sigma^2.

    Returns:
        [2] float64 numpy array.
    """
    _check_problem(cost, k, sigma)
    with jax.enable_x64(True):
        expectation = functools.partial(COSTS[cost].expectation, k=k)
        return np.asarray(
            _stein_baseline(expectation, jnp.float64(mu), jnp.float64(sigma))
        )


# --------------------------------------------------------------------------------------
# Exact variances of the single-draw estimators.
# --------------------------------------------------------------------------------------


class _Problem(NamedTuple):
    f: Callable[[Array], Array]  # vectorised cost
    df: Callable[[Array], Array]  # vectorised f'
    expectation: Callable[[Array, Array], Array]
    grad: Array  # [2] exact gradient
    mu: Array
    sigma: Array
    scale: Array  # quadrature tail scale


def _score_variance(problem: _Problem, rules: _Rules, baseline: Array) -> Array:
    mu, sigma = problem.mu, problem.sigma

    def squared_error(eps: Array) -> Array:
        score = jnp.stack([eps, eps**2 - 1.0], axis=-1) / sigma
        estimate = (problem.f(mu + sigma * eps)[:, None] - baseline) * score
        return (estimate - problem.grad) ** 2

    return _normal_mean(squared_error, rules, problem.scale)


def _score_function_variance(problem: _Problem, rules: _Rules) -> Array:
    return _score_variance(problem, rules, jnp.zeros(2))


def _score_function_baseline_variance(problem: _Problem, rules: _Rules) -> Array:
    baseline = _stein_baseline(problem.expectation, problem.mu, problem.sigma)
    return _score_variance(problem, rules, baseline)


def _pathwise_variance(problem: _Problem, rules: _Rules) -> Array:
    mu, sigma = problem.mu, problem.sigma

    def squared_error(eps: Array) -> Array:
        slope = problem.df(mu + sigma * eps)
        estimate = jnp.stack([slope, slope * eps], axis=-1)
        return (estimate - problem.grad) ** 2

    return _normal_mean(squared_error, rules, problem.scale)


def _variance_of(
    mean: Callable[[Callable[[Array], Array]], Array], h: Callable[[Array], Array]
) -> Array:
    """Var[h(X)] = E[(h(X) - E[h(X)])^2] in two passes (no cancellation)."""
    centre = mean(h)
    return mean(lambda v: (h(v) - centre) ** 2)


def _measure_valued_variance(problem: _Problem, rules: _Rules) -> Array:
    # Independent parts: Var = c^2 (Var f(x+) + Var f(x-)).
    mu, sigma, scale = problem.mu, problem.sigma, problem.scale
    rayleigh = functools.partial(_rayleigh_mean, rules=rules, scale=scale)
    maxwell = functools.partial(_maxwell_mean, rules=rules, scale=scale)
    normal = functools.partial(_normal_mean, rules=rules, scale=scale)
    var_mu = (
        _variance_of(rayleigh, lambda r: problem.f(mu + sigma * r))
        + _variance_of(rayleigh, lambda r: problem.f(mu - sigma * r))
    ) / (2.0 * math.pi * sigma**2)
    var_sigma = (
        _variance_of(maxwell, lambda m: problem.f(mu + sigma * m))
        + _variance_of(normal, lambda z: problem.f(mu + sigma * z))
    ) / sigma**2
    return jnp.stack([var_mu, var_sigma])


def _measure_valued_coupled_variance(problem: _Problem, rules: _Rules) -> Array:
    mu, sigma, scale = problem.mu, problem.sigma, problem.scale
    c_mu = 1.0 / (sigma * math.sqrt(2.0 * math.pi))

    def mu_error(r: Array) -> Array:
        estimate = c_mu * (problem.f(mu + sigma * r) - problem.f(mu - sigma * r))
        return (estimate - problem.grad[0]) ** 2

    def sigma_error(m: Array) -> Array:
        def given_u(u: Array) -> Array:  # [U] -> [U, M]
            x_neg = mu + sigma * u[:, None] * m[None, :]
            estimate = (problem.f(mu + sigma * m)[None, :] - problem.f(x_neg)) / sigma
            return (estimate - problem.grad[1]) ** 2

        return _uniform_mean(given_u, rules)

    var_mu = _rayleigh_mean(mu_error, rules, scale)
    var_sigma = _maxwell_mean(sigma_error, rules, scale)
    return jnp.stack([var_mu, var_sigma])


_VARIANCES: dict[str, Callable[[_Problem, _Rules], Array]] = {
    "score_function": _score_function_variance,
    "score_function_baseline": _score_function_baseline_variance,
    "pathwise": _pathwise_variance,
    "measure_valued": _measure_valued_variance,
    "measure_valued_coupled": _measure_valued_coupled_variance,
}


@functools.partial(jax.jit, static_argnames=("cost", "estimator"))
def _variance_grid(
    ks: Array, mu: Array, sigma: Array, rules: _Rules, *, cost: str, estimator: str
) -> tuple[Array, Array]:
    """Variances [K, 2] and the round-off floors [K] below which they are zero."""

    def one(k: Array) -> tuple[Array, Array]:
        cost_fn = functools.partial(COSTS[cost].fn, k=k)
        problem = _Problem(
            f=cost_fn,
            df=jnp.vectorize(jax.grad(cost_fn)),
            expectation=functools.partial(COSTS[cost].expectation, k=k),
            grad=expectation_gradient(
                functools.partial(COSTS[cost].expectation, k=k), mu, sigma
            ),
            mu=mu,
            sigma=sigma,
            scale=_tail_scale(cost, k, sigma),
        )
        # A variance that is exactly zero (e.g. a constant f at k = 0) comes out as
        # (float64 round-off of the estimate)^2 ~ 1e-32 E[estimate^2]; this floor,
        # 1e-20 times the scale of the squared estimates, separates the two.
        scale = _normal_mean(
            lambda eps: (
                problem.f(mu + sigma * eps) ** 2 / sigma**2
                + problem.df(mu + sigma * eps) ** 2
            ),
            rules,
            problem.scale,
        )
        return _VARIANCES[estimator](problem, rules), _ROUNDOFF * (1.0 + scale)

    return jax.vmap(one)(ks)


_ROUNDOFF = 1e-20


_K_BLOCK = 64  # k values per jitted call, padded: one compilation per rule


def _variance_blocks(
    ks: np.ndarray, mu: float, sigma: float, rules: _Rules, cost: str, estimator: str
) -> tuple[np.ndarray, np.ndarray]:
    """``_variance_grid`` over ks in padded blocks of 64: [K, 2] and [K]."""
    variances, floors = [], []
    with jax.enable_x64(True):
        for start in range(0, ks.size, _K_BLOCK):
            block = ks[start : start + _K_BLOCK]
            padded = np.pad(block, (0, _K_BLOCK - block.size), mode="edge")
            variance, floor = _variance_grid(
                jnp.asarray(padded),
                jnp.float64(mu),
                jnp.float64(sigma),
                rules,
                cost=cost,
                estimator=estimator,
            )
            variances.append(np.asarray(variance)[: block.size])
            floors.append(np.asarray(floor)[: block.size])
    return np.concatenate(variances), np.concatenate(floors)


VARIANCE_RTOL = 1e-3  # agreement required between the two quadrature resolutions


def estimator_variances(
    cost: str,
    k: float | Sequence[float] | np.ndarray,
    estimator: str,
    *,
    mu: float = 1.0,
    sigma: float = 1.0,
    num_nodes: int = NUM_NODES,
) -> np.ndarray:
    """Exact variance of one draw of an estimator, for both parameters.

    Var[estimate_i] = E[(estimate_i - eta_i)^2] with eta the exact gradient (every
    estimator here is unbiased), written as an integral over the draw and computed by
    Gauss quadrature in float64 (no sampling noise):

    - score function, baseline (exact b*, ``optimal_baseline``), pathwise: 1-D
      Gauss-Hermite in eps;
    - measure-valued, independent parts: c^2 (Var f(x+) + Var f(x-)); Maxwell
      expectations are E[eps^2 g(eps)] (1-D Gauss-Hermite), Rayleigh ones use the
      even/odd split of ``_rayleigh_mean`` (2-D and 1-D Gauss-Hermite);
    - measure-valued, coupled: Rayleigh as above; the sigma part is a Maxwell
      expectation of a Gauss-Legendre average over U in [0, 1].

    Accuracy: every call evaluates the rules at ``num_nodes`` and at 4/5 of it and
    raises ``ArithmeticError`` unless the two agree to 0.1% relative, so a returned
    value is converged well within 1%. Values below the float64 round-off floor
    1e-20 (1 + E[f(x)^2] / sigma^2 + E[f'(x)^2]) are returned as exactly 0 (they are
    ~1e-32 where the true variance is 0, e.g. f constant at k = 0). The 300-node
    default resolves the oscillations of cos(k x) up to |k| sigma ~ 12 and the narrow
    peak of exp(-k x^2) up to k sigma^2 ~ 10; beyond, the check raises. On the
    experiment grid (k in [-3, 10], mu = sigma = 1) 300 and 240 nodes agree to
    < 1e-13 relative for the square and cos costs and < 6e-4 for the exp cost (worst
    at k = 10, where the 300-node value matches the closed-form score-function
    variance to 2e-6). ``tests/test_score_function.py`` also checks closed forms
    and brute-force Monte Carlo variances with their standard errors.

    Args:
        cost: "square", "exp" or "cos".
        k: scalar or 1-D sequence of cost parameters.
        estimator: a key of ``ESTIMATORS``.
        mu: mean.
        sigma: standard deviation (> 0).
        num_nodes: Gauss-Hermite nodes per dimension (<= 350).

    Returns:
        float64 numpy array, [2] for scalar k or [K, 2] for K values: (Var d/dmu,
        Var d/dsigma). inf where the variance is infinite (see
        ``second_moment_finite``).

    Raises:
        ValueError: unknown names, sigma <= 0, or E[f] infinite at some k.
        ArithmeticError: the quadrature failed its convergence check.
    """
    _check_estimator(estimator)
    scalar = np.ndim(k) == 0
    ks = np.atleast_1d(np.asarray(k, dtype=np.float64))
    for k_value in ks:
        _check_problem(cost, float(k_value), sigma)
    if not 16 <= num_nodes <= 350:
        raise ValueError(f"num_nodes must be in [16, 350], got {num_nodes}")
    finite = np.array([second_moment_finite(cost, kv, sigma=sigma) for kv in ks])
    result = np.full((ks.size, 2), np.inf)
    if finite.any():
        coarse_nodes = int(round(0.8 * num_nodes))
        coarse_uniform = int(round(0.8 * NUM_UNIFORM_NODES))
        fine_rules = _rules(num_nodes, NUM_UNIFORM_NODES)
        coarse_rules = _pad_rules(_rules(coarse_nodes, coarse_uniform), fine_rules)
        fine, floor = _variance_blocks(
            ks[finite], mu, sigma, fine_rules, cost, estimator
        )
        coarse, _ = _variance_blocks(
            ks[finite], mu, sigma, coarse_rules, cost, estimator
        )
        floor = floor[:, None]
        converged = np.isfinite(fine) & (
            np.abs(fine - coarse) <= VARIANCE_RTOL * np.abs(fine) + floor
        )
        if not converged.all():
            bad = ks[finite][~converged.all(axis=1)]
            raise ArithmeticError(
                f"quadrature did not converge for cost={cost!r}, "
                f"estimator={estimator!r}, k={bad.tolist()} (num_nodes={num_nodes}); "
                "the integrand is too oscillatory or too heavy-tailed for the rule"
            )
        result[finite] = np.where(fine > floor, fine, 0.0)
    return result[0] if scalar else result


def estimator_variance(
    cost: str,
    k: float | Sequence[float] | np.ndarray,
    estimator: str,
    param: str,
    *,
    mu: float = 1.0,
    sigma: float = 1.0,
    num_nodes: int = NUM_NODES,
) -> float | np.ndarray:
    """Exact variance of one draw of ``estimator`` for ``param`` ("mu" or "sigma").

    See ``estimator_variances`` for the method and its accuracy (converged to 0.1%,
    checked on every call). Returns a float for scalar k, else a [K] array.
    """
    _check_param(param)
    variances = estimator_variances(
        cost, k, estimator, mu=mu, sigma=sigma, num_nodes=num_nodes
    )
    column = variances[..., PARAMS.index(param)]
    return float(column) if np.ndim(column) == 0 else column


def naive_limit(
    cost: str, k: float, *, mu: float = 1.0, sigma: float = 1.0
) -> np.ndarray:
    """What the naive average (1/n) sum f(x_i) grad_theta p(x_i) converges to.

        E_p[f grad_theta p] = int f(x) p(x) grad_theta p(x) dx
                            = E_eps[f(x) p(x) s(x)],  s = grad_theta log p,

    by 300-node Gauss-Hermite quadrature in float64. Compare ``analytic_gradient``,
    int f grad_theta p dx. For the square cost at sigma = 1 this is
    ((mu - k) / (2 sqrt pi), (1/4 - (mu - k)^2 / 2) / (2 sqrt pi)).

    Returns:
        [2] float64 numpy array.
    """
    _check_problem(cost, k, sigma)
    nodes, log_weights = _rules(NUM_NODES, NUM_UNIFORM_NODES)[:2]
    with jax.enable_x64(True):
        mu64, sigma64 = jnp.float64(mu), jnp.float64(sigma)
        x = mu64 + sigma64 * jnp.asarray(nodes)
        f = COSTS[cost].fn(x, k)
        density = normal_density(x, mu64, sigma64)
        score = jax.vmap(normal_score, in_axes=(0, None, None))(x, mu64, sigma64)
        integrand = (f * density)[:, None] * score
        return np.asarray(_weighted_sum(jnp.asarray(log_weights), integrand))


# --------------------------------------------------------------------------------------
# Monte Carlo: sampling, moments, unbiasedness, convergence, the seed's warning.
# --------------------------------------------------------------------------------------


_DRAWS: dict[str, Estimator] = {**ESTIMATORS, "naive": naive_density_gradient}
SAMPLE_CHUNK = 2**16  # draws per jitted call


@functools.partial(jax.jit, static_argnames=("estimator",))
def _sample_chunk(
    key: Array, cost_index: Array, k: Array, mu: Array, sigma: Array, *, estimator: str
) -> Array:
    # The cost is a traced switch, not a static argument: compiling the vmapped
    # sampler costs seconds on CPU, and this way it happens once per estimator.
    branches = [functools.partial(cost.fn, k=k) for cost in COSTS.values()]

    def f(x: Array) -> Array:
        return jax.lax.switch(cost_index, branches, x)

    draw = _DRAWS[estimator]
    keys = jax.random.split(key, SAMPLE_CHUNK)
    return jax.vmap(lambda key_i: draw(key_i, f, mu, sigma))(keys)


def _sample_chunks(
    estimator: str,
    cost: str,
    k: float,
    *,
    key: Array,
    num_samples: int,
    mu: float,
    sigma: float,
):
    """Yield [<= SAMPLE_CHUNK, 2] float64 blocks, block c drawn with fold_in(key, c)."""
    if estimator != "naive":
        _check_estimator(estimator)
    _check_problem(cost, k, sigma)
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    args = (
        jnp.int32(list(COSTS).index(cost)),
        jnp.float32(k),
        jnp.float32(mu),
        jnp.float32(sigma),
    )
    for c in range(-(-num_samples // SAMPLE_CHUNK)):
        block = _sample_chunk(jax.random.fold_in(key, c), *args, estimator=estimator)
        size = min(SAMPLE_CHUNK, num_samples - c * SAMPLE_CHUNK)
        yield np.asarray(block[:size], dtype=np.float64)


def sample_estimates(
    estimator: str,
    cost: str,
    k: float,
    *,
    key: Array,
    num_samples: int,
    mu: float = 1.0,
    sigma: float = 1.0,
) -> np.ndarray:
    """``num_samples`` independent single-draw estimates.

    Drawn in float32 by a jitted, vmapped estimator in blocks of ``SAMPLE_CHUNK``
    (block c from ``jax.random.fold_in(key, c)``, one key per draw from
    ``jax.random.split``), returned in float64 for accumulation.

    Args:
        estimator: a key of ``ESTIMATORS``, or "naive" for ``naive_density_gradient``.
        cost: "square", "exp" or "cos".
        k: cost parameter.
        key: PRNG key.
        num_samples: number of draws (>= 2).
        mu: mean.
        sigma: standard deviation (> 0).

    Returns:
        [num_samples, 2] float64 array of (d/dmu, d/dsigma) estimates.
    """
    return np.concatenate(
        list(
            _sample_chunks(
                estimator,
                cost,
                k,
                key=key,
                num_samples=num_samples,
                mu=mu,
                sigma=sigma,
            )
        )
    )


class MonteCarloMoments(NamedTuple):
    """Sample moments of single-draw estimates; every field is [2] (mu, sigma)."""

    mean: np.ndarray
    variance: np.ndarray  # unbiased sample variance
    mean_stderr: np.ndarray  # sqrt(variance / n)
    variance_stderr: np.ndarray  # sqrt((m4 - variance^2) / n), m4 = 4th central moment
    num_samples: int


def monte_carlo_moments(
    estimator: str,
    cost: str,
    k: float,
    *,
    key: Array,
    num_samples: int,
    mu: float = 1.0,
    sigma: float = 1.0,
) -> MonteCarloMoments:
    """Brute-force mean and variance of an estimator, with their standard errors.

    Uses the same draws as ``sample_estimates`` (same key), accumulated block by block
    in float64 as power sums of (estimate - shift), the shift being the first block's
    mean (so the raw-to-central moment conversion does not cancel), so 10^7 draws need
    no more memory than one block. The variance's standard error is the delta-method
    sqrt((m4 - var^2) / n): estimating a variance to 1% takes n ~ 10^4 (kurtosis - 1)
    draws.
    """
    shift = None
    sums = np.zeros((4, 2))
    for block in _sample_chunks(
        estimator, cost, k, key=key, num_samples=num_samples, mu=mu, sigma=sigma
    ):
        if shift is None:
            shift = block.mean(axis=0)
        centred = block - shift
        sums += [(centred**p).sum(axis=0) for p in (1, 2, 3, 4)]
    r1, r2, r3, r4 = sums / num_samples  # raw moments about the shift
    m2 = r2 - r1**2
    m4 = r4 - 4 * r1 * r3 + 6 * r1**2 * r2 - 3 * r1**4
    variance = m2 * num_samples / (num_samples - 1)
    return MonteCarloMoments(
        mean=shift + r1,
        variance=variance,
        mean_stderr=np.sqrt(variance / num_samples),
        variance_stderr=np.sqrt(np.maximum(m4 - m2**2, 0.0) / num_samples),
        num_samples=num_samples,
    )


class UnbiasednessCheck(NamedTuple):
    """Monte Carlo mean of an estimator against the exact gradient; fields are [2]."""

    mean: np.ndarray
    stderr: np.ndarray
    analytic: np.ndarray
    z_score: np.ndarray  # (mean - analytic) / stderr; |z| <~ 4 if unbiased


def unbiasedness_check(
    estimator: str,
    cost: str,
    k: float,
    *,
    key: Array,
    num_samples: int,
    mu: float = 1.0,
    sigma: float = 1.0,
) -> UnbiasednessCheck:
    """Compare the mean of ``num_samples`` draws with ``analytic_gradient``."""
    moments = monte_carlo_moments(
        estimator, cost, k, key=key, num_samples=num_samples, mu=mu, sigma=sigma
    )
    analytic = analytic_gradient(cost, k, mu=mu, sigma=sigma)
    stderr = moments.mean_stderr
    z_score = np.where(
        stderr > 0, (moments.mean - analytic) / np.maximum(stderr, 1e-300), 0.0
    )
    return UnbiasednessCheck(moments.mean, stderr, analytic, z_score)


class Convergence(NamedTuple):
    """Running Monte Carlo means over one stream of draws."""

    sample_sizes: np.ndarray  # [S]
    mean: np.ndarray  # [S, 2] mean of the first n draws
    abs_error: np.ndarray  # [S, 2] |mean - analytic|
    stderr: np.ndarray  # [S, 2] sample standard deviation of the first n / sqrt(n)
    analytic: np.ndarray  # [2]


def _prefix_means(samples: np.ndarray, sample_sizes: np.ndarray):
    samples = np.asarray(samples, dtype=np.float64)
    sums = np.cumsum(samples, axis=0)[sample_sizes - 1]
    squares = np.cumsum(samples**2, axis=0)[sample_sizes - 1]
    n = sample_sizes[:, None].astype(np.float64)
    mean = sums / n
    variance = np.maximum(squares / n - mean**2, 0.0) * n / np.maximum(n - 1, 1)
    return mean, np.sqrt(variance / n)


def mean_convergence(
    estimator: str,
    cost: str,
    k: float,
    *,
    key: Array,
    sample_sizes: Sequence[int],
    mu: float = 1.0,
    sigma: float = 1.0,
) -> Convergence:
    """Error of the n-draw Monte Carlo mean, |mean_n - eta|, and its standard error.

    One stream of max(sample_sizes) draws; mean_n averages its first n, so the curves
    are those of a single growing experiment. Expect abs_error ~ stderr ~ n^-1/2.
    """
    sizes = np.asarray(sample_sizes, dtype=np.int64)
    samples = sample_estimates(
        estimator, cost, k, key=key, num_samples=int(sizes.max()), mu=mu, sigma=sigma
    )
    mean, stderr = _prefix_means(samples, sizes)
    analytic = analytic_gradient(cost, k, mu=mu, sigma=sigma)
    return Convergence(sizes, mean, np.abs(mean - analytic), stderr, analytic)


class NaiveComparison(NamedTuple):
    """The seed's warning: the naive average against the score-function average."""

    sample_sizes: np.ndarray  # [S]
    naive_mean: np.ndarray  # [S, 2] (1/n) sum f(x_i) grad_theta p(x_i)
    score_mean: np.ndarray  # [S, 2] (1/n) sum f(x_i) grad_theta log p(x_i)
    naive_limit: np.ndarray  # [2] E_p[f grad_theta p], where the naive mean goes
    analytic: np.ndarray  # [2] grad_theta E_p[f], where the score mean goes


def naive_vs_score(
    cost: str,
    k: float,
    *,
    key: Array,
    sample_sizes: Sequence[int],
    mu: float = 1.0,
    sigma: float = 1.0,
) -> NaiveComparison:
    """Running means of the naive and the score-function averages on the same draws.

    Both multiply f(x_i) by a gradient of the density at the same x_i ~ p; only the
    score-function one (grad log p = grad p / p) converges to grad E_p[f].
    """
    sizes = np.asarray(sample_sizes, dtype=np.int64)
    n = int(sizes.max())
    # The same key gives the same x_i to both estimators (each draws one normal).
    naive = sample_estimates(
        "naive", cost, k, key=key, num_samples=n, mu=mu, sigma=sigma
    )
    score = sample_estimates(
        "score_function", cost, k, key=key, num_samples=n, mu=mu, sigma=sigma
    )
    return NaiveComparison(
        sample_sizes=sizes,
        naive_mean=_prefix_means(naive, sizes)[0],
        score_mean=_prefix_means(score, sizes)[0],
        naive_limit=naive_limit(cost, k, mu=mu, sigma=sigma),
        analytic=analytic_gradient(cost, k, mu=mu, sigma=sigma),
    )


# --------------------------------------------------------------------------------------
# Argument checks for the Python-level functions.
# --------------------------------------------------------------------------------------


def _check_cost(cost: str) -> None:
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; expected one of {sorted(COSTS)}")


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {estimator!r}; expected one of {sorted(ESTIMATORS)}"
        )


def _check_param(param: str) -> None:
    if param not in PARAMS:
        raise ValueError(f"unknown param {param!r}; expected one of {PARAMS}")


def _check_problem(cost: str, k: float, sigma: float) -> None:
    _check_cost(cost)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if not expectation_defined(cost, k, sigma=sigma):
        raise ValueError(
            f"E[exp(-k x^2)] is infinite for 1 + 2 k sigma^2 <= 0 "
            f"(k={k}, sigma={sigma}); the gradient is undefined"
        )
