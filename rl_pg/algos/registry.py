"""The one registry: ``--algo`` name -> :class:`rl_pg.algos.base.Algorithm`.

The CLI, the run driver, multi-seed runs and sweeps all look algorithms up here;
nothing dispatches on config class names.
"""

from rl_pg.algos import a2c, base, dqn, grpo, ppo, qlearning, reinforce

ALGORITHMS: dict[str, base.Algorithm] = {
    a.name: a
    for a in (
        ppo.ALGORITHM,
        a2c.ALGORITHM,
        reinforce.ALGORITHM,
        grpo.ALGORITHM,
        qlearning.ALGORITHM,
        dqn.ALGORITHM,
    )
}
NAMES = tuple(ALGORITHMS)


def get(name: str) -> base.Algorithm:
    """The algorithm called ``name``.

    Raises:
      ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown algo {name!r}; choose one of {list(NAMES)}")
    return ALGORITHMS[name]


def of(config: object) -> base.Algorithm:
    """The algorithm whose config class ``config`` is an instance of."""
    for algorithm in ALGORITHMS.values():
        if type(config) is algorithm.config_cls:
            return algorithm
    raise TypeError(f"No algorithm takes a {type(config).__name__}")
