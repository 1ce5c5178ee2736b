"""Stacks of blocks on one XLA:CPU device, run one by one and by the XLA backend's runners (scanned, scanned with
remat, rematerialised block by block): prints the largest differences of outputs and gradients as JSON."""

import json

import torch
import torch_xla

from digpt_xla.backend.xla.blocks import run_rematerialised, scan_blocks
from digpt_xla.models.layers import Block, run_in_order, segment_causal_mask
from digpt_xla.teacher import ClipTeacher

torch.manual_seed(0)
device = torch_xla.device()
blocks = [Block(32, 2).to(device) for _ in range(6)]
mask = segment_causal_mask(3, 4).to(device)
x0 = torch.randn(2, 13, 32)
taps = (3, 4, 6)  # a scanned run of 3 blocks, one of 1, one of 2


def run(runner):
    for b in blocks:
        b.zero_grad(set_to_none=True)
    x = x0.to(device).requires_grad_(True)
    outs = runner(blocks, x, (mask,), taps)
    sum((o.float() ** 2).mean() for o in outs).backward()
    torch_xla.sync()
    return [o.cpu() for o in outs] + [x.grad.cpu()] + [p.grad.cpu() for b in blocks for p in b.parameters()]


def largest_difference(a, b):
    return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))


reference = run(run_in_order)
result = {
    "scan": largest_difference(run(scan_blocks), reference),
    "scan_remat": largest_difference(run(lambda *a: scan_blocks(*a, remat=True)), reference),
    "remat": largest_difference(run(run_rematerialised), reference),
}
teacher = ClipTeacher("ViT-B-16", vision_overrides=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=32))
images = torch.randn(2, 3, 32, 32)
expected = teacher(images)
teacher = teacher.to(device)
teacher.block_runner = scan_blocks
result["teacher_scan"] = float((teacher(images.to(device)).cpu() - expected).abs().max())
print(json.dumps(result))
