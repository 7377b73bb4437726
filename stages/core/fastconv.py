"""A faster backward for dilated depthwise convolutions on CPU.

oneDNN's backward of a depthwise convolution with dilation is a slow path on CPU: in
``lraspp_mobilenet_v3_large`` on 64 px images the three dilated 5×5 depthwise layers of the last
stage (672 and 960 channels on 4×4 maps) took about 40 % of a training step, while their forward
takes well under a millisecond. Both gradients can be computed from cheaper pieces instead:

- the input's gradient is a forward depthwise convolution of the output's gradient with the
  kernel flipped (stride 1: same dilation, padding ``dilation·(k − 1) − padding``);
- the weight's gradient of tap (i, j) is the sum over batch and positions of the output's
  gradient times the padded input shifted by ``dilation·(i, j)``, one product per tap on
  channels-last tensors (the channel axis contiguous).

``swap_dilated_depthwise`` replaces such layers of a built network by
:class:`DilatedDepthwiseConv2d`: same parameters and state-dict keys, same forward; the new
backward runs only on CPU tensors with autograd recording (elsewhere it is ``nn.Conv2d``'s).
``training_layout`` is what a learner trains (that swap, channels-last); ``pseudoflow bench
step`` times a step of it against the network as built, side by side.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class _DilatedDepthwise(torch.autograd.Function):
    """``F.conv2d(x, weight, padding, dilation, groups=C)``, stride 1, no bias; both
    gradients from forward convolutions and per-tap products (module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation = padding, dilation
        return F.conv2d(x, weight, padding=padding, dilation=dilation, groups=weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        (pad_h, pad_w), (dil_h, dil_w) = ctx.padding, ctx.dilation
        k_h, k_w = weight.shape[-2:]
        grad_x = None
        if ctx.needs_input_grad[0]:
            flipped = (dil_h * (k_h - 1) - pad_h, dil_w * (k_w - 1) - pad_w)
            grad_x = F.conv2d(
                grad,
                weight.flip(2, 3),
                padding=flipped,
                dilation=(dil_h, dil_w),
                groups=weight.shape[0],
            )
        grad_w = None
        if ctx.needs_input_grad[1]:
            height, width = grad.shape[-2:]
            padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h)).permute(0, 2, 3, 1).contiguous()
            out = grad.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]
            taps = [
                (
                    padded[:, dil_h * i : dil_h * i + height, dil_w * j : dil_w * j + width] * out
                ).sum(dim=(0, 1, 2))
                for i in range(k_h)
                for j in range(k_w)
            ]
            grad_w = torch.stack(taps, dim=1).reshape(weight.shape).to(weight.dtype)
        return grad_x, grad_w, None, None


class DilatedDepthwiseConv2d(nn.Conv2d):
    """A depthwise, dilated, stride-1 ``nn.Conv2d`` whose backward on CPU avoids oneDNN's slow
    path (module docstring). Its forward is ``nn.Conv2d``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float[B, C, H, W] -> float[B, C, H', W']."""
        if x.device.type != "cpu" or not torch.is_grad_enabled():
            return super().forward(x)
        padding = self.padding
        assert isinstance(padding, tuple)  # eligible() admits explicit padding only
        out: torch.Tensor = _DilatedDepthwise.apply(x, self.weight, padding, self.dilation)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    @staticmethod
    def eligible(conv: nn.Module) -> bool:
        """A plain ``nn.Conv2d`` that is depthwise (one filter per channel), dilated, stride 1,
        zero-padded by explicit amounts no larger than the dilated kernel's reach."""
        if type(conv) is not nn.Conv2d:
            return False
        padding = conv.padding
        return (
            conv.groups == conv.in_channels == conv.out_channels
            and conv.stride == (1, 1)
            and max(conv.dilation) > 1
            and conv.padding_mode == "zeros"
            and isinstance(padding, tuple)
            and all(
                0 <= p <= d * (k - 1)
                for p, d, k in zip(padding, conv.dilation, conv.kernel_size, strict=True)
            )
        )


def swap_dilated_depthwise(model: nn.Module) -> int:
    """Replace every eligible layer of ``model`` in place by a :class:`DilatedDepthwiseConv2d`
    with the same parameters (state-dict keys unchanged); returns how many were replaced."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not DilatedDepthwiseConv2d.eligible(child):
                continue
            assert isinstance(child, nn.Conv2d)
            fast = DilatedDepthwiseConv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,  # type: ignore[arg-type]
                padding=child.padding,  # type: ignore[arg-type]
                dilation=child.dilation,  # type: ignore[arg-type]
                groups=child.groups,
                bias=child.bias is not None,
                device=child.weight.device,
                dtype=child.weight.dtype,
            )
            fast.load_state_dict(child.state_dict())
            setattr(parent, name, fast)
            swapped += 1
    return swapped


def training_layout(model: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """``model`` as it trains: its dilated depthwise layers swapped (``swap_dilated_depthwise``),
    on ``device``, channels-last (feed it channels-last batches). Returns it and the number of
    layers swapped."""
    swapped = swap_dilated_depthwise(model)
    return model.to(device).to(memory_format=torch.channels_last), swapped
