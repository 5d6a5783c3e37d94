"""LoRA math against hand computations (plain torch on the other side)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.lora import math as lm


def test_linear_and_conv_delta_by_hand():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g)
    d = lm.lora_delta(up, down, alpha=1.5)
    want = torch.zeros(6, 5)
    for o in range(6):
        for i in range(5):
            want[o, i] = sum(up[o, r] * down[r, i] for r in range(3)) * (1.5 / 3)
    torch.testing.assert_close(d, want, rtol=1e-6, atol=1e-6)
    # 3x3 conv: kohya's conv2d form gives the same tensor
    up4, down4 = torch.randn(8, 2, 1, 1, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    d4 = lm.lora_delta(up4, down4, alpha=None)  # no alpha: scale 1
    kohya = F.conv2d(down4.permute(1, 0, 2, 3), up4).permute(1, 0, 2, 3)
    torch.testing.assert_close(d4, kohya, rtol=1e-5, atol=1e-6)
    # 1x1 conv LoRA on a Linear weight and a linear LoRA on a 1x1 conv: reshaped
    d11 = lm.lora_delta(torch.randn(6, 3, 1, 1), torch.randn(3, 5, 1, 1), 3.0, shape=(6, 5))
    assert d11.shape == (6, 5)
    assert lm.lora_delta(up, down, 3.0, shape=(6, 5, 1, 1)).shape == (6, 5, 1, 1)
    with pytest.raises(WorkbenchError, match=r"shape \[8, 4, 3, 3\], the weight is \[8, 36\]|the weight is"):
        lm.lora_delta(up4, down4, 2.0, shape=(8, 4, 1, 1))


def test_tucker_locon_mid():
    g = torch.Generator().manual_seed(1)
    up, mid, down = (
        torch.randn(5, 2, 1, 1, generator=g),
        torch.randn(2, 2, 3, 3, generator=g),
        torch.randn(2, 4, 1, 1, generator=g),
    )
    d = lm.lora_delta(up, down, alpha=1.0, mid=mid)
    want = torch.zeros(5, 4, 3, 3)
    for o in range(5):
        for i in range(4):
            for a in range(2):
                for b in range(2):
                    want[o, i] += up[o, a, 0, 0] * mid[a, b] * down[b, i, 0, 0]
    torch.testing.assert_close(d, want * 0.5, rtol=1e-5, atol=1e-6)


def test_loha_and_lokr_by_hand():
    g = torch.Generator().manual_seed(2)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((6, 2), (2, 5), (6, 2), (2, 5)))
    d = lm.loha_delta(w1a, w1b, w2a, w2b, alpha=1.0, shape=(6, 5))
    want = torch.empty(6, 5)
    for o in range(6):
        for i in range(5):
            want[o, i] = (w1a[o] @ w1b[:, i]) * (w2a[o] @ w2b[:, i]) * 0.5
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-6)
    # LoKr: w1 full [2, 3], w2 = a @ b [3, 2] rank 1, alpha 0.5 -> scale 0.5
    w1 = torch.randn(2, 3, generator=g)
    a, b = torch.randn(3, 1, generator=g), torch.randn(1, 2, generator=g)
    d = lm.lokr_delta(w1, None, None, None, a, b, alpha=0.5, shape=(6, 6))
    w2 = a @ b
    want = torch.empty(6, 6)
    for i in range(2):
        for j in range(3):
            want[i * 3 : (i + 1) * 3, j * 2 : (j + 1) * 2] = w1[i, j] * w2
    torch.testing.assert_close(d, want * 0.5, rtol=1e-5, atol=1e-6)
    # both factors full: scale 1 whatever alpha says
    d = lm.lokr_delta(w1, None, None, w2, None, None, alpha=0.5, shape=(6, 6))
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,k", [((320, 768), 4), ((64, 32, 3, 3), 3)])
def test_low_rank_recovers_planted_rank(shape, k):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(shape[0], k, generator=g)
    v = torch.randn(k, int(torch.tensor(shape[1:]).prod()), generator=g)
    delta = (u @ v).reshape(shape)
    for rank in (k, k + 3):
        lr = lm.low_rank(delta, rank)
        back = lm.lora_delta(lr.up, lr.down, lr.alpha, shape)
        assert float((back - delta).norm() / delta.norm()) < 2e-6
        assert lr.kept == pytest.approx(1.0, abs=1e-6)
        assert float(lr.singular[k:].abs().max()) < 1e-3 * float(lr.singular[0])
    # other alpha: the product is unchanged
    lr = lm.low_rank(delta, k, alpha=1.0)
    assert lr.alpha == 1.0
    torch.testing.assert_close(lm.lora_delta(lr.up, lr.down, lr.alpha, shape), delta, rtol=1e-4, atol=1e-3)


def test_eckart_young_below_rank():
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(40, 30, generator=g)
    s = torch.linalg.svdvals(delta.double())
    for r in (1, 5, 12):
        lr = lm.low_rank(delta, r)
        err = float((lm.lora_delta(lr.up, lr.down, lr.alpha) - delta).double().norm())
        assert err == pytest.approx(float((s[r:] ** 2).sum().sqrt()), rel=1e-4)
        assert lr.kept == pytest.approx(float((s[:r] ** 2).sum().sqrt() / (s**2).sum().sqrt()), rel=1e-5)


def test_randomized_svd_close_to_exact():
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(256, 64, generator=g) @ torch.randn(64, 320, generator=g)
    exact = lm.low_rank(delta, 16)
    rand = lm.low_rank(delta, 16, method="randomized")
    e_exact = float((lm.lora_delta(exact.up, exact.down, exact.alpha) - delta).norm())
    e_rand = float((lm.lora_delta(rand.up, rand.down, rand.alpha) - delta).norm())
    assert e_exact <= e_rand <= 1.01 * e_exact
    # the randomized truncation is a projection: its reported share is exact from its own values
    total = float(delta.norm())
    assert rand.kept == pytest.approx((1 - (e_rand / total) ** 2) ** 0.5, rel=1e-4)
    assert exact.kept == pytest.approx((1 - (e_exact / total) ** 2) ** 0.5, rel=1e-4)
    assert lm.use_randomized((256, 320), 16, "auto") and not lm.use_randomized((40, 320), 16, "auto")


def test_pick_rank_fro_minimal_vs_kohya():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.01])
    assert lm.pick_rank_fro(s, 0.9) == 2  # 2 values keep sqrt(125/126.26) = 99.5%
    assert lm.pick_rank_fro(s, 0.9, kohya_plus_one=True) == 3
    assert lm.pick_rank_fro(s, 0.999) == 3
    assert lm.pick_rank_fro(s, 0.9999, max_rank=2) == 2
    assert lm.pick_rank_fro(torch.zeros(4), 0.9) == 1


def test_merge_concat_is_exact_weighted_sum():
    g = torch.Generator().manual_seed(6)
    a_up, a_down = torch.randn(7, 2, generator=g), torch.randn(2, 5, generator=g)
    b_up, b_down = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g)
    up, down, alpha = lm.merge_concat([(a_up, a_down, 1.0, 0.7), (b_up, b_down, 6.0, -0.3)])
    assert down.shape == (5, 5) and alpha == 5.0
    want = 0.7 * (1.0 / 2) * a_up @ a_down - 0.3 * (6.0 / 3) * b_up @ b_down
    torch.testing.assert_close(lm.lora_delta(up, down, alpha), want, rtol=1e-5, atol=1e-6)
