"""XLA: after warm-up the training step never compiles again (log flushes and checkpoints included)."""

from conftest import REPO, needs_xla
from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer


@needs_xla
def test_no_compilation_after_warmup(tmp_path):
    overrides = ["backend.name=xla", f"run.out_dir={tmp_path}", "run.progress=false", "run.knn_eval=false",
                 "run.log_every=3", "run.ckpt_every=0", "data.batch_size=8", "run.resume=never"]  # fmt: skip
    trainer = Pretrainer(load_config(REPO / "yaml/demo.yaml", overrides))
    stream = trainer.device_batches()
    compiles = []
    for _ in range(14):  # changing images and segment orders every step; lr changes every step (warmup)
        trainer.train_step(*trainer.next_step_inputs(stream))
        trainer.step += 1
        if trainer.step % 3 == 0:
            trainer._flush_metrics(trainer._lr(trainer.step - 1))
        trainer.backend.mark_step()
        if trainer.step == 7:
            trainer.save_checkpoint()
        compiles.append(trainer.backend.debug_counters()["compilations"])
    assert compiles[1] == compiles[-1], f"compilations per step: {compiles}"
    assert trainer.last_metrics["loss"] > 0 and not trainer.nonfinite_seen
