"""ViT-B scale checks (make test-slow): minutes on XLA:CPU, so outside the default run."""

import json

import pytest

from conftest import REPO, needs_xla
from parity.__main__ import main as parity_main


@pytest.mark.slow
@pytest.mark.vit
@needs_xla
def test_vit_base_cpu_and_xla_agree_to_fp32_rounding(tmp_path):
    config = str(REPO / "yaml/parity/vit_base_fp32.yaml")
    rc = parity_main(["run", "--config", config, "--out", str(tmp_path), "steps=2", "input.batch_size=1"])
    comp = json.loads((tmp_path / "report.json").read_text())["comparisons"][0]
    assert rc == 0, [c for c in comp["checks"] if c["ok"] is False]
    assert comp["losses"]["ar_loss"]["rel"] <= 1e-6 and comp["losses"]["kd_loss"]["rel"] <= 1e-6
    assert min(g["cosine"] for g in comp["grads"].values()) >= 0.99999
