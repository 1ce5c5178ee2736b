import os
import signal
import subprocess
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


def needs_xla(test):
    """Marks a test that runs torch_xla in this process (``xla``: left out of ``make test-quick``, whose loop would
    wait for its compiles) and skips it where torch_xla is not installed."""
    return pytest.mark.xla(pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed")(test))


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


@pytest.fixture(autouse=True)
def _python_processes_only_when_marked(request, monkeypatch):
    """A test that starts a Python process (a command-line run, torchrun, multi-device XLA, libtpu's compiler) says
    so with the ``multiprocess`` marker, which ``make test-quick`` leaves out: the marker follows what a test does,
    and a test that starts one unmarked fails here, naming the command."""
    if request.node.get_closest_marker("multiprocess") is None:
        launch = subprocess.Popen.__init__

        def guarded(self, args, *rest, **kwargs):
            argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
            if argv and "python" in os.path.basename(os.fsdecode(argv[0])):
                pytest.fail(f"starts {' '.join(map(os.fsdecode, argv[:5]))}...: mark it multiprocess", pytrace=False)
            launch(self, args, *rest, **kwargs)

        monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


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


def share_of(percent: float, total: int) -> bool:
    """Whether ``percent`` is a whole count of ``total`` samples in percent (an accuracy over the whole evaluation
    set, not a mean over unequal batches or a padded set)."""
    count = percent * total / 100
    return 0 <= percent <= 100 and abs(count - round(count)) < 1e-3


def torchrun(nproc: int | str) -> list[str]:
    """The start of a command that runs ``nproc`` local processes under torchrun (one machine, gloo on the CPU)."""
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
