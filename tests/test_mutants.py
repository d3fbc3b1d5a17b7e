"""``experiments/mutants.py``: its deliberate bugs still apply to the source, and
the runner tells a caught mutant from a missed one."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location(
    "mutants", ROOT / "experiments/mutants.py"
)
mutants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutants)


def test_every_mutant_changes_its_file_once_and_names_existing_tests():
    mutants.check(mutants.MUTANTS)
    assert len(mutants.MUTANTS) >= 40
    broken = mutants.MUTANTS[0]._replace(old="no such source text")
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutants.check([broken])
    with pytest.raises(ValueError, match="no test file"):
        mutants.check([mutants.MUTANTS[0]._replace(tests="tests/test_nothing.py")])


@pytest.mark.slow
def test_a_caught_and_a_missed_mutant(tmp_path, monkeypatch):
    """A bug in reward_to_go fails its test; a changed comment passes it. The
    repository is not touched."""
    returns = mutants.MUTANTS[0]
    assert returns.path == "rl_pg/returns.py"
    test = "tests/test_returns.py::test_reward_to_go_resets_at_done"
    harmless = returns._replace(name="a comment", old="# T = 0", new="# t", tests=test)
    caught = returns._replace(tests=test)
    monkeypatch.setattr(mutants, "MUTANTS", [caught, harmless])
    before = (ROOT / returns.path).read_text()
    results = mutants.main(["--out", str(tmp_path / "out")])
    assert (ROOT / returns.path).read_text() == before
    assert [r["caught"] for r in results] == [True, False]
    assert results[0]["by"] == test
    saved = json.loads((tmp_path / "out" / "mutants.json").read_text())
    assert saved == results
    table = (tmp_path / "out" / "mutants.md").read_text()
    assert table.startswith("1 of 2 mutants caught.") and "**missed**" in table
