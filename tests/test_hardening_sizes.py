"""Class 3: sizes a header, a file or an argument claims are bounded before anything of that size
is built: a 4 TB (sparse) checkpoint, a prompt file of /dev/zero or of 228,777 lines, a swap
matrix of 915,108 images. Memory is measured in a child process (peak RSS), time with a clock."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import pytest
from hardening import assert_refused, refused_cleanly, wb

from workbench.checkpoint.reader import open_checkpoint
from workbench.errors import WorkbenchError
from workbench.swap.matrix import check_matrix_size

TB4 = 2**40  # F32 elements: 4 TiB


def sparse_checkpoint(path, elements=TB4):
    entry = {"dtype": "F32", "shape": [elements], "data_offsets": [0, 4 * elements]}
    header = json.dumps({"model.diffusion_model.out.2.weight": entry}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * elements)  # a hole: no disk used
    return path


def test_a_4tb_sparse_checkpoint_is_described_and_its_merge_refused_up_front(tmp_path):
    a = sparse_checkpoint(tmp_path / "a.safetensors")
    b = sparse_checkpoint(tmp_path / "b.safetensors")
    started = time.monotonic()
    res = wb("inspect", a, "--no-hash", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tensor_bytes"] == 4 * TB4
    refused_cleanly(
        tmp_path, ["merge", "weighted", a, b, "--alpha", "0.5", "-o", tmp_path / "o.safetensors"],
        "o.safetensors", "needs", "free",
    )  # fmt: skip
    assert time.monotonic() - started < 30


def test_mapping_a_4tb_tensor_is_one_line_not_enomem(tmp_path):
    with open_checkpoint(sparse_checkpoint(tmp_path / "a.safetensors")) as ckpt:
        key = next(iter(ckpt))
        try:
            t = ckpt[key]  # where the machine can map it, it is a lazy view of the hole
            assert t.shape == (TB4,)
        except WorkbenchError as e:
            assert "cannot map tensor" in str(e) and "a.safetensors" in str(e)


def test_a_prompt_file_of_dev_zero_costs_no_memory():
    code = (
        "import time\n"
        "from workbench.checkpoint.files import read_text_file\n"
        "from workbench.errors import WorkbenchError\n"
        "t = time.monotonic()\n"
        "try:\n"
        "    read_text_file('/dev/zero', '--prompts', 1_000_000)\n"
        "except WorkbenchError as e:\n"
        "    assert 'character device' in str(e), e\n"
        "assert time.monotonic() - t < 1\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would count pytest's own memory
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) / 1024 < 1024  # MB: the imports; reading /dev/zero took gigabytes


def test_an_oversized_prompt_file_is_refused_by_its_size(tmp_path):
    big = tmp_path / "prompts.txt"
    with open(big, "wb") as f:
        f.truncate(50 * 1024 * 1024)
    started = time.monotonic()
    refused_cleanly(
        tmp_path, ["swap", "matrix", "--ckpts", "a,b", "--prompts", big, "-o", tmp_path / "m"],
        "prompts.txt", "52,428,800 bytes", "over the 1,000,000-byte limit",
    )  # fmt: skip
    assert time.monotonic() - started < 5


def test_the_swap_matrix_has_the_grids_size_guard(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n" * 228_777)
    started = time.monotonic()
    line = refused_cleanly(
        tmp_path, ["swap", "matrix", "--ckpts", "a,b", "--prompts", prompts, "-o", tmp_path / "m"],
        "915,108 images", "--force",
    )  # fmt: skip
    assert "228,777 prompts" in line
    assert time.monotonic() - started < 10
    assert check_matrix_size(2, 3, 1, 512, 512, False) == 12  # hand count: 2 x 2 x 3 x 1
    with pytest.raises(WorkbenchError, match="would render 1,024 images"):
        check_matrix_size(4, 64, 1, 512, 512, False)  # 1,024 x 0.262 MP = 268 MP > 200
    assert check_matrix_size(4, 64, 1, 512, 512, True) == 1024


def test_a_huge_header_length_is_refused_without_reading(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    assert_refused(wb("inspect", path, "--no-hash"), "h.safetensors", "over the format's limit")
