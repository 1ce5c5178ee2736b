"""Stacks of blocks on one XLA:CPU device, run one by one and by the XLA backend's runners (scanned, scanned with
remat, rematerialised block by block), in fp32 and under bf16 autocast, encoder blocks and decoder blocks that each
read their own row of a latent: prints the largest differences of outputs and gradients as JSON, with SDPA against
its written-out math and the mixed-dtype ops of the scanned bf16 program."""

import contextlib
import json
import re

import torch
import torch_xla

from digpt_xla.backend.xla.blocks import PrestackedScan, run_rematerialised, scan_blocks
from digpt_xla.models.layers import (
    SDPA_WRITTEN_OUT,
    Block,
    DecoderBlock,
    attention_product,
    run_in_order,
    segment_causal_mask,
)
from digpt_xla.teacher import ClipTeacher

torch.manual_seed(0)
device = torch_xla.device()
blocks = [Block(32, 2).to(device) for _ in range(6)]
mask = segment_causal_mask(3, 4).to(device)
x0 = torch.randn(2, 13, 32)
taps = (3, 4, 6)  # one scanned loop of 6 blocks, the outputs after blocks 3 and 4 collected by it


def run(runner, bf16=False, hlo=None, stack=blocks, taps=taps, per_block=()):
    """Outputs, then the gradients of x, of each per-block input and of the stack's parameters, on the host."""
    for b in stack:
        b.zero_grad(set_to_none=True)
    x = x0.to(device).requires_grad_(True)
    rows = tuple(t.to(device).requires_grad_(True) for t in per_block)
    with torch.autocast("xla", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        outs = runner(stack, x, (mask,), taps, rows)
    sum((o.float() ** 2).mean() for o in outs).backward()
    grads = [x.grad] + [r.grad for r in rows] + [p.grad for b in stack for p in b.parameters()]
    if hlo is not None:
        hlo.append(torch_xla._XLAC._get_xla_tensors_hlo(grads))
    torch_xla.sync()
    return [o.cpu() for o in outs] + [g.cpu() for g in grads if g is not None]  # None: a block after the last tap


def largest_difference(a, b):
    return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))


reference, scanned_program = run(run_in_order), []
result = {
    "scan": largest_difference(run(scan_blocks, hlo=scanned_program), reference),
    # taps that stop before the last block: the blocks after the last tap are not run
    "scan_early_taps": largest_difference(run(scan_blocks, taps=(2, 4)), run(run_in_order, taps=(2, 4))),
    "scan_remat": largest_difference(run(lambda *a: scan_blocks(*a, remat=True)), reference),
    "remat": largest_difference(run(run_rematerialised), reference),
}
# The three runs between taps are one loop: one ``while`` forward, one backward.
result["tapped_stack_loops"] = scanned_program[0].count(" while(")
# A decoder stack: each block cross-attends to its own row of the latent (``per_block``), scanned as one loop.
decoders = [DecoderBlock(32, 2).to(device) for _ in range(3)]
latent0 = torch.randn(3, 2, 13, 32)


def run_decoders(runner, bf16=False):
    return run(runner, bf16, stack=decoders, taps=(), per_block=(latent0,))


decoder_reference = run_decoders(run_in_order)
result["decoders_scan"] = largest_difference(run_decoders(scan_blocks), decoder_reference)
result["decoders_scan_remat"] = largest_difference(
    run_decoders(lambda *a: scan_blocks(*a, remat=True)), decoder_reference
)
result["decoders_remat"] = largest_difference(run_decoders(run_rematerialised), decoder_reference)
result["bf16_decoders_scan_remat"] = largest_difference(
    run_decoders(lambda *a: scan_blocks(*a, remat=True), bf16=True), run_decoders(run_in_order, bf16=True)
)
bf16_reference, bf16_program = run(run_in_order, bf16=True), []
result["bf16_scan"] = largest_difference(run(scan_blocks, bf16=True, hlo=bf16_program), bf16_reference)
result["bf16_scan_remat"] = largest_difference(run(lambda *a: scan_blocks(*a, remat=True), bf16=True), bf16_reference)
# An elementwise op whose operands differ in type is what XLA's verifier rejects when libtpu compiles the step.
elementwise = r"(multiply|add|subtract|divide|maximum)"
operands = re.compile(rf" {elementwise}\((\w+)\[[^ ]* %[\w.]+, (\w+)\[")
result["bf16_scan_mixed_type_ops"] = sum(1 for m in operands.finditer(bf16_program[0]) if m.group(2) != m.group(3))
q, k, v = (torch.randn(2, 4, 13, 24, device=device, requires_grad=True) for _ in range(3))
for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
    answers = []
    for mode in ("sdpa", SDPA_WRITTEN_OUT):
        with torch.autocast("xla", dtype=dtype) if dtype else contextlib.nullcontext():
            out = attention_product(*(t.to(dtype or t.dtype) for t in (q, k, v)), mask, mode)
        grads = torch.autograd.grad((out.float() * torch.arange(24.0, device=device)).sum(), (q, k, v))
        answers.append([out.float().cpu()] + [g.cpu() for g in grads])
    result[f"written_out_sdpa_{name}"] = largest_difference(*answers)
teacher = ClipTeacher("ViT-B-16", vision_overrides=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=32))
images = torch.randn(2, 3, 32, 32)
expected = teacher(images)
state = {k: v.clone() for k, v in teacher.state_dict().items()}
teacher = teacher.to(device)
teacher.block_runner = scan_blocks
features = teacher(images.to(device))
in_step_program = torch_xla._XLAC._get_xla_tensors_hlo([features])
result["teacher_scan"] = float((features.cpu() - expected).abs().max())
# Stacked once, before the step: the blocks' own weights leave the device and the step stacks nothing.
runner = PrestackedScan(teacher, teacher.runner_blocks(), lambda stack, members: None, torch_xla.sync)
teacher.block_runner = runner
features = teacher(images.to(device))
prestacked_program = torch_xla._XLAC._get_xla_tensors_hlo([features])
result["teacher_prestacked"] = float((features.cpu() - expected).abs().max())
result["teacher_stacked_weights"] = len(runner.buffers)
result["teacher_concatenates_in_step"] = [p.count(" concatenate(") for p in (in_step_program, prestacked_program)]
result["teacher_block_weights_held"] = sum(
    p.device.type != "meta" for b in teacher.runner_blocks() for p in b.parameters()
)
result["teacher_state_dict_unchanged"] = all(
    torch.equal(v.cpu(), state[k]) for k, v in teacher.state_dict().items()
) and set(teacher.state_dict()) == set(state)
print(json.dumps(result))
