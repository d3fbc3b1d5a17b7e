"""Pure ``(init, apply)`` categorical policies, with or without a critic.

A ``Policy`` is a frozen bundle of two pure functions, like an optax transformation:

    params = policy.init(key, obs)             # obs: one example or a batch
    logits, value = policy.apply(params, obs)  # obs [..., *obs_shape]
                                               # -> logits [..., A], value [...]

``apply`` works on any number of leading batch dimensions (``[T, B, ...]`` included), so
a whole time-major ``Trajectory`` goes through one call. Without a critic ``value`` is
zeros.

The networks follow PureJaxRL's actor-critic: orthogonal initialisation with gain
sqrt(2) on hidden layers, 0.01 on the policy head (a near-uniform initial policy) and
1.0 on the value head, zero biases (Andrychowicz et al. 2021, "What Matters In On-Policy
RL?").

``sample``, ``log_prob`` and ``entropy`` act on logits of shape ``[..., A]`` through
``jax.nn.log_softmax``.
"""

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": nn.tanh,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
}
_VALUE_MODES = ("separate", "shared", None)


class Policy(NamedTuple):
    """A categorical policy as a pair of pure functions.

    Attributes:
      init: ``init(key, obs) -> params``; ``obs`` is one observation or a batch of them.
      apply: ``apply(params, obs) -> (logits, value)`` with ``obs [..., *obs_shape]``,
        ``logits [..., A]`` and ``value [...]`` (zeros when ``has_value`` is False).
      has_value: whether ``apply`` returns a learned state value.
      num_actions: A, the size of the action set.
    """

    init: Callable[[jax.Array, jax.Array], Params]
    apply: Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]]
    has_value: bool
    num_actions: int


def sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Samples a ~ softmax(logits).

    Args:
      key: a PRNG key.
      logits: [..., A] unnormalised log-probabilities.

    Returns:
      [...] int32 actions.
    """
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def log_prob(logits: jax.Array, actions: jax.Array) -> jax.Array:
    """log pi(a|s) = logits_a - logsumexp(logits).

    Args:
      logits: [..., A] unnormalised log-probabilities.
      actions: [...] integer actions.

    Returns:
      [...] log-probabilities of ``actions``; nan for an action outside [0, A)
      (indexing would wrap -1 to A - 1 without a word), so a loss on it is nan.
    """
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    actions = actions.astype(jnp.int32)
    found = jnp.take_along_axis(log_pi, actions[..., None], axis=-1)[..., 0]
    valid = (actions >= 0) & (actions < logits.shape[-1])
    return jnp.where(valid, found, jnp.nan)


def entropy(logits: jax.Array) -> jax.Array:
    """H(pi) = -sum_a pi(a) log pi(a), with 0 log 0 = 0 (logits may hold -inf).

    Args:
      logits: [..., A] unnormalised log-probabilities.

    Returns:
      [...] entropies in nats.
    """
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_pi)
    # Where pi(a) = 0, log pi(a) = -inf; substitute 0 so neither the value nor the
    # gradient sees 0 * inf.
    safe_log_pi = jnp.where(probs > 0, log_pi, 0.0)
    return -jnp.sum(probs * safe_log_pi, axis=-1)


def _positive_int(v: Any) -> int | None:
    """``v`` as an int if it is a positive integer (numpy's too; not a bool)."""
    if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral):
        return None
    return int(v) if v > 0 else None


def _check_common(num_actions: int, value: str | None) -> int:
    if _positive_int(num_actions) is None:
        raise ValueError(f"num_actions must be a positive int, got {num_actions!r}.")
    if value not in _VALUE_MODES:
        raise ValueError(f"value must be one of {_VALUE_MODES}, got {value!r}.")
    return int(num_actions)


def _get_activation(activation: str) -> Callable[[jax.Array], jax.Array]:
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
        )
    return _ACTIVATIONS[activation]


def _check_sizes(name: str, sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sizes)
    if not all(_positive_int(s) for s in sizes):
        raise ValueError(f"{name} must be positive ints, got {sizes!r}.")
    return tuple(int(s) for s in sizes)


