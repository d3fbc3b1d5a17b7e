"""Tests for rl_pg.replay: the ring buffer's writes, wrap-around, sampling, jit."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_pg import replay


class Item(NamedTuple):
    obs: jax.Array  # [2] uint8
    id: jax.Array  # [] int32


def items(ids) -> Item:
    """A batch of items whose obs are (id, 2 * id), so rows identify themselves."""
    ids = jnp.asarray(ids, jnp.int32)
    return Item(obs=jnp.stack([ids, 2 * ids], axis=1).astype(jnp.uint8), id=ids)


EXAMPLE = Item(obs=jnp.zeros(2, jnp.uint8), id=jnp.zeros((), jnp.int32))


def test_init_is_empty_with_the_examples_shapes_and_dtypes():
    buf = replay.make_replay(5, EXAMPLE)
    state = buf.init()
    assert buf.capacity == 5
    assert state.data.obs.shape == (5, 2) and state.data.obs.dtype == jnp.uint8
    assert state.data.id.shape == (5,) and state.data.id.dtype == jnp.int32
    assert int(state.position) == 0 and int(state.size) == 0
    # ShapeDtypeStructs work as the example too.
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), EXAMPLE)
    from_spec = replay.make_replay(5, spec).init()
    assert jax.tree.structure(from_spec) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(from_spec), jax.tree.leaves(state), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_add_wraps_around_hand_computed():
    buf = replay.make_replay(5, EXAMPLE)
    state = buf.init()
    # ids 1, 2, 3 -> slots 0, 1, 2; position 3, size 3.
    state = buf.add(state, items([1, 2, 3]))
    np.testing.assert_array_equal(state.data.id, [1, 2, 3, 0, 0])
    assert (int(state.position), int(state.size)) == (3, 3)
    # ids 4, 5, 6 -> slots 3, 4, then 0 (the oldest, id 1, is overwritten).
    state = buf.add(state, items([4, 5, 6]))
    np.testing.assert_array_equal(state.data.id, [6, 2, 3, 4, 5])
    assert (int(state.position), int(state.size)) == (1, 5)
    # ids 7, 8, 9 -> slots 1, 2, 3; size stays at the capacity.
    state = buf.add(state, items([7, 8, 9]))
    np.testing.assert_array_equal(state.data.id, [6, 7, 8, 9, 5])
    np.testing.assert_array_equal(state.data.obs[:, 1], 2 * np.array([6, 7, 8, 9, 5]))
    assert (int(state.position), int(state.size)) == (4, 5)


def test_a_batch_as_large_as_the_buffer_replaces_everything():
    buf = replay.make_replay(3, EXAMPLE)
    state = buf.add(buf.init(), items([1]))
    state = buf.add(state, items([2, 3, 4]))  # slots 1, 2, 0
    np.testing.assert_array_equal(state.data.id, [4, 2, 3])
    assert (int(state.position), int(state.size)) == (1, 3)


def test_samples_come_only_from_filled_slots_and_cover_them():
    buf = replay.make_replay(100, EXAMPLE)
    state = buf.add(buf.init(), items(np.arange(1, 8)))  # 7 of 100 slots
    batch = buf.sample(state, jax.random.PRNGKey(0), 7000)
    ids = np.asarray(batch.id)
    assert batch.obs.shape == (7000, 2) and batch.obs.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(batch.obs[:, 0]), ids)  # rows intact
    counts = np.bincount(ids, minlength=8)
    assert counts[0] == 0  # never an empty (zero) slot
    # Uniform: each of the 7 ids ~1000 times (binomial sd ~30).
    assert np.all(np.abs(counts[1:] - 1000) < 150), counts


def test_sampling_after_wrap_around_sees_only_the_newest_capacity_items():
    buf = replay.make_replay(4, EXAMPLE)
    state = buf.init()
    for start in range(1, 13, 3):  # ids 1..12 in batches of 3
        state = buf.add(state, items(np.arange(start, start + 3)))
    ids = np.asarray(buf.sample(state, jax.random.PRNGKey(1), 2000).id)
    assert set(np.unique(ids)) == {9, 10, 11, 12}


def test_sampling_is_deterministic_given_the_key_and_empty_gives_zeros():
    buf = replay.make_replay(10, EXAMPLE)
    state = buf.add(buf.init(), items(np.arange(1, 6)))
    key = jax.random.PRNGKey(3)
    a, b = buf.sample(state, key, 16), buf.sample(state, key, 16)
    np.testing.assert_array_equal(a.id, b.id)
    c = buf.sample(state, jax.random.PRNGKey(4), 16)
    assert not np.array_equal(a.id, c.id)
    np.testing.assert_array_equal(buf.sample(buf.init(), key, 4).id, 0)


@pytest.mark.slow
def test_jit_and_scan_match_eager():
    buf = replay.make_replay(6, EXAMPLE)
    batches = jax.tree.map(  # 4 batches of 3
        lambda x: x.reshape(4, 3, *x.shape[1:]), items(np.arange(1, 13))
    )

    eager = buf.init()
    for i in range(4):
        eager = buf.add(eager, jax.tree.map(lambda x, i=i: x[i], batches))

    scanned = jax.jit(
        lambda: jax.lax.scan(lambda s, b: (buf.add(s, b), None), buf.init(), batches)[0]
    )()
    jitted = buf.init()
    add = jax.jit(buf.add)
    for i in range(4):
        jitted = add(jitted, jax.tree.map(lambda x, i=i: x[i], batches))
    for state in (scanned, jitted):
        jax.tree.map(np.testing.assert_array_equal, state, eager)
    np.testing.assert_array_equal(eager.data.id, [7, 8, 9, 10, 11, 12])

    key = jax.random.PRNGKey(0)
    sample = jax.jit(buf.sample, static_argnums=2)
    jax.tree.map(
        np.testing.assert_array_equal,
        sample(eager, key, 32),
        buf.sample(eager, key, 32),
    )


@pytest.mark.parametrize("capacity", [0, -3, 2.5, True, "8"])
def test_bad_capacity(capacity):
    with pytest.raises(ValueError, match="capacity"):
        replay.make_replay(capacity, EXAMPLE)


def test_bad_batches_raise_at_trace_time():
    buf = replay.make_replay(4, EXAMPLE)
    state = buf.init()
    with pytest.raises(ValueError, match="does not fit"):
        buf.add(state, items(np.arange(5)))
    with pytest.raises(ValueError, match="every leaf"):
        buf.add(state, Item(obs=jnp.zeros((2, 3), jnp.uint8), id=jnp.zeros(2, int)))
    with pytest.raises(ValueError, match="structure"):
        buf.add(state, {"obs": jnp.zeros((2, 2)), "id": jnp.zeros(2)})
    with pytest.raises(ValueError, match="leaf"):
        replay.make_replay(4, ())
