"""Class 1: safetensors headers. wb refuses exactly what the reference `safetensors` library refuses
(it is the oracle here, run on the same bytes), with one line naming the file and the field; the
few things the reference accepts (offsets off the element alignment, dtypes wb cannot compute
with) are read or refused by name, never crash."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors
import torch
from hardening import assert_refused, refused_cleanly, safetensors_bytes, wb

from workbench.checkpoint.reader import open_checkpoint
from workbench.checkpoint.safetensors_io import read_header, save_tensors
from workbench.errors import WorkbenchError

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    res = wb("toy", "init", folder / "a.safetensors", "--seed", "1")
    assert res.exit_code == 0, res.output
    return folder / "a.safetensors"


def t(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# (name, header object or raw header bytes, data bytes, words the one line must contain)
HOSTILE = [
    ("metadata a list", {"__metadata__": ["a"], "x": F32x2}, bytes(8), "__metadata__ is a list"),
    ("metadata a string", {"__metadata__": "a", "x": F32x2}, bytes(8), "__metadata__ is a string"),
    ("metadata a number", {"__metadata__": 3, "x": F32x2}, bytes(8), "__metadata__ is a number"),
    ("metadata value a number", {"__metadata__": {"a": 1}, "x": F32x2}, bytes(8), "__metadata__['a']"),
    ("metadata value a mapping", {"__metadata__": {"a": {}}}, b"", "__metadata__['a'] is a mapping"),
    ("dtype a number", {"x": t(dtype=4)}, bytes(8), "'x': dtype 4"),
    ("dtype unknown", {"x": t(dtype="F33")}, bytes(8), "dtype 'F33'"),
    ("shape a string", {"x": {**F32x2, "shape": "2"}}, bytes(8), "'x': shape"),
    ("shape floats", {"x": {**F32x2, "shape": [2.0]}}, bytes(8), "'x': shape [2.0]"),
    ("shape negative", {"x": t(shape=(-2,))}, bytes(8), "'x': shape [-2]"),
    ("shape 2^64", {"x": t(shape=(2**64,))}, bytes(8), "'x': shape"),
    ("shape bool", {"x": {**F32x2, "shape": [True, 2]}}, bytes(8), "'x': shape [true, 2]"),
    ("numel over 64 bits", {"x": t(shape=(2**63, 4), offsets=(0, 8))}, bytes(8), "64 bits"),
    ("offsets one int", {"x": {**F32x2, "data_offsets": [8]}}, bytes(8), "'x': data_offsets [8]"),
    ("offsets three ints", {"x": t(offsets=(0, 8, 8))}, bytes(8), "'x': data_offsets"),
    ("offsets strings", {"x": t(offsets=("0", "8"))}, bytes(8), "'x': data_offsets"),
    ("offsets reversed", {"x": t(offsets=(8, 0))}, bytes(8), "end before"),
    ("offsets 2^63", {"x": t(offsets=(2**63, 2**63 + 8))}, bytes(8), "'x'"),
    ("entry a list", {"x": [1, 2]}, bytes(8), "'x' is a list"),
    ("no dtype", {"x": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "'x' has no dtype"),
    ("size mismatch", {"x": t(offsets=(0, 4))}, bytes(4), "'x': data_offsets [0, 4] hold 4 bytes"),
    ("overlap", {"x": t(), "y": t(offsets=(4, 12))}, bytes(12), "overlaps"),
    ("same range twice", {"x": t(), "y": t()}, bytes(8), "overlaps"),
    ("hole", {"x": t(), "y": t(offsets=(16, 24))}, bytes(24), "hole of 8 bytes"),
    ("not from 0", {"x": t(offsets=(8, 16))}, bytes(16), "hole of 8 bytes"),
    ("trailing bytes", {"x": F32x2}, bytes(12), "4 bytes after the last tensor"),
    ("truncated", {"x": F32x2}, bytes(4), "truncated"),
    ("duplicate key", b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
     b'"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8), "key 'x' appears twice"),
    ("nested 10000 deep", b'{"x":' + b"[" * 10000 + b"]" * 10000 + b"}", b"", "nested too deep"),
    ("top level a list", b"[]", b"", "not a JSON object"),
    ("not JSON", b"{nope", b"", "not JSON"),
    ("not UTF-8", b'{"\xff": 1}', b"", "not UTF-8"),
    ("huge integer", b'{"x":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}',
     bytes(8), "not JSON"),
]  # fmt: skip


def write(path, header, data):
    raw = header if isinstance(header, bytes) else None
    path.write_bytes(safetensors_bytes(header, data, raw_header=raw))
    return path


def reference_refuses(path) -> bool:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_slice(k)
        return False
    except Exception:
        return True


@pytest.mark.parametrize("name,header,data,needle", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_what_the_reference_refuses_is_one_line(tmp_path, name, header, data, needle):
    path = write(tmp_path / "bad.safetensors", header, data)
    if name != "duplicate key":  # the reference keeps one of the two silently; wb is stricter
        assert reference_refuses(path), "the oracle accepts this file: the case is wrong"
    with pytest.raises(WorkbenchError) as e:
        read_header(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and needle in message, message


def test_the_cli_refuses_with_one_line_and_touches_nothing(tmp_path, toy):
    bad = write(tmp_path / "bad.safetensors", {"__metadata__": ["x"], "x": F32x2}, bytes(8))
    refused_cleanly(tmp_path, ["inspect", bad], "bad.safetensors", "__metadata__")
    good = toy
    refused_cleanly(
        tmp_path, ["merge", "weighted", good, bad, "--alpha", "0.5", "-o", tmp_path / "o.safetensors"],
        "bad.safetensors", "__metadata__",
    )  # fmt: skip


def test_a_header_over_the_reference_limit_is_refused(tmp_path):
    # 99 MiB of header: over the format's 100,000,000 bytes. Sparse: the file costs no disk.
    path = tmp_path / "big.safetensors"
    n = 99 * 1024 * 1024
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n)
    assert reference_refuses(path)
    assert_refused(wb("inspect", path, "--no-hash"), "big.safetensors", "100000000")


def test_what_the_reference_accepts_wb_reads(tmp_path):
    # A 1-byte tensor first puts the F32 tensor at offset 1: valid, off its alignment.
    header = {"a": t("U8", (1,), (0, 1)), "x": t("F32", (2,), (1, 9)), "e": t("F32", (0,), (9, 9))}
    data = b"\x07" + struct.pack("<2f", 1.5, -2.0)
    path = write(tmp_path / "odd.safetensors", header, data)
    assert not reference_refuses(path)
    with open_checkpoint(path) as ckpt:
        assert ckpt["x"].tolist() == [1.5, -2.0]
        assert ckpt["a"].tolist() == [7]
        assert ckpt["e"].shape == (0,)
    # Padding spaces after the JSON, as the reference writer adds, are fine.
    raw = json.dumps({"x": F32x2}).encode() + b"   "
    padded = write(tmp_path / "pad.safetensors", raw, struct.pack("<2f", 3.0, 4.0))
    assert not reference_refuses(padded)
    assert read_header(padded).infos["x"].shape == (2,)


def test_a_dtype_wb_cannot_compute_with_is_named(tmp_path):
    path = write(tmp_path / "c.safetensors", {"z": t("C64", (1,), (0, 8))}, bytes(8))
    assert not reference_refuses(path)
    assert read_header(path).infos["z"].nbytes == 8
    with open_checkpoint(path) as ckpt, pytest.raises(WorkbenchError, match="dtype C64"):
        ckpt["z"]


def test_a_scalar_where_a_weight_belongs_is_named(tmp_path, toy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(toy)
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    save_file({**tensors, conv_in: torch.tensor(1.0)}, tmp_path / "z.safetensors")
    for args in (
        ["inspect", tmp_path / "z.safetensors", "--no-hash"],
        ["merge", "weighted", toy, tmp_path / "z.safetensors", "--alpha", "0.5", "-o", tmp_path / "o"],
        ["swap", "--unet", tmp_path / "z.safetensors", "--te", toy, "-o", tmp_path / "o.safetensors"],
    ):
        refused_cleanly(tmp_path, args, "z.safetensors", conv_in, "shape []")
    q = next(k for k in tensors if k.endswith("attn1.to_q.weight"))
    save_file({**tensors, q: torch.tensor(2.0)}, tmp_path / "q.safetensors")
    refused_cleanly(
        tmp_path, ["swap", "--unet", toy, "--te", tmp_path / "q.safetensors", "-o", tmp_path / "o"],
        "q.safetensors", q, "0-d",
    )  # fmt: skip


@pytest.mark.parametrize("value", ["{", "[1, 2]", "null", '{"unet": 5}', "[" * 5000 + "]" * 5000])
def test_metadata_wb_reads_that_is_not_its_json_is_a_warning_on_inspect(tmp_path, value):
    keys = ["wb.swap", "sd_merge_models", "sd_merge_recipe", "wb.merge_recipe", "wb.diffusers_configs"]
    weights = {"model.diffusion_model.out.2.bias": torch.zeros(4)}
    path = save_tensors(tmp_path / "m.safetensors", weights, dict.fromkeys(keys, value))
    # {"unet": 5} is a fine recipe object; as a list of models or components it is not.
    expected = ["wb.swap", "sd_merge_models", "wb.diffusers_configs"] if value.startswith("{\"") else keys
    for extra in ([], ["--json"]):
        res = wb("inspect", path, "--no-hash", *extra)
        assert res.exit_code == 0, res.output
        assert "Traceback" not in res.output
        warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
        assert [w.split("metadata ")[1].split(":")[0] for w in warnings] == expected, res.stderr
