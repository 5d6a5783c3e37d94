import json
import os
import struct

import pytest
import safetensors.torch
import torch

from workbench.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo, read_header, save_tensors
from workbench.errors import WorkbenchError


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.half": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "position_ids": torch.arange(77)[None],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def test_written_file_loads_in_reference_library_with_metadata(tmp_path):
    tensors = sample_tensors()
    out = save_tensors(tmp_path / "m.safetensors", tensors, {"format": "pt", "note": "x"})
    loaded = safetensors.torch.load_file(out)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
    with safetensors.safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    header = read_header(out)
    assert header.infos["position_ids"] == TensorInfo("I64", (1, 77))
    assert header.data_start % 8 == 0  # aligned like the reference writer
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left


def test_reader_reads_reference_library_files(tmp_path):
    from workbench.checkpoint.reader import open_checkpoint

    tensors = sample_tensors()
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"k": "v"})
    ckpt = open_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.metadata == {"k": "v"}
    assert set(ckpt) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(ckpt[k], t) and ckpt[k].dtype == t.dtype
    # The mapping is read-only towards the file: writing into a tensor never changes the file.
    ckpt["a.weight"].fill_(0)
    assert torch.equal(safetensors.torch.load_file(path)["a.weight"], tensors["a.weight"])


def test_writer_out_of_order_writes(tmp_path):
    tensors = sample_tensors()
    plan = {
        k: TensorInfo(
            {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}[t.dtype],
            tuple(t.shape),
        )
        for k, t in tensors.items()
    }
    with SafetensorsWriter(tmp_path / "o.safetensors", plan) as w:
        for k in reversed(list(tensors)):
            w.write(k, tensors[k])
    loaded = safetensors.torch.load_file(tmp_path / "o.safetensors")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_interrupted_write_leaves_nothing(tmp_path):
    tensors = sample_tensors()
    target = tmp_path / "half.safetensors"
    plan = {"a.weight": TensorInfo("F32", (3, 5)), "b": TensorInfo("F32", (1000,))}
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(target, plan) as w:
            w.write("a.weight", tensors["a.weight"])
            raise KeyboardInterrupt  # Ctrl-C in the middle of a merge
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_previous_file(tmp_path):
    target = tmp_path / "m.safetensors"
    save_tensors(target, {"x": torch.ones(2)})
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(target, {"x": TensorInfo("F32", (2,))}):
            raise RuntimeError("boom")
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]


def test_writer_refuses_to_overwrite_an_input(tmp_path):
    src = save_tensors(tmp_path / "in.safetensors", {"x": torch.ones(2)})
    with pytest.raises(WorkbenchError, match="refusing to overwrite an input"):
        SafetensorsWriter(tmp_path / "." / "in.safetensors", {"x": TensorInfo("F32", (2,))}, inputs=[src])


def test_writer_checks_plan_and_completeness(tmp_path):
    with pytest.raises(ValueError, match="planned F32\\[2\\], got F16\\[2\\]"):
        with SafetensorsWriter(tmp_path / "p.safetensors", {"x": TensorInfo("F32", (2,))}) as w:
            w.write("x", torch.ones(2, dtype=torch.float16))
    with pytest.raises(WorkbenchError, match="never written"):
        with SafetensorsWriter(tmp_path / "q.safetensors", {"x": TensorInfo("F32", (2,))}):
            pass
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_garbage_files_are_refused(tmp_path):
    good = save_tensors(tmp_path / "g.safetensors", {"x": torch.ones(1000)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(WorkbenchError, match=r"cut.safetensors: truncated"):
        read_header(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a model at all")
    with pytest.raises(WorkbenchError, match="junk.safetensors: not a safetensors file"):
        read_header(junk)
    bad_json = tmp_path / "bad.safetensors"
    raw = b"{not json"
    bad_json.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(WorkbenchError, match="header is not JSON"):
        read_header(bad_json)
    lying = tmp_path / "lie.safetensors"
    raw = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    lying.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(WorkbenchError, match=r"'x': data_offsets \[0, 8\] hold 8 bytes, F32\[4\] needs 16"):
        read_header(lying)


def test_written_files_get_the_usual_permissions(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        path = save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
