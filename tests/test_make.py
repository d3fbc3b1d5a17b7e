"""``rl_pg.make`` rejects values that cannot fit EnvParams before anything compiles."""

import jax.numpy as jnp
import numpy as np
import pytest

import rl_pg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_steps_in_episode": 3e9}, "max_steps_in_episode must fit int32"),
        ({"max_steps_in_episode": 2**31}, "max_steps_in_episode must fit int32"),
        ({"max_steps_in_episode": 2.5}, "max_steps_in_episode must be an int"),
        ({"max_steps_in_episode": "10"}, "max_steps_in_episode must be an int"),
        ({"gravity": float("nan")}, "gravity must be finite, got nan"),
        ({"pipe_gap": float("inf")}, "pipe_gap must be finite"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rl_pg.make("FlappyBird-v0", **kwargs)


def test_good_values_pass_and_integral_floats_become_ints():
    _, params = rl_pg.make("FlappyBird-v0", max_steps_in_episode=1e4)
    assert params.max_steps_in_episode == 10_000
    assert isinstance(params.max_steps_in_episode, int)
    _, params = rl_pg.make("FlappyBird-v0", max_steps_in_episode=2**31 - 1)
    assert params.max_steps_in_episode == 2**31 - 1
    _, params = rl_pg.make("FlappyBird-v0", gravity=np.float32(2.0))
    assert params.gravity == 2.0
    # arrays (a batch of params to vmap over) are left to validate_params
    _, params = rl_pg.make("FlappyBird-v0", gravity=jnp.array([1.0, 2.0]))
    assert params.gravity.shape == (2,)
