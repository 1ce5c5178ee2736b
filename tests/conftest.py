import os
import signal
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("PJRT_DEVICE", "CPU")


def _has_xla() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


HAS_XLA = _has_xla()
if HAS_XLA:
    # Autograd sizes its per-device queues at the first backward of the process; torch_xla must be loaded before
    # any test runs one, or a later in-process XLA backward fails (the parity harness does the same up front).
    import torch_xla
    import torch_xla.runtime

    torch_xla.runtime.global_runtime_device_count()
needs_xla = pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _signal_dispositions():
    # A trainer stopped by a signal inside this process ignores further stop signals for the rest of the process
    # (its shutdown must not be cut short); here the process goes on, and a child started later would inherit the
    # ignored SIGTERM and outlive the tests that signal it.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PJRT_DEVICE", "CPU")
    env.update(extra)
    return env


PYTHON = sys.executable
# A small eager run: two blocks, 16 images a step, every step logged.
FAST_CPU = ["backend.name=cpu", "run.progress=false", "run.knn_eval=false", "model.depth=2", "data.batch_size=16"]


# Files whose tests launch torchrun, multi-device XLA or libtpu processes: left out of `make test-quick`.
MULTIPROCESS_FILES = {"test_scale_out.py", "test_preemption.py", "test_compile_stability.py", "test_tpu_plan.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in MULTIPROCESS_FILES:
            item.add_marker(pytest.mark.multiprocess)


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> str:
    """The one eager reference run tests share: two steps of the demo on the cpu backend; its last checkpoint."""
    from digpt_xla.config import load_config
    from digpt_xla.engine import Pretrainer

    out = tmp_path_factory.mktemp("demo")
    overrides = ["backend.name=cpu", "schedule.max_steps=2", "run.knn_eval=false", "run.progress=false"]
    checkpoint = Pretrainer(load_config(REPO / "yaml/demo.yaml", [*overrides, f"run.out_dir={out}"])).train().checkpoint
    assert checkpoint is not None
    return checkpoint


def torchrun(nproc: int | str) -> list[str]:
    """The start of a command that runs ``nproc`` local processes under torchrun (one machine, gloo on the CPU)."""
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
