import pytest

from conftest import needs_xla
from digpt_xla.config import ConfigError, load_config

REPO_YAML = [
    "yaml/demo.yaml",
    "yaml/pretrain/vit_base_gpu.yaml",
    "yaml/pretrain/vit_base_tpu.yaml",
    "yaml/pretrain/vit_large_gpu.yaml",
    "yaml/pretrain/vit_large_tpu.yaml",
    "yaml/pretrain/vit_huge_gpu.yaml",
    "yaml/pretrain/vit_huge_tpu.yaml",
]


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: digpt_tiny\noptim:\n  blr: 1.0e-3\n")
    cfg = load_config(
        path,
        [
            "optim.blr=2e-4",
            "data.batch_size=8",
            "optim.betas=[0.9, 0.99]",
            "optim.clip_grad=null",
            "schedule.epochs=2",
            "model.feature_taps=[2,4]",
        ],
    )
    assert cfg.optim.blr == 2e-4 and isinstance(cfg.optim.blr, float)
    assert cfg.data.batch_size == 8 and cfg.optim.betas == [0.9, 0.99]
    assert cfg.optim.clip_grad is None and cfg.schedule.epochs == 2.0 and isinstance(cfg.schedule.epochs, float)
    assert cfg.model.feature_taps == [2, 4]
    assert cfg.run.log_every == 10  # untouched default


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.weight_decy' \(closest: optim.weight_decay"):
        load_config(None, ["optim.weight_decy=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'"):
        load_config(None, ["optimizer.lr=1"])


def test_wrong_type_names_key_value_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size: value 'big' is a str, expected int"):
        load_config(None, ["data.batch_size=big"])
    with pytest.raises(ConfigError, match=r"data.batch_size: value 2.5 is a float, expected int"):
        load_config(None, ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match=r"backend.precision: 'fp8' is not one of fp32, bf16, fp16"):
        load_config(None, ["backend.precision=fp8"])
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  seed: [1]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: run.seed: value \[1\] is a list, expected int"):
        load_config(path)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["data.batch_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", REPO_YAML)
def test_shipped_configs_load(path):
    from conftest import REPO
    from digpt_xla.models import digpt_config

    cfg = load_config(REPO / path)
    digpt_config(cfg.model.name, **cfg.model.shape_overrides())


def test_attention_mode_and_the_deprecated_boolean():
    assert load_config(None, []).model.attention == "sdpa"
    assert load_config(None, ["model.fused_attention=false"]).model.attention == "explicit"
    assert load_config(None, ["model.fused_attention=true"]).model.attention == "sdpa"
    assert load_config(None, ["model.attention=flex"]).model.attention == "flex"
    with pytest.raises(ConfigError, match="model.fused_attention=False contradicts model.attention='flex'"):
        load_config(None, ["model.attention=flex", "model.fused_attention=false"])
    with pytest.raises(ConfigError, match="model.attention: 'dense' is not one of sdpa, explicit, flex"):
        load_config(None, ["model.attention=dense"])


@needs_xla
def test_xla_refuses_flex_attention():
    from digpt_xla.backend import BackendError, create_backend

    with pytest.raises(BackendError, match="model.attention='flex' runs on the cpu and cuda backends"):
        create_backend("xla").check_attention("flex")
