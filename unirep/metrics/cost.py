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
    """``{"params", "weight_bytes", "macs_per_image", "milliseconds_per_image", "input",
    "device", "threads"}`` of ``net`` (``forward({stream: images})``) on float32 images
    ``[batch, *shape]`` of zeros.

    The network is put in evaluation mode for the measurement and back in its mode after."""
    was_training = net.training
    net.eval()
    try:
        device = next(net.parameters()).device
        one = torch.zeros(1, *shape, device=device)
        with FlopCounterMode(display=False) as counter:
            net({stream: one})
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
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "weight_bytes": weight_bytes(net),
        "macs_per_image": int(counter.get_total_flops() // 2),
        "milliseconds_per_image": 1000.0 * statistics.median(times) / batch,
        "input": [*shape],
        "device": device.type,
        "threads": torch.get_num_threads(),
    }
