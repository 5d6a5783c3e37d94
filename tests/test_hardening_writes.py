"""Classes 5, 6 and 8 (writes): a full disk, a read-only file system or a permission error is one
line naming the path and what was written, with the temporary file removed; SIGTERM cleans up like
Ctrl-C; what a SIGKILLed writer left is removed by the next writer, never a live writer's file; a
Ctrl-C after a file was finished says it was kept."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch
import typer

from workbench.checkpoint import files
from workbench.checkpoint.files import write_text_atomic
from workbench.checkpoint.safetensors_io import SafetensorsWriter, info_of, save_tensors
from workbench.console import friendly
from workbench.errors import WorkbenchError


@pytest.fixture(autouse=True)
def _fresh_cleaning(monkeypatch):
    monkeypatch.setattr(files, "_CLEANED", set())


@pytest.mark.parametrize(
    "code,words",
    [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota"), (errno.EROFS, "read-only file system"),
     (errno.EACCES, "ermission denied")],
)  # fmt: skip
def test_a_failing_disk_is_one_line_and_no_temp_file(tmp_path, monkeypatch, code, words):
    def pwrite(*_):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(WorkbenchError) as e:
        save_tensors(tmp_path / "out.safetensors", {"x": torch.ones(4)})
    message = str(e.value)
    assert "\n" not in message and "out.safetensors" in message and "the checkpoint" in message
    assert words in message, message
    assert list(tmp_path.iterdir()) == []


def test_a_failing_text_write_is_one_line_and_no_temp_file(tmp_path):
    def write(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WorkbenchError, match=r"r\.yaml: cannot write the imported recipe: .*disk is full"):
        files.write_atomic(tmp_path / "r.yaml", write, "the imported recipe")
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_files_of_dead_writers_go_live_ones_stay(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".m.safetensors.{dead.pid}.abc123.wb-tmp"
        busy = tmp_path / f".m.safetensors.{live.pid}.def456.wb-tmp"
        other = tmp_path / ".notes.txt"
        for p in (stale, busy, other):
            p.write_bytes(b"x" * 100)
        save_tensors(tmp_path / "m.safetensors", {"x": torch.ones(2)})
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([busy.name, other.name, "m.safetensors"])
    finally:
        live.kill()
        live.wait()


def test_two_concurrent_writers_in_one_folder(tmp_path):
    """Two processes streaming checkpoints into one folder: neither removes the other's temporary
    file (both finish with the bytes they wrote)."""
    code = (
        "import sys, time, torch\n"
        "from workbench.checkpoint.safetensors_io import SafetensorsWriter, info_of\n"
        "t = torch.full((1000,), float(sys.argv[2]))\n"
        "with SafetensorsWriter(sys.argv[1], {'x': info_of(t)}) as w:\n"
        "    time.sleep(3)\n"  # the other writer starts (and cleans) meanwhile
        "    w.write('x', t)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"{n}.safetensors"), str(n)], env=env)
        for n in (1, 2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    from safetensors.torch import load_file

    for n in (1, 2):
        assert load_file(tmp_path / f"{n}.safetensors")["x"].eq(n).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.safetensors", "2.safetensors"]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, capsys):
    @friendly
    def command():
        t = torch.ones(8)
        with SafetensorsWriter(tmp_path / "o.safetensors", {"x": info_of(t)}):
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the command")

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 130
    assert list(tmp_path.iterdir()) == []
    assert "nothing was written" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not files  # restored after the command


def test_ctrl_c_after_the_final_rename_says_the_file_was_kept(tmp_path, capsys):
    @friendly
    def command():
        write_text_atomic(tmp_path / "done.yaml", "a: 1\n")
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit):
        command()
    err = " ".join(capsys.readouterr().err.split())
    assert "1 finished file(s) were written and kept" in err and "done.yaml" in err
    assert "nothing was written" not in err
    assert (tmp_path / "done.yaml").read_text() == "a: 1\n"
