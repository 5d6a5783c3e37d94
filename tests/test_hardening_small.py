"""Class 8: the pickle refusal names the referenced function whatever the payload's protocol or
container; a refused grid leaves no empty cells/ folder."""

from __future__ import annotations

import io
import os
import pickle
import subprocess

import pytest
import torch
from hardening import refused_cleanly


class Payload:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _raw(proto):
    return lambda: pickle.dumps({"w": Payload(os.system, ("true",))}, protocol=proto)


def _torch_zip():
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1), "x": Payload(subprocess.call, (["true"],))}, buf)
    return buf.getvalue()


def _torch_legacy():
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1), "x": Payload(print, ("hi",))}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


PAYLOADS = [
    *((f"protocol {p}", _raw(p), "system") for p in range(6)),
    ("eval", lambda: pickle.dumps(Payload(eval, ("1",)), protocol=2), "eval"),
    ("torch zip", _torch_zip, "subprocess.call"),
    ("torch legacy", _torch_legacy, "print"),
]


@pytest.mark.parametrize("name,make,function", PAYLOADS, ids=[p[0] for p in PAYLOADS])
def test_the_pickle_refusal_names_the_function(tmp_path, name, make, function):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(make())
    line = refused_cleanly(
        tmp_path, ["inspect", path, "--no-hash"], "evil.ckpt", "refused: the pickle references"
    )
    named = line.split("references ")[1].split(";")[0]
    assert named.endswith(function), line
    assert "GLOBAL" not in named


def test_a_refused_grid_leaves_no_empty_cells_folder(tmp_path):
    from workbench.checkpoint.safetensors_io import save_tensors

    ckpt = save_tensors(tmp_path / "x.safetensors", {"model.diffusion_model.out.2.bias": torch.zeros(4)})
    (tmp_path / "p.txt").write_text("a cat\n")
    refused_cleanly(
        tmp_path, ["grid", "--ckpts", ckpt, "--prompts", tmp_path / "p.txt", "--seeds", "1",
                   "-o", tmp_path / "g", "--steps", "1", "--size", "64x64"],
        "x.safetensors",
    )  # fmt: skip
    assert not (tmp_path / "g").exists()
