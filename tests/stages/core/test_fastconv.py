"""The dilated depthwise layer's CPU backward equals nn.Conv2d's, and the swap keeps the network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stages.core.fastconv import DilatedDepthwiseConv2d, swap_dilated_depthwise
from stages.core.models import build_segmenter, segment_logits


def _pair(
    channels: int, kernel: int, padding: int, dilation: int, bias: bool
) -> tuple[nn.Conv2d, DilatedDepthwiseConv2d]:
    torch.manual_seed(0)
    stock = nn.Conv2d(
        channels, channels, kernel, padding=padding, dilation=dilation, groups=channels, bias=bias
    ).double()
    fast = DilatedDepthwiseConv2d(
        channels, channels, kernel, padding=padding, dilation=dilation, groups=channels, bias=bias
    ).double()
    fast.load_state_dict(stock.state_dict())
    return stock, fast


@pytest.mark.parametrize(
    ("kernel", "padding", "dilation", "size", "bias"),
    [(5, 4, 2, 4, False), (3, 2, 2, 7, True), (3, 0, 3, 9, False), (5, 3, 2, 6, True)],
)
def test_gradients_equal_the_stock_layer(
    kernel: int, padding: int, dilation: int, size: int, bias: bool
) -> None:
    stock, fast = _pair(6, kernel, padding, dilation, bias)
    x = torch.randn(3, 6, size, size + 1, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn_like(stock(x))
    grads = []
    for layer in (stock, fast):
        out = layer(x)
        grads.append(torch.autograd.grad(out, [x, *layer.parameters()], upstream))
        grads[-1] = (out.detach(), *grads[-1])
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_gradcheck() -> None:
    _, fast = _pair(2, 3, 2, 2, True)
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast, (x,))


def test_weight_gradient_by_hand() -> None:
    """1 channel, 3x3 kernel, dilation 2, padding 2, a 2x2 input [[1, 2], [3, 4]] and an
    upstream gradient of ones: tap (i, j) sees the input shifted by 2·(i − 1, j − 1), so only the
    centre tap touches pixels (sum 10); every other tap reads padding (0)."""
    layer = DilatedDepthwiseConv2d(1, 1, 3, padding=2, dilation=2, groups=1, bias=False)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    layer(x).sum().backward()
    expected = torch.zeros(1, 1, 3, 3)
    expected[0, 0, 1, 1] = 10.0
    assert layer.weight.grad is not None
    torch.testing.assert_close(layer.weight.grad, expected)


def test_swap_keeps_outputs_keys_and_skips_other_layers() -> None:
    torch.manual_seed(0)
    stock = build_segmenter(arch="lraspp_mobilenet_v3_large", num_classes=3)
    fast = build_segmenter(arch="lraspp_mobilenet_v3_large", num_classes=3)
    fast.load_state_dict(stock.state_dict())
    assert swap_dilated_depthwise(fast) == 3  # the last stage's dilated 5x5 depthwise layers
    assert fast.state_dict().keys() == stock.state_dict().keys()
    swapped = [m for m in fast.modules() if isinstance(m, DilatedDepthwiseConv2d)]
    assert all(m.dilation == (2, 2) and m.groups == m.in_channels for m in swapped)
    x = torch.randn(2, 3, 64, 64)
    for model in (stock, fast):
        model.train()
    out_stock, out_fast = segment_logits(stock, x), segment_logits(fast, x)
    torch.testing.assert_close(out_fast, out_stock)
    out_stock.square().mean().backward()
    out_fast.square().mean().backward()
    for (name, a), b in zip(stock.named_parameters(), fast.parameters(), strict=True):
        assert a.grad is not None
        assert b.grad is not None
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert swap_dilated_depthwise(fast) == 0  # already swapped: nothing left


def test_ineligible_layers() -> None:
    assert not DilatedDepthwiseConv2d.eligible(
        nn.Conv2d(4, 4, 3, padding=1, groups=4)
    )  # no dilation
    assert not DilatedDepthwiseConv2d.eligible(nn.Conv2d(4, 8, 3, padding=2, dilation=2))  # dense
    assert not DilatedDepthwiseConv2d.eligible(
        nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=4)
    )
    assert not DilatedDepthwiseConv2d.eligible(
        nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4)
    )
    assert not DilatedDepthwiseConv2d.eligible(
        nn.Conv2d(4, 4, 3, padding=5, dilation=2, groups=4)  # beyond the kernel's reach
    )
    assert DilatedDepthwiseConv2d.eligible(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4))