def _on_rows(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """``fn`` on ``x`` as rows ``[-1, D]``, reshaped back to ``x``'s leading dims.

    Dense layers on one batch axis: on a ``[1, N, D]`` input XLA:CPU computes
    each weight gradient behind a transpose copy (PPO's update 1.14-1.30x
    slower; docs/performance.md)."""
    out = fn(x.reshape((-1, x.shape[-1])))
    return out.reshape((*x.shape[:-1], out.shape[-1]))


class _MLPTorso(nn.Module):
    """Dense layers with orthogonal(sqrt(2)) kernels: [..., D] -> [..., hidden[-1]]."""

    hidden: tuple[int, ...]
    activation: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def layers(x):
            for width in self.hidden:
                dense = nn.Dense(
                    width, kernel_init=nn.initializers.orthogonal(np.sqrt(2))
                )
                x = self.activation(dense(x))
            return x

        return _on_rows(layers, x.astype(jnp.float32))


class _CNNTorso(nn.Module):
    """Conv layers then dense layers: [..., H, W, C] -> [..., hidden[-1]].

    uint8 pixels are scaled to [0, 1]; float inputs are used as given.
    """

    channels: tuple[int, ...]
    kernel_sizes: tuple[int, ...]
    strides: tuple[int, ...]
    hidden: tuple[int, ...]
    activation: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(jnp.float32) / 255.0
        x = x.astype(jnp.float32)
        batch_shape = x.shape[:-3]
        # Flax convolutions take one batch axis: flatten all leading dims into it.
        x = x.reshape((-1, *x.shape[-3:]))
        for features, size, stride in zip(
            self.channels, self.kernel_sizes, self.strides, strict=True
        ):
            x = nn.Conv(
                features,
                kernel_size=(size, size),
                strides=(stride, stride),
                padding="SAME",
                kernel_init=nn.initializers.orthogonal(np.sqrt(2)),
            )(x)
            x = self.activation(x)
        x = x.reshape((*batch_shape, math.prod(x.shape[1:])))  # -1 fails on 0 rows
        return _MLPTorso(self.hidden, self.activation)(x)


class _ActorCritic(nn.Module):
    """Policy head on ``torso``; value head on the same torso ("shared"), on
    ``critic_torso`` ("separate"), or no value (None: zeros)."""

    num_actions: int
    torso: nn.Module
    critic_torso: nn.Module | None
    value: str | None

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = self.torso(obs)
        logits = _on_rows(
            nn.Dense(self.num_actions, kernel_init=nn.initializers.orthogonal(0.01)),
            features,
        )
        value_head = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0))
        if self.value is None:
            value = jnp.zeros(logits.shape[:-1], logits.dtype)
        elif self.value == "shared":
            value = _on_rows(value_head, features)[..., 0]
        else:
            value = _on_rows(value_head, self.critic_torso(obs))[..., 0]
        return logits, value


def _policy_from_module(module: nn.Module, num_actions: int, value) -> Policy:
    def init(key: jax.Array, obs: jax.Array) -> Params:
        return module.init(key, obs)

    def apply(params: Params, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        return module.apply(params, obs)

    return Policy(init, apply, has_value=value is not None, num_actions=num_actions)


def mlp_policy(
    num_actions: int,
    hidden: Sequence[int] = (64, 64),
    activation: str = "tanh",
    value: str | None = "separate",
) -> Policy:
    """An MLP actor(-critic) for feature or LIDAR vectors ``[..., D]``.

    Args:
      num_actions: A, the number of discrete actions.
      hidden: widths of the hidden layers (of each torso when ``value="separate"``).
      activation: one of "tanh", "relu", "gelu", "silu".
      value: "separate" (critic with its own torso, as in PureJaxRL), "shared" (value
        head on the policy torso) or None (no critic; value is zeros).

    Returns:
      A ``Policy``; ``apply(params, obs [..., D]) -> (logits [..., A], value [...])``.
    """
    num_actions = _check_common(num_actions, value)
    hidden = _check_sizes("hidden", hidden)
    act = _get_activation(activation)
    critic = _MLPTorso(hidden, act) if value == "separate" else None
    module = _ActorCritic(num_actions, _MLPTorso(hidden, act), critic, value)
    return _policy_from_module(module, num_actions, value)


def cnn_policy(
    num_actions: int,
    channels: Sequence[int] = (16, 32),
    kernel_sizes: Sequence[int] = (5, 3),
    strides: Sequence[int] = (2, 2),
    hidden: Sequence[int] = (128,),
    activation: str = "relu",
    value: str | None = "shared",
) -> Policy:
    """A small CNN actor(-critic) for pixel observations ``[..., H, W, C]``.

    uint8 observations are scaled by 1/255; float observations are used as given.
    Convolutions use "SAME" padding, so any H, W works.

    Args:
      num_actions: A, the number of discrete actions.
      channels: output channels of each convolution.
      kernel_sizes: square kernel size of each convolution.
      strides: stride of each convolution.
      hidden: widths of the dense layers after the convolutions.
      activation: one of "tanh", "relu", "gelu", "silu".
      value: "shared" (value head on the policy torso), "separate" (a second CNN for
        the critic) or None (no critic; value is zeros).

    Returns:
      A ``Policy``; ``apply(params, obs [..., H, W, C]) -> (logits [..., A],
      value [...])``.
    """
    num_actions = _check_common(num_actions, value)
    channels = _check_sizes("channels", channels)
    kernel_sizes = _check_sizes("kernel_sizes", kernel_sizes)
    strides = _check_sizes("strides", strides)
    hidden = _check_sizes("hidden", hidden)
    if not len(channels) == len(kernel_sizes) == len(strides):
        raise ValueError("channels, kernel_sizes and strides must have equal lengths.")
    act = _get_activation(activation)

    def make_torso() -> _CNNTorso:
        return _CNNTorso(channels, kernel_sizes, strides, hidden, act)

    critic = make_torso() if value == "separate" else None
    module = _ActorCritic(num_actions, make_torso(), critic, value)
    return _policy_from_module(module, num_actions, value)
