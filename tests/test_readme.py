"""The README's runnable examples, run as written on tiny settings (paths swapped for temporary ones), so they
stay true: the gap ledger add/report pair, the checkpoint converter and the probe."""

import re
import shlex

from test_hostile_input import _convert

from conftest import REPO
from digpt_xla.cli import main as digpt_main
from parity.__main__ import main as parity_main


def readme_commands(prefixes: tuple[str, ...]) -> list[str]:
    """Shell commands of the bash blocks of the README and docs/ that start with one of ``prefixes``
    (continuations joined)."""
    texts = [(REPO / "README.md").read_text(), *(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))]
    blocks = [b for text in texts for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command.startswith(prefixes):
                commands.append(command)
    return commands


def test_readme_examples_run(tmp_path, demo_checkpoint, capsys):
    swaps = {
        "runs/demo/checkpoints/ckpt-00000198.pt": demo_checkpoint,
        "runs/vit_base_gpu/checkpoints/ckpt-00100000.pt": demo_checkpoint,
        "vit_b.safetensors": str(tmp_path / "vit_b.safetensors"),
        "gap.jsonl": str(tmp_path / "gap.jsonl"),
        "gap.md": str(tmp_path / "gap.md"),
    }
    commands = readme_commands(("python -m parity gap", "python tools/convert_checkpoint.py", "digpt probe"))
    kinds = [" ".join(c.split()[:4]) for c in commands]
    assert kinds.count("python -m parity gap") >= 3, commands
    assert any(k.startswith("python tools/convert_checkpoint.py") for k in kinds), commands
    assert any(k.startswith("digpt probe") for k in kinds), commands
    for command in commands:
        for old, new in swaps.items():
            command = command.replace(old, new)
        argv = shlex.split(command)
        if argv[:3] == ["python", "-m", "parity"]:
            rc = parity_main(argv[3:])
        elif argv[1] == "tools/convert_checkpoint.py":
            rc = _convert(argv[2:])
        else:
            rc = digpt_main([*argv[1:], f"run.out_dir={tmp_path / 'probe'}", "probe.epochs=5"])
        assert rc == 0, (command, capsys.readouterr().err[-2000:])
    assert "knn_top1" in (tmp_path / "gap.md").read_text()
    assert (tmp_path / "vit_b.safetensors").stat().st_size > 0 and (tmp_path / "probe" / "probe.json").exists()


def test_the_tests_readme_names_every_test_file():
    named = (REPO / "tests" / "README.md").read_text()
    files = sorted(p.name for p in (REPO / "tests").glob("test_*.py"))
    assert [f for f in files if f"`{f}`" not in named] == []
