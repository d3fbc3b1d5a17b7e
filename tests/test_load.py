"""The algorithm contract's ``load``: every algorithm reads back what it saves,
one registry function reads any checkpoint, and no command names an algorithm."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rl_pg import checkpoint
from rl_pg.algos import qlearning, registry


def _saved(name, directory, **meta):
    """``name``'s freshly initialised parameters, saved as a run's best policy."""
    algorithm = registry.get(name)
    config = algorithm.config_cls()
    params = algorithm.params(algorithm.init(config, jax.random.PRNGKey(0)))
    (directory / "checkpoints").mkdir(parents=True)
    path = algorithm.save(directory / "checkpoints" / "best", config, params, **meta)
    (directory / "config.json").write_text(json.dumps({"algo": name}))
    return algorithm, config, params, path


@pytest.mark.parametrize("name", registry.NAMES)
@pytest.mark.slow
def test_every_algorithm_loads_what_it_saves(tmp_path, name):
    algorithm, config, params, path = _saved(name, tmp_path, env_steps=7)
    assert algorithm.is_checkpoint(path)
    agent = algorithm.load(path)
    for a, b in zip(
        jax.tree.leaves(agent.params), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert agent.meta["env_steps"] == 7
    env, env_params = algorithm.make_env(config)
    assert type(agent.env) is type(env) and agent.env_params == env_params
    obs, state = agent.env.reset(jax.random.PRNGKey(1), agent.env_params)
    expected = algorithm.act_fn(config)(params, obs, state, jax.random.PRNGKey(2))
    action = agent.act_fn(agent.params, obs, state, jax.random.PRNGKey(2))
    assert int(action) == int(expected)
    # The registry finds the reader from the run directory alone.
    found, again = registry.load(tmp_path)
    assert found == path and again.act_fn == agent.act_fn


def test_a_qtable_has_no_sampling_policy(tmp_path):
    _, _, _, path = _saved("qlearning", tmp_path)
    with pytest.raises(ValueError, match="Q-table's policy is greedy"):
        qlearning.ALGORITHM.load(path, greedy=False)


def test_registry_load_names_a_file_no_algorithm_reads(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint that any"):
        registry.load(tmp_path / "notes.txt")


def test_no_command_names_an_algorithm():
    """The commands reach algorithms only through the registry."""
    root = Path(__file__).parents[1] / "rl_pg"
    for source in (root / "cli.py", root / "runs" / "commands.py"):
        text = source.read_text()
        for name in registry.NAMES:
            assert f'"{name}"' not in text and f" {name}," not in text, (source, name)
        assert "qlearning" not in text and "Q-learning" not in text, source
