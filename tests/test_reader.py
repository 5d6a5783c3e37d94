import os
import pickle

import pytest
import torch

from workbench.checkpoint.reader import open_checkpoint
from workbench.errors import WorkbenchError


class Payload:
    """Unpickling this would create a file: the classic malicious .ckpt."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_ckpt_loads_weights_only_and_unwraps_state_dict(tmp_path):
    sd = {"model.diffusion_model.x": torch.randn(3, 3), "cond_stage_model.y": torch.arange(4)}
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 100, "epoch": 3}, path)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "ckpt" and set(ckpt) == set(sd)
    assert torch.equal(ckpt["model.diffusion_model.x"], sd["model.diffusion_model.x"])
    assert ckpt.infos["cond_stage_model.y"].dtype == "I64"


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"w": torch.ones(2)}, "x": Payload(marker)}
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(WorkbenchError) as e:
        open_checkpoint(path)
    assert not marker.exists()
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert "refused" in msg or "not a readable checkpoint" in msg


def test_missing_and_odd_inputs(tmp_path):
    with pytest.raises(WorkbenchError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(WorkbenchError, match="not a diffusers model"):
        open_checkpoint(tmp_path)
    (tmp_path / "list.ckpt").write_bytes(b"")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(WorkbenchError, match="list.pt: not a checkpoint"):
        open_checkpoint(tmp_path / "list.pt")
    with pytest.raises(WorkbenchError, match="list.ckpt: not a readable checkpoint"):
        open_checkpoint(tmp_path / "list.ckpt")
