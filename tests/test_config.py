import time

import pytest

from conftest import FAST_CPU, needs_xla
from digpt_xla.cli import main as digpt_main
from digpt_xla.config import ConfigError, load_config

# Every config mistake, whether in a file or an override, is found here: one line naming the key, exit 2.
CPU = FAST_CPU


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


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
    import fsspec

    import yaml
    from conftest import REPO
    from digpt_xla.models import digpt_config

    raw = yaml.safe_load((REPO / path).read_text())
    gs = {f"{s}.{k}": v for s, section in raw.items() for k, v in section.items() if str(v).startswith("gs://")}
    try:
        fsspec.get_filesystem_class("gs")
        overrides = []
    except ImportError:  # gcsfs is the optional [gcs] extra: its URLs are refused at load, naming key and extra
        if gs:
            with pytest.raises(ConfigError, match=r"gs:// needs a package that is not installed \(pip install"):
                load_config(REPO / path)
        overrides = [f"{key}=memory://{url.removeprefix('gs://')}" for key, url in gs.items()]
    cfg = load_config(REPO / path, overrides)
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


def test_an_attention_kernel_a_backend_cannot_run_is_refused_at_load():
    # One table says where each kernel runs: the config is refused before any backend starts.
    for backend in ("xla", "xla-spmd"):
        with pytest.raises(ConfigError, match=f"model.attention='flex' runs on the cpu, cuda backends; {backend} runs"):
            load_config(None, [f"backend.name={backend}", "model.attention=flex"])
    assert load_config(None, ["backend.name=auto", "model.attention=flex"]).model.attention == "flex"


@needs_xla
def test_xla_refuses_flex_attention():
    from digpt_xla.backend import BackendError, create_backend

    with pytest.raises(BackendError, match="model.attention='flex' runs on the cpu, cuda backends"):
        create_backend("xla").check_attention("flex")


def test_the_adamw_kernel_is_a_setting_each_backend_checks():
    from digpt_xla.backend import create_backend

    cpu = create_backend("cpu")
    assert cpu.optimizer_options() == {} and cpu.optimizer_options("fused") == {"fused": True}
    assert cpu.optimizer_options("for-loop") == {"foreach": False}
    with pytest.raises(ConfigError, match="optim.implementation: 'apex' is not one of auto, for-loop, foreach, fused"):
        load_config(None, ["optim.implementation=apex"])


def test_tf32_is_a_cuda_setting():
    from digpt_xla.backend import BackendError, create_backend

    assert load_config(None, ["backend.name=cuda", "backend.tf32=true"]).backend.tf32 is True
    with pytest.raises(ConfigError, match="backend.name='cpu': TF32 is an NVIDIA tensor-core mode"):
        load_config(None, ["backend.name=cpu", "backend.tf32=true"])
    cpu = create_backend("cpu")
    cpu.set_tf32(False)
    with pytest.raises(BackendError, match="backend.name=.cpu.: TF32"):  # backend.name=auto that resolved to cpu
        cpu.set_tf32(True)


@needs_xla
def test_xla_refuses_the_fused_adamw_kernel_and_keeps_capturable():
    from digpt_xla.backend import BackendError, create_backend

    xla = create_backend("xla")
    assert xla.optimizer_options("foreach") == {"capturable": True, "foreach": True}
    with pytest.raises(BackendError, match="optim.implementation='fused' cannot run on xla"):
        xla.optimizer_options("fused")


BAD_VALUES = [
    (["data.batch_size=-4", "optim.lr=1e-3"], "data.batch_size=-4"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["run.log_every=0"], "run.log_every=0"),
    (["optim.accum_steps=0"], "optim.accum_steps=0"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]"),
    (["optim.lr=.nan"], "optim.lr=nan"),
    (["schedule.epochs=-1"], "schedule.epochs=-1"),
    (["data.train_fraction=1.5"], "data.train_fraction=1.5"),
    (["data.source=webdataset", "data.urls=/data/shard-{000000..000009.tar"], "data.urls="),
    (["teacher.kind=clip", "teacher.clip_model=ViT-Q-99"], "teacher.clip_model: 'ViT-Q-99'"),
    (["model.name=vit_b"], "model.name='vit_b'"),
    (["backend.precision=fp16"], "backend.precision='fp16'"),
    (["run.resume=/nonexistent/ckpt-00000010.pt"], "/nonexistent/ckpt-00000010.pt: checkpoint not found"),
    (["teacher.kind=clip", "teacher.clip_model=ViT-B-16", "teacher.checkpoint=GARBAGE"], "not a readable safetensors"),
    (["data.urls={a", "data.source=webdataset"], "not valid YAML"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES, ids=[e for _, e in BAD_VALUES])
def test_bad_values_are_one_line_and_exit_2_within_seconds(tmp_path, capsys, overrides, expected):
    overrides = [o.replace("GARBAGE", str(tmp_path / "garbage.safetensors")) for o in overrides]
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    t0 = time.perf_counter()
    rc = digpt_main(["pretrain", "--config", "yaml/demo.yaml", *CPU, f"run.out_dir={tmp_path / 'out'}", *overrides])
    assert rc == 2
    assert expected in _one_error_line(capsys)
    assert time.perf_counter() - t0 < 15


def test_finetune_and_yaml_mistakes_name_the_key_or_file(tmp_path, capsys):
    assert digpt_main(["finetune", f"finetune.checkpoint={tmp_path / 'missing.pt'}", f"run.out_dir={tmp_path}"]) == 2
    assert "missing.pt: checkpoint not found" in _one_error_line(capsys)
    assert digpt_main(["finetune", "finetune.num_classes=5", f"run.out_dir={tmp_path}"]) == 2
    assert "finetune.num_classes=5 but the data has 10 classes" in _one_error_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: digpt_tiny\ndata: [unclosed\n")
    assert digpt_main(["pretrain", "--config", str(bad)]) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line and "line 4" in line and "YAML syntax error" in line


def test_a_compile_cache_that_is_a_file_is_refused_at_load(tmp_path, capsys):
    (tmp_path / "cache").write_text("")
    code = digpt_main(
        [
            "pretrain",
            "--config",
            "yaml/demo.yaml",
            *CPU,
            f"backend.compile_cache={tmp_path / 'cache'}",
            f"run.out_dir={tmp_path}",
        ]
    )
    assert code == 2 and "backend.compile_cache=" in _one_error_line(capsys)


def test_every_pretraining_run_draws_its_loss_curve_and_names_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        digpt_main(["pretrain", "--config", "yaml/demo.yaml", *CPU, "schedule.max_steps=3", f"run.out_dir={out}"]) == 0
    )
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert f"tensorboard --logdir {out}/tb" in capsys.readouterr().out


def test_every_config_key_is_explained_and_the_docs_table_is_current(capsys):
    from digpt_xla.config import Config
    from digpt_xla.config_keys import DOC, keys, updated_doc

    rows = keys(Config())
    assert len(rows) > 60 and all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]
    assert DOC.read_text() == updated_doc(DOC.read_text()), "run: python -m digpt_xla.config_keys --update-docs"
    assert digpt_main(["config", "--config", "yaml/demo.yaml", "schedule.max_steps=7"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == len(rows) and any(line.startswith("schedule.max_steps = 7 ") for line in shown), shown
    assert digpt_main(["config", "schedule.max_stepz=7"]) == 2  # the same checks as a run
