"""Class 2: things that are not regular files. A named pipe called x.safetensors, /dev/zero, a
socket or a folder given where a file belongs is refused with one line before anything opens it
(one check, checkpoint/files.py), so nothing blocks and nothing reads forever."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from hardening import refused_cleanly


@pytest.fixture(autouse=True)
def _no_hang():
    """A regression here would block forever on the pipe: fail in 60 s instead."""

    def timeout(*_):
        raise TimeoutError("a command blocked on a non-regular file")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "x.safetensors"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("suffix", ["x.safetensors", "x.ckpt", "x.bin"])
def test_a_named_pipe_as_a_checkpoint(tmp_path, suffix):
    path = tmp_path / suffix
    os.mkfifo(path)
    refused_cleanly(tmp_path, ["inspect", path, "--no-hash"], str(path), "a named pipe, not a regular file")


def test_a_named_pipe_as_a_merge_input(tmp_path, fifo):
    refused_cleanly(
        tmp_path, ["merge", "weighted", fifo, fifo, "--alpha", "0.5", "-o", tmp_path / "o.safetensors"],
        "x.safetensors", "named pipe",
    )  # fmt: skip


def test_dev_zero_as_a_checkpoint(tmp_path):
    refused_cleanly(tmp_path, ["inspect", "/dev/zero", "--no-hash"], "/dev/zero", "a character device")


def test_a_socket_as_a_checkpoint(tmp_path):
    path = tmp_path / "s.safetensors"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        refused_cleanly(tmp_path, ["inspect", path, "--no-hash"], "s.safetensors", "a socket")


def test_pipes_and_devices_as_recipes(tmp_path, fifo):
    refused_cleanly(tmp_path, ["merge", "run", fifo, "-o", tmp_path / "o.safetensors"], "named pipe")
    refused_cleanly(tmp_path, ["merge", "run", "/dev/zero", "-o", tmp_path / "o.safetensors"], "/dev/zero")
    refused_cleanly(tmp_path, ["recipe", "show", fifo], "named pipe")
    refused_cleanly(tmp_path, ["recipe", "show", "/dev/zero"], "/dev/zero")
    (tmp_path / "folder.yaml").mkdir()
    refused_cleanly(tmp_path, ["recipe", "show", tmp_path / "folder.yaml"], "a folder")


@pytest.mark.parametrize("prompts", ["/dev/zero", "fifo"])
def test_pipes_and_devices_as_prompt_files(tmp_path, fifo, prompts):
    prompts = fifo if prompts == "fifo" else prompts
    for args in (
        ["grid", "--ckpts", "a.safetensors", "--prompts", prompts, "-o", tmp_path / "g", "--dry-run"],
        ["swap", "matrix", "--ckpts", "a,b", "--prompts", prompts, "-o", tmp_path / "m"],
    ):
        refused_cleanly(tmp_path, args, "--prompts", str(prompts), "not a regular file")
