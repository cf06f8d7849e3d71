"""The docs check: every `hybridprune` command shown in README.md and docs/*.md parses with the real parser, and
(slow) runs as written, page after page, in one temporary folder, so the pages cannot drift from the tool.

Commands are read from ```bash blocks (```text blocks are synopses: `[...]`, `|`, not run). A ```python block whose
first line is `# NAME.py` is written to that file first (the README's `mynet.py`). Runs are shrunk to tiny sizes by
appending the flags SMOKE lists for its subcommand (argparse keeps the last value given); the environment
variable HYBRIDPRUNE_DOCS_SMOKE=0 runs them at the sizes shown instead (hours on a CPU). Commands that need what a
test machine lacks are parsed only, each for the reason in PARSE_ONLY.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hybridprune.cli import build_parser
from hybridprune.hardware import cpu_flags, native_bf16

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# flags appended to shrink a command, per subcommand, where the subcommand has them
TRAINING = {"--train-size": "64", "--test-size": "32", "--epochs": "1", "--finetune-epochs": "1", "--batch-size": "32",
            "--calib-batches": "1", "--bn-recalib-batches": "1"}  # fmt: skip
LATENCY = {"--latency-points": "2", "--latency-batch": "4"}
DEPLOY = {"--deploy-batch": "4", "--deploy-rounds": "1", "--calibration-images": "32"}
SMOKE = {
    "run": {**TRAINING, **LATENCY, **DEPLOY, "--no-progress": None},
    "train": {**{k: TRAINING[k] for k in ("--train-size", "--test-size", "--epochs", "--batch-size")},
              "--no-progress": None},
    "prune": {**{k: v for k, v in TRAINING.items() if k not in ("--epochs", "--batch-size")}, **LATENCY,
              "--no-progress": None},
    "evaluate": {"--test-size": "32"},
    "profile": {**LATENCY, "--check-ratios": "", "--no-progress": None},
    "bench": {"--batch-size": "2", "--rounds": "1", "--calls": "1", "--no-progress": None},
    "convert": {"--batch-size": "2"},
    "export": {"--check-images": "4"},
    "quantize": {"--train-size": "64", "--test-size": "32", "--calibration-images": "32", "--batch-size": "32",
                 "--rounds": "1", "--no-progress": None},
}
# text in a command -> why it is parsed but not run here
PARSE_ONLY = {
    "torchrun": "several processes or machines (tests/test_distributed.py runs DDP)",
    "folder:/data/": "needs the user's image folder (ImageNet)",
    "--device cuda": "needs a CUDA GPU",
    "hybridprune experiment": "a grid takes minutes (tests/test_cli.py runs the shipped tiny grid and its report)",
    "hybridprune report": "reads a grid's store (tests/test_cli.py runs the shipped tiny grid and its report)",
}
if native_bf16(cpu_flags()) is None:  # this CPU, or its oneDNN cap (ONEDNN_MAX_CPU_ISA), has no native bf16
    PARSE_ONLY["bf16"] = "needs a CPU with native bf16 (AMX or AVX512-BF16) that oneDNN may use"


def bash_commands(page: Path) -> list[str]:
    """The `hybridprune` commands of a page's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in line.split("&&"):
                if "hybridprune" in part and not part.strip().startswith(("pip", "python -m pytest", "#")):
                    commands.append(" ".join(part.split()))
    return commands


def python_files(page: Path) -> dict[str, str]:
    """The ```python blocks of a page that start with `# NAME.py`: the files its commands use."""
    blocks = re.findall(r"```python\n# (\w+\.py)\n(.*?)```", page.read_text(), re.S)
    return {name: code for name, code in blocks}


def hybridprune_argv(command: str) -> list[str]:
    """The arguments after `hybridprune` (or after `-m hybridprune` in a torchrun line)."""
    words = shlex.split(command)
    return words[words.index("hybridprune") + 1 :]


def smoke(argv: list[str]) -> list[str]:
    """`argv` with the SMOKE flags its subcommand accepts appended (none when HYBRIDPRUNE_DOCS_SMOKE=0)."""
    if os.environ.get("HYBRIDPRUNE_DOCS_SMOKE", "1") == "0":
        return argv
    flags = SMOKE.get(argv[0], {})
    extra = [w for flag, value in flags.items() for w in ([flag] if value is None else [flag, value])]
    if argv[0] in ("run", "prune") and "--metric" not in argv and argv != ["run"]:
        extra += ["--metric", "l1"]  # one metric where the page names none (the bare main job keeps its five)
    if "--target-latency" in argv:  # at the shrunk batch a whole model is ~2 ms, its smallest prunable form ~60%
        extra += ["--target-latency", "0.9"]  # of it: a target of 0.6 is then out of reach, by design refused
    return [*argv, *extra]


ALL = [(page, command) for page in PAGES for command in bash_commands(page)]


def test_the_pages_show_commands_and_the_tour_is_there():
    pages = {page.name for page, _ in ALL}
    assert {"README.md", "latency.md", "deployment.md"} <= pages
    readme = [c for p, c in ALL if p.name == "README.md"]
    assert any("--target-latency" in c for c in readme) and any(c.startswith("hybridprune bench") for c in readme)
    assert "mynet.py" in python_files(ROOT / "README.md")


@pytest.mark.parametrize("page,command", ALL, ids=[f"{p.name}:{c[:60]}" for p, c in ALL])
def test_every_shown_command_parses(page, command, capsys):
    try:
        args = build_parser().parse_args(hybridprune_argv(command))
    except SystemExit:
        pytest.fail(f"{page.name}: `{command}` does not parse: {capsys.readouterr().err.strip()}")
    assert callable(args.handler)


def test_smoke_flags_exist_where_they_are_appended():
    """Every SMOKE flag is a real flag of its subcommand: a renamed flag fails here, not silently in the docs run."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for command, flags in SMOKE.items():
        known = {s for action in commands[command]._actions for s in action.option_strings}
        assert set(flags) <= known, (command, set(flags) - known)


@pytest.mark.slow
def test_the_shown_commands_run_as_written(tmp_path):
    """Each command in a process of its own, from the folder a user would type it in: as a user runs it, and a
    runtime's native state (ONNX Runtime, OpenVINO) never outlives its command into the rest of the suite."""
    for page in PAGES:
        for name, code in python_files(page).items():
            (tmp_path / name).write_text(code)
    done: set[str] = set()
    for page, command in ALL:
        if command in done or any(text in command for text in PARSE_ONLY):
            continue
        argv = smoke(hybridprune_argv(command))
        if argv[0] == "export":
            pytest.importorskip("onnxruntime", reason='the optional extra: pip install -e ".[export]"')
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the machine's cores are shared with the rest of the suite
        proc = subprocess.run([sys.executable, "-m", "hybridprune", *map(str, argv)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, f"{page.name}: `{command}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
        done.add(command)
    assert len(done) >= 7  # the main job, your model, evaluate, profile, a latency target, bench, export
