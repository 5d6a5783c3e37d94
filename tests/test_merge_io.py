"""The merge engine's read and write path: the writer's parts and file-to-file copies, and merges
and LoRA bakes that read a safetensors input's data only with preadv (never through its memory map,
whose page faults made warm-cache merges twice as slow as the I/O floor), byte for byte right."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from workbench.checkpoint import safetensors_io
from workbench.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo, save_tensors
from workbench.errors import WorkbenchError
from workbench.lora.ops import LoraSpec, bake
from workbench.lora.synthetic import synthetic_lora
from workbench.merge import engine
from workbench.merge.engine import merge
from workbench.merge.recipe import single_step
from workbench.toy.model import toy_init

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."
POS = TE + "embeddings.position_ids"


def test_write_part_in_any_order_from_threads(tmp_path):
    x = torch.arange(1000, dtype=torch.float32) / 7
    y = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    plan = {"x": TensorInfo("F32", (10, 100)), "y": TensorInfo("I64", (2, 3))}
    parts = [(lo, x[lo : lo + 64]) for lo in range(0, 1000, 64)][::-1]
    with SafetensorsWriter(tmp_path / "o.safetensors", plan) as w:
        threads = [
            threading.Thread(target=lambda half: [w.write_part("x", lo, p) for lo, p in half], args=(h,))
            for h in (parts[::2], parts[1::2])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w.write_part("y", 0, y[0])
        w.write_part("y", 3, y[1])
    got = load_file(tmp_path / "o.safetensors")
    assert torch.equal(got["x"], x.reshape(10, 100)) and torch.equal(got["y"], y)


def test_write_part_refuses_a_wrong_dtype_or_range_and_an_unfinished_key(tmp_path):
    w = SafetensorsWriter(tmp_path / "a.safetensors", {"x": TensorInfo("F16", (8,))}).__enter__()
    with pytest.raises(ValueError, match="planned F16"):
        w.write_part("x", 0, torch.zeros(4))
    with pytest.raises(ValueError, match="planned F16"):
        w.write_part("x", 6, torch.zeros(4, dtype=torch.float16))
    w.write_part("x", 4, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(WorkbenchError, match="1 tensors never written"):
        w.__exit__(None, None, None)
    assert list(tmp_path.iterdir()) == []  # half a key written: no file left


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_from_copies_the_bytes_of_another_file(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:  # e.g. EXDEV across filesystems: pread/pwrite instead

        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    src = save_tensors(tmp_path / "s.safetensors", {"a": torch.ones(3), "b": torch.arange(5.0).half()})
    offsets = safetensors_io.read_header(src).offsets
    fd = os.open(src, os.O_RDONLY)
    try:
        with SafetensorsWriter(tmp_path / "o.safetensors", {"b": TensorInfo("F16", (5,))}) as w:
            with pytest.raises(ValueError, match="planned F16"):
                w.copy_from("b", fd, offsets["a"][0], TensorInfo("F32", (3,)))
            w.copy_from("b", fd, offsets["b"][0], TensorInfo("F16", (5,)))
    finally:
        os.close(fd)
    assert torch.equal(load_file(tmp_path / "o.safetensors")["b"], torch.arange(5.0).half())


def _no_mapped_reads_of(monkeypatch, *paths):
    """Fail the test if tensor data of these safetensors files is read through their memory map."""
    real = safetensors_io.SafetensorsFile.tensor
    names = {str(p) for p in paths}

    def tensor(self, key):
        if str(self.path) in names:
            pytest.fail(f"{self.path}: {key} read through the memory map")
        return real(self, key)

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "tensor", tensor)


def _tiny(path, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        U + "input_blocks.4.0.in_layers.2.weight": torch.randn(8, 8, 3, 3, generator=g).to(dtype),
        U + "middle_block.1.proj_out.weight": torch.randn(1000, generator=g).to(dtype).reshape(10, 100),
        U + "out.2.weight": torch.randn(4, 8, 3, 3, generator=g).to(dtype),
        POS: torch.arange(77, dtype=torch.int64)[None],
        TE + "encoder.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(dtype),
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3, generator=g).to(dtype),
        "first_stage_model.encoder.conv_out.bias": torch.randn(8, generator=g).float(),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        "alphas_cumprod": torch.linspace(0.99, 0.01, 1000, dtype=torch.float32),
    }
    return save_tensors(path, tensors)


@pytest.mark.parametrize("dtype,threads", [("fp16", 2), ("bf16", 3), ("fp32", 1)])
def test_add_diff_reads_inputs_only_with_pread(tmp_path, monkeypatch, dtype, threads):
    monkeypatch.setattr(engine, "CHUNK", 96)  # several chunks per tensor, a short last one
    paths = [_tiny(tmp_path / f"{n}.safetensors", seed=i) for i, n in enumerate("abc")]
    _no_mapped_reads_of(monkeypatch, *paths)
    out = tmp_path / "o.safetensors"
    merge(single_step("add-diff", paths, {"alpha": 0.7}, dtype=dtype), out, threads=threads)
    a, b, c = (load_file(p) for p in paths)
    got = load_file(out)
    want_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert got.keys() == a.keys()
    for key, t in a.items():
        if "model" in key and t.is_floating_point():  # A1111's key set (VAE too): A + 0.7 (B - C), in float32
            ref = a[key].float() + 0.7 * (b[key].float() - c[key].float())
            assert torch.equal(got[key], ref.to(want_dtype)), key
        else:  # integers and non-model buffers (alphas_cumprod) copied from A as they are
            assert torch.equal(got[key], t), key


def test_a_shuffled_position_ids_read_with_pread_is_reset(tmp_path, monkeypatch):
    paths = [_tiny(tmp_path / f"{n}.safetensors", seed=i) for i, n in enumerate("ab")]
    bad = load_file(paths[0])
    bad[POS] = torch.arange(77, dtype=torch.int64).flip(0)[None]
    save_tensors(paths[0], bad)
    _no_mapped_reads_of(monkeypatch, *paths)
    result = merge(single_step("weighted", paths, {"alpha": 0.5}), tmp_path / "o.safetensors")
    assert result.position_ids_reset == [POS]
    assert torch.equal(load_file(tmp_path / "o.safetensors")[POS], torch.arange(77)[None])


def test_bake_reads_the_base_only_with_pread(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 1000)  # whole-tensor reads in several pieces
    base = toy_init(tmp_path / "base.safetensors")
    lora = synthetic_lora(tmp_path / "l.safetensors", base, rank=4, alpha=2.0)
    _no_mapped_reads_of(monkeypatch, base)
    out = bake(base, [LoraSpec(str(lora), 0.8)], tmp_path / "o.safetensors", dtype="fp32", threads=3).path
    w, lf, got = load_file(base), load_file(lora), load_file(out)
    n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    up, down, alpha = lf[f"{n}.lora_up.weight"], lf[f"{n}.lora_down.weight"], float(lf[f"{n}.alpha"])
    key = U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    torch.testing.assert_close(got[key], w[key] + 0.8 * alpha / 4 * (up @ down), rtol=1e-6, atol=1e-7)
    n = "lora_unet_down_blocks_1_attentions_0_proj_in"  # SD1: 1x1 conv
    up, down = lf[f"{n}.lora_up.weight"], lf[f"{n}.lora_down.weight"]
    key = U + "input_blocks.4.1.proj_in.weight"
    want = w[key] + 0.8 * 0.5 * (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-7)
    for key in ("first_stage_model.decoder.conv_in.weight", U + "out.0.weight", POS):  # untouched
        assert torch.equal(got[key], w[key]) and got[key].dtype == w[key].dtype


def test_writeback_requests_leave_the_bytes_alone(tmp_path, monkeypatch):
    """The engine asks the kernel to start writing back every WRITEBACK bytes (sync_file_range).
    With a 1-byte period it asks after every key; the file is byte for byte the one written
    without asking (the tensors; the metadata names each file), and the requests were really made."""
    from workbench.checkpoint import files

    a, b = toy_init(tmp_path / "a.safetensors"), toy_init(tmp_path / "b.safetensors", seed=7)
    merge(single_step("weighted", [a, b], {"alpha": 0.3}), tmp_path / "plain.safetensors", threads=2)
    plain = load_file(tmp_path / "plain.safetensors")
    calls = []
    real = files.start_writeback
    monkeypatch.setattr(safetensors_io, "start_writeback", lambda fd: (calls.append(fd), real(fd)))
    monkeypatch.setattr(engine, "WRITEBACK", 1)
    for threads in (1, 2):
        out = tmp_path / f"flushed{threads}.safetensors"
        merge(single_step("weighted", [a, b], {"alpha": 0.3}), out, threads=threads)
        got = load_file(out)
        assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain)
    assert len(calls) > 100
