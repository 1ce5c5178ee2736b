"""XLA: after warm-up the training step never compiles again, falls back to no ``aten::`` CPU op, and reads
nothing on the host except at the log interval and at checkpoints (asserted through torch_xla's counters)."""

import pytest

from conftest import REPO, needs_xla
from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer

STEPS, LOG_EVERY, CHECKPOINT_AT = 50, 5, 23


@pytest.mark.slow
@needs_xla
def test_one_compilation_no_fallbacks_no_host_reads_inside_steps(tmp_path):
    overrides = [
        "backend.name=xla",
        f"run.out_dir={tmp_path}",
        "run.progress=false",
        "run.knn_eval=false",
        f"run.log_every={LOG_EVERY}",
        "run.ckpt_every=0",
        "data.batch_size=8",
        "run.resume=never",
    ]
    trainer = Pretrainer(load_config(REPO / "yaml/demo.yaml", overrides))
    b = trainer.backend
    counters = [b.debug_counters()]
    for _ in range(STEPS):  # new images and segment orders every step; the lr changes every step (warmup)
        trainer.run_step()  # the loop's own step: metrics at the log cadence, then the graph cut
        if trainer.step == CHECKPOINT_AT:
            trainer.save_checkpoint()
        counters.append(b.debug_counters())
    compiles = [c["compilations"] for c in counters]
    assert compiles[1] - compiles[0] == 1, f"the first step compiles the step graph once: {compiles}"
    assert compiles[2:] == [compiles[1]] * (STEPS - 1), f"no compilation after the first step: {compiles}"
    assert counters[-1]["aten_fallbacks"] == {}, "no aten:: op falls back to the CPU"
    reads = [
        s
        for s in range(1, STEPS + 1)
        if counters[s]["device_to_host_transfers"] > counters[s - 1]["device_to_host_transfers"]
    ]
    expected = sorted({s for s in range(LOG_EVERY, STEPS + 1, LOG_EVERY)} | {CHECKPOINT_AT})
    assert reads == expected, "device-to-host transfers only at the log interval and the checkpoint"
    assert trainer.last_metrics["loss"] > 0 and not trainer.nonfinite_seen
