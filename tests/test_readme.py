"""README.md's code runs as written, and its commands are accepted.

* Every ```python block runs, in order, in one module namespace: the README says its
  Python API blocks form one script. The custom-estimator block (marked
  ``<!-- example: custom estimator -->``) is self-contained and runs, with its output
  checked, in ``tests/test_study_api.py``; it is not run a second time here.
* Every ```bash line that runs ``rl-pg`` is parsed by the CLI's own parser
  (``cli.build_parser``), and ``train`` / ``sweep`` options are checked against the
  algorithm's config; ``python experiments/X.py`` lines must name a script whose
  argparse options include every flag given (read from its source). Nothing runs.
* The quick-start commands are the contract CI runs (``.ci/run``), and every
  relative link (with its ``#anchor``) points at a file (and heading) that exists.
"""

import ast
import re
import shlex
import sys
import types
from pathlib import Path

import pytest

from rl_pg import cli, train
from rl_pg.runs import sweep

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CUSTOM_MARKER = "<!-- example: custom estimator -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
QUICK_START = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "rl-pg variance --preset quick --out runs/variance-$(date +%Y%m%d-%H%M%S)",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e "
    '".[test]" && python -m pytest -n 2 --dist loadgroup -q tests',
)


def code_blocks(text: str, language: str) -> list[tuple[int, str, bool]]:
    """(first line number, code, marked as the custom-estimator example) of every
    fenced block in ``language``."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != language:
            continue
        before = text[: match.start()]
        marked = before.rstrip().endswith(CUSTOM_MARKER)
        blocks.append((before.count("\n") + 2, match.group(2), marked))
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block: continuation lines joined, comments and
    ``$(...)`` substitutions dropped, split at ``&&``, ``||``, ``;`` and ``|``, and
    leading ``NAME=value`` environment assignments removed."""
    code = re.sub(r"\\\n", " ", code)
    commands = []
    for line in code.splitlines():
        line = re.sub(r"\$\([^)]*\)", "SUBST", line)
        current: list[str] = []
        for token in shlex.split(line, comments=True) + ["&&"]:
            if token in ("&&", "||", ";", "|"):
                while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def check_rl_pg(argv: list[str]) -> None:
    """``rl-pg ARGV`` parses, and train / sweep options fit the algorithm's config."""
    parser = cli.build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exit_:  # argparse has printed why
        raise AssertionError(f"rl-pg {shlex.join(argv)}: rejected ({exit_})") from None
    if extra and not getattr(args, "takes_extra", False):
        raise AssertionError(f"rl-pg {shlex.join(argv)}: unrecognized {extra}")
    options = train.overrides_from_argv(extra)
    if args.command == "train":
        train.make_config(args.algo, options)
    elif args.command == "sweep":
        sweep.plan(args.algo, options, args.num_seeds)


def script_options(path: Path) -> tuple[set[str], set[str], str | None]:
    """A script's argparse options, its required ones, and the ``rl-pg`` command it
    forwards to (``main(["bench", *sys.argv[1:]])``), read from its source."""
    tree = ast.parse(path.read_text())
    known, required, forwards = {"-h", "--help"}, set(), None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        strings = [
            a.value
            for a in node.args
            if isinstance(a, ast.Constant) and isinstance(a.value, str)
        ]
        if name == "add_argument":
            flags = {s for s in strings if s.startswith("-")}
            known |= flags
            if any(
                k.arg == "required" and getattr(k.value, "value", False)
                for k in node.keywords
            ):
                required |= flags
        elif name == "main" and node.args and isinstance(node.args[0], ast.List):
            first = node.args[0].elts[:1]
            if first and isinstance(first[0], ast.Constant):
                forwards = first[0].value
    return known, required, forwards


def check_experiment(argv: list[str]) -> None:
    """``python experiments/X.py ARGS``: the script exists and takes those flags."""
    path = ROOT / argv[0]
    assert path.is_file(), f"{argv[0]} does not exist"
    known, required, forwards = script_options(path)
    if forwards is not None and known == {"-h", "--help"}:
        check_rl_pg([forwards, *argv[1:]])
        return
    given = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")}
    assert given <= known, f"{shlex.join(argv)}: {sorted(given - known)} not in {path}"
    assert required <= given, f"{shlex.join(argv)}: misses {sorted(required - given)}"


