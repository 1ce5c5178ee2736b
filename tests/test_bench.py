import json
import subprocess

from conftest import PYTHON, REPO, subprocess_env


def test_bench_train_writes_json_with_flops_and_mfu(tmp_path):
    cmd = [PYTHON, "tools/bench.py", "train", "--model", "digpt_tiny", "--backend", "cpu", "--batch", "4",
           "--steps", "2", "--warmup", "1", "--name", "t", "--out", str(tmp_path),
           "--out-dir", str(tmp_path / "r")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("*/t.json")
    result = json.loads(path.read_text())
    # digpt_tiny, batch 4: forward + backward is a few hundred MFLOP; the counter must see the matmuls
    assert 1e8 < result["flops_per_step"] < 1e10
    assert result["images_per_s"] > 0 and 0 < result["mfu"] < 1.5
    assert result["step_time_s"]["min"] <= result["step_time_s"]["median"] <= result["step_time_s"]["max"]
    assert result["matmul_peak_gflops"]["fp32"] > 1
    assert "img/s" in proc.stdout


def test_bench_data_reports_images_per_core_for_generated_jpeg_shards(tmp_path):
    cmd = [PYTHON, "tools/bench.py", "data", "--source", "webdataset", "--img-size", "64", "--batch", "8",
           "--batches", "2", "--warmup", "1", "--images", "40", "--name", "d", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("*/d.json")
    result = json.loads(path.read_text())
    assert result["source"] == "webdataset" and result["workers"] == 0
    assert result["images_per_s"] > 0 and result["images_per_s_per_core"] == result["images_per_s"]
    assert "img/s per core" in proc.stdout
