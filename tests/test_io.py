"""Output directories are claimed by one run only; writes are atomic."""

import signal

import pytest

from rl_pg import io


def test_new_out_dir_creates_nested_and_refuses_a_second_claim(tmp_path):
    out = io.new_out_dir(tmp_path / "a" / "b")
    assert out.is_dir()
    with pytest.raises(FileExistsError, match="b already exists"):
        io.new_out_dir(out)  # still empty, but taken


def test_an_existing_empty_directory_is_claimed_once(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert io.new_out_dir(empty) == empty
    with pytest.raises(FileExistsError, match="empty already exists"):
        io.new_out_dir(empty)


def test_new_out_dir_refuses_a_file_and_a_non_empty_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    for name in ("file", "full"):
        with pytest.raises(FileExistsError, match=f"{name} already exists"):
            io.new_out_dir(tmp_path / name)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    io.write_json(path, {"a": 1})
    io.write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        assert tmp.suffix == ".png" and tmp.name.startswith(".plot.png.")
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_atomic_path_exclusive_never_overwrites(tmp_path):
    path = tmp_path / "a.gif"
    with io.atomic_path(path, exclusive=True) as tmp:
        tmp.write_bytes(b"first")
    with (
        pytest.raises(FileExistsError, match="a.gif exists"),
        io.atomic_path(path, exclusive=True) as tmp,
    ):
        tmp.write_bytes(b"second")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.gif"]


def test_owned_output_keeps_a_finished_result(tmp_path):
    with io.owned_output(tmp_path / "out") as out:
        (out / "report.md").write_text("done")
    assert (out / "report.md").read_text() == "done"
    assert (out / io.CLAIM_FILE).is_file()  # still claimed: never overwritten
    with pytest.raises(FileExistsError), io.owned_output(out):
        pass


def test_owned_output_on_ctrl_c_removes_what_it_wrote_and_exits_130(tmp_path, capsys):
    out = tmp_path / "study"
    claim = io.owned_output(out, "rl-pg variance")
    with pytest.raises(SystemExit) as stop, claim as claimed:
        io.write_json(claimed / "config.json", {"a": 1})
        (claimed / "plots").mkdir()
        (claimed / "plots" / "x.png").write_bytes(b"png")
        raise KeyboardInterrupt
    assert stop.value.code == 130
    assert not out.exists()  # claim and partial files gone
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rl-pg variance: interrupted")
    with io.owned_output(out) as again:  # the same command may run again
        assert again == out


def test_a_second_ctrl_c_does_not_cut_the_cleanup_short(
    tmp_path, monkeypatch, capsys, ctrl_c_raises
):
    """Ctrl-C pressed again while the first one's cleanup runs: the cleanup ends,
    the one line is written, the exit is 130, and Ctrl-C works again after."""
    out = tmp_path / "study"
    remove = io._remove_contents

    def pressed_again(path):
        signal.raise_signal(signal.SIGINT)  # handled here, unless ignored
        remove(path)

    monkeypatch.setattr(io, "_remove_contents", pressed_again)
    try:
        with io.owned_output(out) as claimed:
            (claimed / "results.csv").write_text("partial")
            raise KeyboardInterrupt
    except KeyboardInterrupt:  # not re-raised: pytest would stop the session
        pytest.fail("the second Ctrl-C cut the cleanup short")
    except SystemExit as stop:
        assert stop.code == 130
    assert not out.exists()
    assert capsys.readouterr().err.startswith("rl-pg: interrupted; removed")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_owned_output_on_an_error_empties_a_given_empty_directory(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(ValueError, match="bad"), io.owned_output(out) as claimed:
        (claimed / "results.csv").write_text("partial")
        raise ValueError("bad")
    assert out.is_dir() and not any(out.iterdir())  # as it was given
    # An exit with an error code is a failure too.
    with pytest.raises(SystemExit) as stop, io.owned_output(out) as claimed:
        (claimed / "results.csv").write_text("partial")
        raise SystemExit(2)
    assert stop.value.code == 2 and not any(out.iterdir())


def test_a_file_that_could_not_be_created_is_refused_before_the_work(
    tmp_path, monkeypatch
):
    """render and plot check --out's directory first (a read-only mount failed
    only after the rendering). Tests may run as root, who may write anywhere:
    os.access says what a read-only mount would say."""
    from rl_pg import cli

    assert io.check_can_create(tmp_path / "new" / "x.gif") == tmp_path / "new/x.gif"
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="is not a writable directory"):
        io.check_can_create(tmp_path / "file" / "x.gif")
    monkeypatch.setattr(io.os, "access", lambda path, mode: False)
    with pytest.raises(OSError, match=f"{tmp_path} is not a writable directory"):
        io.check_can_create(tmp_path / "new" / "x.gif")
    with pytest.raises(SystemExit) as stop:
        cli.main(["render", "--out", str(tmp_path / "x.gif")])
    assert stop.value.code == 2 and not (tmp_path / "x.gif").exists()