def check_command(command: list[str]) -> str | None:
    """Check one shell command; returns what kind it was (None: not ours)."""
    if command[0] == "rl-pg":
        check_rl_pg(command[1:])
        return "rl-pg"
    script = command[1] if len(command) > 1 else ""
    if command[0] in ("python", "python3") and script.startswith("experiments/"):
        check_experiment(command[1:])
        return "experiment"
    return None


@pytest.mark.slow
def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # blocks' temp dirs
    text = README.read_text()
    blocks = code_blocks(text, "python")
    assert sum(marked for *_, marked in blocks) == 1, "the custom-estimator example"
    assert CUSTOM_MARKER in (ROOT / "tests" / "test_study_api.py").read_text()
    script = types.ModuleType("readme_script")  # functions get a module reference
    sys.modules[script.__name__] = script
    try:
        ran = 0
        for line, code, marked in blocks:
            if marked:
                continue  # run and checked by test_study_api.test_readme_example_runs
            name = f"README.md, the python block at line {line}"
            exec(compile(code, name, "exec"), script.__dict__)
            ran += 1
    finally:
        del sys.modules[script.__name__]
    assert ran >= 3


def test_bash_commands_are_accepted():
    kinds = []
    for line, code, _ in code_blocks(README.read_text(), "bash"):
        for command in shell_commands(code):
            try:
                kinds.append(check_command(command))
            except (AssertionError, ValueError) as error:
                pytest.fail(f"README.md, bash block at line {line}: {error}")
    assert kinds.count("rl-pg") >= 10 and kinds.count("experiment") >= 3


def test_quick_start_is_the_contract_ci_runs():
    text = README.read_text()
    for command in QUICK_START:
        assert f"\n{command}\n" in text, f"the quick start lost: {command}"
    assert QUICK_START[1] in (ROOT / ".ci" / "run").read_text()


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", markdown), re.M)
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings
    }


@pytest.mark.parametrize(
    "page", ["README.md", "docs/performance.md", "docs/details.md"]
)
def test_relative_links_resolve(page):
    source = ROOT / page
    links = re.findall(r"\]\(([^)\s]+)\)", source.read_text())
    assert links
    for link in links:
        if "://" in link:
            continue
        target, _, anchor = link.partition("#")
        path = source.parent / target if target else source
        assert path.exists(), f"{page} links to a missing {target}"
        if anchor:
            assert anchor in _anchors(path.read_text()), f"no #{anchor} in {target}"


def test_the_checks_catch_broken_commands():
    """The helpers reject what the README must not contain."""
    assert shell_commands("A=1 rl-pg bench --out x && ls  # note\n") == [
        ["rl-pg", "bench", "--out", "x"],
        ["ls"],
    ]
    with pytest.raises(AssertionError, match="rejected"):
        check_rl_pg(["variance", "--preset", "huge", "--out", "x"])
    with pytest.raises(AssertionError, match="unrecognized"):
        check_rl_pg(["variance", "--out", "x", "--no-such-flag", "0.1"])
    with pytest.raises(ValueError, match="Unknown option"):
        check_rl_pg(["train", "--algo", "ppo", "--out", "x", "--no-such-field", "1"])
    with pytest.raises(ValueError, match="not sweepable"):
        check_rl_pg(["sweep", "--algo", "ppo", "--out", "x", "--num-envs", "8,16"])
    with pytest.raises(AssertionError, match="not in"):
        check_experiment(["experiments/calibration.py", "--out", "x", "--bogus", "1"])
    with pytest.raises(AssertionError, match="misses"):
        check_experiment(["experiments/calibration.py", "--seeds", "2"])
    with pytest.raises(AssertionError, match="does not exist"):
        check_experiment(["experiments/no_such_script.py", "--out", "x"])
    check_experiment(["experiments/env_throughput.py", "--out", "x"])  # -> rl-pg bench
    with pytest.raises(AssertionError, match="unrecognized"):
        check_experiment(["experiments/env_throughput.py", "--out", "x", "--bogus"])
