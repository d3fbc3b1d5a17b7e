"""Optional dependencies (``pip install 'rl_pg[viz]'``): one clear line when missing."""

import importlib
from types import ModuleType

# module -> the extra that installs it
EXTRAS = {"tensorboardX": "viz", "rliable": "viz"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature`` (e.g. "rl-pg train --log tensorboard").

    Raises:
      MissingExtraError: one line, "FEATURE needs MODULE: pip install
        'rl_pg[EXTRA]'", when the module cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], "viz")
        raise MissingExtraError(
            f"{feature} needs {module.split('.')[0]}: pip install 'rl_pg[{extra}]'"
        ) from None
