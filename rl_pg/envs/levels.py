"""Levels: the pipe layout of an episode as a pure function of its reset key.

A level is a 32-bit seed. The gap of the ``n``-th pipe of an episode (pipes are
numbered 0, 1, 2, ... in the order they appear) is ``hash(seed, n)``, so

* two environments reset with the same key see the same pipes, whatever actions
  and step keys they are given (step keys never touch the dynamics);
* nothing in the hot path calls ``jax.random``: a few integer multiply / xor /
  shift rounds replace a threefry call per spawned pipe (see REFERENCE.md s. 8,
  where random draws inside ``step`` cost 8x in throughput).

The hash is the "lowbias32" integer finaliser (C. Wellons, "Prospecting for
hash functions", 2018), which passes the usual avalanche tests.
"""

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)  # numpy: no jax array at import time


def mix32(x: jax.Array) -> jax.Array:
    """lowbias32: a bijective, well-avalanching mix of uint32 values."""
    x = x.astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return x


def level_seed(key: jax.Array) -> jax.Array:
    """The level (a uint32 seed) that a reset key selects.

    Works with both raw ``uint32[2]`` keys (``jax.random.PRNGKey``) and typed keys
    (``jax.random.key``).
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = key.reshape(-1).astype(jnp.uint32)
    seed = jnp.uint32(0)
    for i in range(words.shape[0]):
        seed = mix32(seed ^ words[i] ^ (_GOLDEN * jnp.uint32(i + 1)))
    return seed


def pipe_hash(seed: jax.Array, pipe_index: jax.Array) -> jax.Array:
    """A uint32 hash of (level seed, pipe index)."""
    return mix32(mix32(seed ^ (pipe_index.astype(jnp.uint32) * _GOLDEN)) + seed)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def _threefry2x32_block(k1, k2, x1, x2) -> jax.Array:
    """One Threefry-2x32 block (20 rounds), as ``jax.random``'s lowering computes it.

    Written out with plain integer ops so that XLA fuses it; on CPU, jax lowers
    its own threefry to a rolled loop of five separate kernels.
    """
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x = [x1 + k1, x2 + k2]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x[0] = x[0] + x[1]
            x[1] = x[0] ^ _rotate_left(x[1], r)
        x[0] = x[0] + ks[(i + 1) % 3]
        x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
    return jnp.stack(x)


def auto_reset_key(key: jax.Array) -> jax.Array:
    """``jax.random.split(key)[1]``: the key gymnax's ``step`` resets with.

    For raw threefry keys under jax's default ``jax_threefry_partitionable``
    mode, that key is the threefry block of counter ``(0, 1)``, computed here
    alone (``split`` computes both keys, and the first is unused). Other keys
    (typed keys, the legacy split mode) go through ``jax.random.split``.
    """
    raw = not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if raw and key.shape == (2,) and jax.config.jax_threefry_partitionable:
        key = key.astype(jnp.uint32)
        return _threefry2x32_block(key[0], key[1], np.uint32(0), np.uint32(1))
    return jax.random.split(key)[1]
