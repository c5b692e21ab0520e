"""What a network costs to keep and to run: parameters, weight bytes, MACs and time per image.

MACs are counted by torch's own :class:`torch.utils.flop_counter.FlopCounterMode` (matrix
multiplications and convolutions; one MAC is two FLOPs) on one image; the time is the median of
a few timed forward passes of a small batch in evaluation mode without gradients, on the device
the network is on, divided by the batch size. Both are for one stream's images as the run feeds
them (the first stream of a multi-domain student: its backbone and that domain's head).
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def input_shape(preprocessing: dict[str, Any]) -> list[int] | None:
    """``[3, H, W]`` of the images a stream's preprocessing record describes (a centre crop, or a
    dense benchmark's stored size), or None where it does not say."""
    if "crop" in preprocessing:
        return [3, int(preprocessing["crop"]), int(preprocessing["crop"])]
    size = preprocessing.get("image_size")
    if size:
        return [3, int(size[0]), int(size[1])]
    return None


def weight_bytes(net: nn.Module) -> int:
    """Bytes of ``net``'s parameters and buffers as stored (what its safetensors file holds,
    less the header)."""
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


@torch.no_grad()
def inference_cost(
    net: nn.Module, stream: str, shape: list[int], batch: int = 8, repeats: int = 5
) -> dict[str, Any]:
    """``{"params", "nonzero_params", "weight_bytes", "macs_per_image",
    "nonzero_macs_per_image", "milliseconds_per_image", "input", "device", "threads"}`` of
    ``net`` (``forward({stream: images})``) on float32 images ``[batch, *shape]`` of zeros.

    ``nonzero_macs_per_image`` counts each convolution and linear layer with its zero weights
    skipped (what a sparse kernel would compute: output positions × non-zero weights); the rest
    of the MACs (attention products, ...) as FlopCounterMode counts them.

    The network is put in evaluation mode for the measurement and back in its mode after."""
    was_training = net.training
    net.eval()
    try:
        device = next(net.parameters()).device
        one = torch.zeros(1, *shape, device=device)
        skipped: list[int] = []  # per layer: dense MACs − MACs over its non-zero weights
        hooks = [
            m.register_forward_hook(partial(_zero_macs, skipped))
            for m in net.modules()
            if isinstance(m, nn.Conv2d | nn.Linear)
        ]
        try:
            with FlopCounterMode(display=False) as counter:
                net({stream: one})
        finally:
            for h in hooks:
                h.remove()
        images = torch.zeros(batch, *shape, device=device)
        net({stream: images})  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            net({stream: images})
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        net.train(was_training)
    macs = int(counter.get_total_flops() // 2)
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "nonzero_params": sum(int(p.count_nonzero()) for p in net.parameters()),
        "weight_bytes": weight_bytes(net),
        "macs_per_image": macs,
        "nonzero_macs_per_image": macs - sum(skipped),
        "milliseconds_per_image": 1000.0 * statistics.median(times) / batch,
        "input": [*shape],
        "device": device.type,
        "threads": torch.get_num_threads(),
    }


def _zero_macs(skipped: list[int], module: nn.Module, _inputs: Any, output: Any) -> None:
    """Forward hook: the MACs ``module`` (a convolution or linear layer) spends on zero weights
    for one image, ``output positions × zero weights`` (per output channel group)."""
    weight = module.weight  # type: ignore[union-attr]
    zeros = weight.numel() - int(weight.count_nonzero())
    if zeros == 0 or not isinstance(output, torch.Tensor):
        return
    out_channels = weight.shape[0]
    positions = output[0].numel() // out_channels  # per image: H_out·W_out (1 for linear)
    skipped.append(positions * zeros)
