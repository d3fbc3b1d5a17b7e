"""A jittable replay buffer: a fixed-size ring of transitions, uniform sampling.

Flashbax-style (``make_item_buffer``): :func:`make_replay` validates its Python
arguments and returns a :class:`Replay`, a frozen bundle of three pure functions
over a small :class:`ReplayState`::

    replay = make_replay(capacity, example_transition)
    state = replay.init()                          # zeros, nothing filled
    state = replay.add(state, transitions)         # every leaf [B, ...]
    batch = replay.sample(state, key, batch_size)  # every leaf [batch_size, ...]

A transition is any pytree of arrays (a NamedTuple of obs, action, reward, ...);
the buffer stores each leaf as one ``[capacity, ...]`` array with the leaf's dtype
(uint8 pixels stay uint8). ``add`` writes a batch of ``B`` transitions (one per
environment of a vectorised step) at the insert position, wrapping around and
overwriting the oldest ones once the ring is full. Slots ``[0, size)`` are exactly
the filled ones (the ring fills from slot 0 and ``size`` only grows until it
reaches ``capacity``), so ``sample`` draws indices uniformly from that range, with
replacement. Sampling an empty buffer returns the zero transitions of ``init``;
callers wait until the buffer holds enough (DQN's ``learning_starts``).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

Transition = Any  # a pytree of arrays


class ReplayState(NamedTuple):
    """The ring's contents and where the next batch goes."""

    data: Transition  # every leaf [capacity, ...]
    position: jax.Array  # [] int32, slot of the next write, in [0, capacity)
    size: jax.Array  # [] int32, filled slots, in [0, capacity]


class Replay(NamedTuple):
    """A replay buffer as pure functions (see the module docstring).

    Attributes:
      init: ``init() -> ReplayState``, an empty buffer.
      add: ``add(state, transitions) -> state``; every leaf of ``transitions`` is
        ``[B, ...]`` with ``1 <= B <= capacity`` and the example's trailing shape.
      sample: ``sample(state, key, batch_size) -> transitions`` with leaves
        ``[batch_size, ...]``, drawn uniformly with replacement from the filled
        slots; ``batch_size`` is a Python int (static under ``jit``).
      capacity: the number of slots.
    """

    init: Callable[[], ReplayState]
    add: Callable[[ReplayState, Transition], ReplayState]
    sample: Callable[[ReplayState, chex.PRNGKey, int], Transition]
    capacity: int


def make_replay(capacity: int, example_transition: Transition) -> Replay:
    """A ring buffer of ``capacity`` transitions shaped like ``example_transition``.

    Args:
      capacity: the number of transitions kept (the oldest are overwritten).
      example_transition: one unbatched transition (a pytree of arrays or
        ``jax.ShapeDtypeStruct``); only its leaves' shapes and dtypes are used.

    Returns:
      A :class:`Replay`.

    Raises:
      ValueError: ``capacity`` is not an int >= 1, or the example has no leaves.
    """
    if not (isinstance(capacity, int | np.integer) and capacity >= 1) or isinstance(
        capacity, bool
    ):
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    capacity = int(capacity)
    leaves, treedef = jax.tree.flatten(example_transition)
    if not leaves:
        raise ValueError("example_transition must have at least one array leaf")
    specs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]

    def init() -> ReplayState:
        data = [jnp.zeros((capacity, *s.shape), s.dtype) for s in specs]
        return ReplayState(
            data=jax.tree.unflatten(treedef, data),
            position=jnp.asarray(0, jnp.int32),
            size=jnp.asarray(0, jnp.int32),
        )

    def add(state: ReplayState, transitions: Transition) -> ReplayState:
        new_leaves, new_treedef = jax.tree.flatten(transitions)
        if new_treedef != treedef:
            raise ValueError(
                f"transitions have structure {new_treedef}, the buffer {treedef}"
            )
        batch = jnp.shape(new_leaves[0])[0] if jnp.ndim(new_leaves[0]) else 0
        for new, spec in zip(new_leaves, specs, strict=True):
            if jnp.shape(new) != (batch, *spec.shape):
                raise ValueError(
                    f"every leaf must be [B, *{spec.shape}] with one B, got "
                    f"{jnp.shape(new)} (B = {batch})"
                )
        if not 1 <= batch <= capacity:
            raise ValueError(f"a batch of {batch} transitions does not fit {capacity}")
        # B <= capacity, so the B slots are distinct and the scatter is a plain write.
        slots = (state.position + jnp.arange(batch, dtype=jnp.int32)) % capacity
        data = jax.tree.map(
            lambda buf, new: buf.at[slots].set(new.astype(buf.dtype)),
            state.data,
            transitions,
        )
        return ReplayState(
            data=data,
            position=(state.position + batch) % capacity,
            size=jnp.minimum(state.size + batch, capacity),
        )

    def sample(state: ReplayState, key: chex.PRNGKey, batch_size: int) -> Transition:
        # maxval = max(size, 1): an empty buffer yields slot 0 (zeros), not garbage.
        slots = jax.random.randint(
            key, (batch_size,), 0, jnp.maximum(state.size, 1), dtype=jnp.int32
        )
        return jax.tree.map(lambda buf: buf[slots], state.data)

    return Replay(init=init, add=add, sample=sample, capacity=capacity)


__all__ = ["Replay", "ReplayState", "Transition", "make_replay"]
