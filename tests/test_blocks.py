"""Stacks of blocks (the student's encoder, the teacher's tower) run by the backends' runners: XLA's scanned loop,
with or without remat, and remat block by block, each equal to running the blocks one by one; and the settings
that choose them, checked where they are set."""

import json
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, needs_xla, subprocess_env
from digpt_xla.config import ConfigError, load_config
from digpt_xla.models.layers import (
    Block,
    DecoderBlock,
    run_in_order,
    segment_causal_mask,
    torch_checkpoint,
)


def test_eager_remat_recomputes_the_same_values_and_gradients():
    torch.manual_seed(0)
    blocks = [Block(32, 2) for _ in range(4)]
    mask = segment_causal_mask(3, 4)
    grads = []
    for remat in (False, True):
        x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        outs = run_in_order(blocks, x, (mask,), (2, 4), checkpoint=torch_checkpoint if remat else None)
        sum(o.square().mean() for o in outs).backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for b in blocks for p in b.parameters()])
        for b in blocks:
            b.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_each_block_reads_its_own_row_of_the_per_block_inputs():
    torch.manual_seed(0)
    blocks = [DecoderBlock(32, 2) for _ in range(2)]
    mask = segment_causal_mask(3, 4)
    x, latent = torch.randn(2, 13, 32), torch.randn(2, 2, 13, 32)
    (out,) = run_in_order(blocks, x, (mask,), (), (latent,))
    expected = blocks[1](blocks[0](x, latent[0], mask), latent[1], mask)
    assert torch.equal(out, expected)
    (swapped,) = run_in_order(blocks, x, (mask,), (), (latent.flip(0),))
    assert not torch.allclose(swapped, out)
    with pytest.raises(ValueError, match="one row for each of 2 blocks"):
        run_in_order(blocks, x, (mask,), (), (latent[:1],))


@pytest.mark.multiprocess
@needs_xla
def test_scanned_and_rematerialised_blocks_equal_the_loop_on_xla():
    proc = subprocess.run(
        [PYTHON, "tests/workers/scanned_blocks.py"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    differences = json.loads(proc.stdout.strip().splitlines()[-1])
    bf16 = {k: differences.pop(k) for k in ("bf16_scan", "bf16_scan_remat", "bf16_decoders_scan_remat")}
    assert {"decoders_scan", "decoders_scan_remat", "decoders_remat"} <= set(differences)
    # A frozen stack stacked once before the step: its blocks' own weights hold no memory, its state dict reads the
    # same keys and values from the stacks, and the step's program has one concatenation fewer for each stacked
    # weight (torch.stack lowers to one).
    assert differences.pop("teacher_state_dict_unchanged") is True
    assert differences.pop("teacher_block_weights_held") == 0
    stacked = differences.pop("teacher_stacked_weights")
    in_step, prestacked = differences.pop("teacher_concatenates_in_step")
    assert stacked > 0 and in_step - prestacked == stacked, (in_step, prestacked, stacked)
    assert differences.pop("bf16_scan_mixed_type_ops") == 0, "the scanned bf16 program mixes types in one op"
    # A stack with several taps is one loop (its outputs at the earlier taps collected by the loop), not one loop per
    # run of blocks between taps: libtpu lowers each loop body on its own.
    assert differences.pop("tapped_stack_loops") == 2
    # SDPA and its written-out math (which the scan traces): the same numbers on XLA, bit for bit
    assert differences.pop("written_out_sdpa_fp32") == 0 and differences.pop("written_out_sdpa_bf16") == 0
    assert all(d < 1e-5 for d in differences.values()), differences
    assert all(d < 2e-2 for d in bf16.values()), bf16  # bf16 rounding, where XLA fuses differently


def test_scan_and_remat_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="backend.scan=always with backend.name='cpu'"):
        load_config(None, ["backend.name=cpu", "backend.scan=always"])
    with pytest.raises(ConfigError, match="backend.remat"):
        load_config(None, ["backend.remat=layers"])
    assert load_config(None, ["backend.name=cpu", "backend.remat=blocks"]).backend.remat == "blocks"
