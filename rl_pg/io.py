"""Output directories, JSON and versions: nothing on disk is lost or half-written."""

import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex", "gymnax", "numpy", "rl_pg")


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


CLAIM_FILE = ".rl_pg-claim"  # an empty file: this directory belongs to one run


def new_out_dir(path: str | os.PathLike) -> Path:
    """Create (or take an empty) ``path`` for one run's results, exclusively.

    The directory is claimed by creating ``CLAIM_FILE`` in it with ``O_EXCL``,
    which only one process can do: two runs started at once with the same
    ``--out`` never share it.

    Raises:
      FileExistsError: ``path`` exists and is not an empty directory (or another
        run claimed it first).
    """
    path = check_out_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise _refusal(path) from None
    return path


@contextlib.contextmanager
def owned_output(path: str | os.PathLike, command: str = "rl-pg"):
    """Claim ``path`` (:func:`new_out_dir`) for a command; undo it if the
    command dies.

    Yields the claimed directory. On Ctrl-C (``KeyboardInterrupt``) or any
    exception, everything the command wrote there and the claim are removed
    (the directory too, unless it existed, empty, before), so that the same
    command may run again; a Ctrl-C then prints one line to stderr and exits
    with status 130 (``SystemExit(130)``), other exceptions propagate. Use it
    where partial results cannot be resumed; a resumable command (``rl-pg
    train``) keeps its directory and names the ``--resume`` command instead.
    """
    path = Path(path)
    existed = path.is_dir()
    out = new_out_dir(path)
    try:
        yield out
    except BaseException as error:
        if isinstance(error, SystemExit) and not error.code:
            raise  # a normal exit is not a failure
        with ctrl_c_ignored():  # a second Ctrl-C cannot leave half a cleanup
            _remove_contents(out)
            if not existed:
                out.rmdir()
            if isinstance(error, KeyboardInterrupt):
                print(
                    f"{command}: interrupted; removed the partial results in {out}: "
                    "the same command starts again",
                    file=sys.stderr,
                )
        if isinstance(error, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise


@contextlib.contextmanager
def ctrl_c_ignored():
    """Ignore SIGINT inside (in the main thread; elsewhere a no-op), then restore
    the handler: the cleanup after a first Ctrl-C runs to its end however often
    the user presses it again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:  # None: a handler not set from Python; the default is the closest
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def _remove_contents(path: Path) -> None:
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _refusal(path: Path) -> FileExistsError:
    return FileExistsError(
        f"{path} already exists and is not an empty directory; results are never "
        "overwritten: choose a new --out"
    )


def check_out_dir(path: str | os.PathLike) -> Path:
    """Raise FileExistsError now if :func:`new_out_dir` would refuse ``path``
    (to validate every input before any work); creates nothing."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise _refusal(path)
    return path


def check_can_create(path: str | os.PathLike) -> Path:
    """Raise OSError now if the file ``path`` could not be created (its nearest
    existing directory is not writable), before the work that would write it."""
    path = Path(path)
    parent = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"cannot create {path}: {parent} is not a writable directory")
    return path


def check_owned_out(
    path: str | os.PathLike, what: str, finished: str, commands: tuple[str, ...]
) -> Path:
    """:func:`check_out_dir` for a command that owns its output
    (:func:`owned_output`); a directory it left when killed (a claim, no
    ``finished`` file, the one it writes last, and a ``config.json`` of one of
    ``commands``, or none yet) is named as such, with the command that frees it.
    Another command's output gets the plain refusal. ``what``: the result, e.g.
    ``"a sweep"``."""
    path = Path(path)
    if (
        (path / CLAIM_FILE).is_file()
        and not (path / finished).exists()
        and written_by(path) in (None, *commands)
    ):
        raise FileExistsError(
            f"{path} holds {what} that did not finish (killed before its "
            f"{finished}, or still running): if it is not running, remove it with "
            f"`rm -r {shlex.quote(str(path))}` and run the same command again, or "
            "choose a new --out"
        )
    return check_out_dir(path)


def written_by(path: Path) -> str | None:
    """The ``command`` in ``path/config.json`` (``"sweep"``, ``"variance"``, ...;
    None: no such file; "" when it names none, as a training run's, or cannot be
    read)."""
    try:
        data = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ""
    return str(data.get("command", "")) if isinstance(data, dict) else ""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, exclusive: bool = False):
    """Yield a temporary path beside ``path``; on success move it onto ``path``.

    The temporary file is ``.NAME.XXXXXXXX.SUFFIX`` (the suffix kept, so writers
    that pick a format by extension, such as matplotlib and imageio, still do);
    on error it is removed. Readers see the old file or the whole new one, never
    a partial one. ``exclusive``: never replace an existing ``path``
    (``FileExistsError``), even one created meanwhile by another process.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        if exclusive:
            try:
                os.link(tmp, path)  # fails if path exists: no overwrite, no race
            except FileExistsError:
                raise FileExistsError(
                    f"{path} exists; refusing to overwrite it"
                ) from None
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """``fig.savefig(path, **kwargs)``, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    """``config.json``: the run's settings plus the library versions it ran with."""
    write_json(Path(out_dir) / "config.json", {**config, "versions": versions()})
