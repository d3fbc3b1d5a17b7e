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


@pytest.mark.slow
def test_import_rl_pg_is_light_and_still_registers_with_gymnax():
    """``import rl_pg`` loads no JAX; its names load on first use, and the ids
    are registered with gymnax as soon as gymnax is imported."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys, rl_pg\n"
        "assert 'jax' not in sys.modules and 'gymnax' not in sys.modules\n"
        "import gymnax\n"
        "env, params = gymnax.make('FlappyBird-lidar-v0')\n"
        "assert env.obs_mode == 'lidar'\n"
        "from rl_pg import *\n"
        "assert all(getattr(rl_pg, n) is globals()[n] for n in rl_pg.__all__)\n"
        "assert rl_pg.make is rl_pg.envs.make and rl_pg.gae is rl_pg.returns.gae\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_public_names_are_unchanged():
    names = (
        "ENV_IDS ESTIMATORS EnvParams EnvState FlappyBird LossAux Policy StreamState "
        "Trajectory cnn_policy discounted_returns entropy episodic_rollout gae "
        "get_estimator grouped_rollout lambda_returns log_prob make mlp_policy "
        "reward_to_go sample stream_init streaming_rollout total_return"
    )
    assert rl_pg.__all__ == sorted(names.split())
    for name in rl_pg.__all__:
        assert getattr(rl_pg, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        getattr(rl_pg, "nope")  # noqa: B009
