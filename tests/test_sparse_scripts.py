"""benchmarks/gpu.sh and what it calls, checked on a CPU, so the first GPU run does not die of a typo."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"


def _commands() -> list[list[str]]:
    """gpu.sh's `run TIMEOUT CMD...` lines, continuation lines joined, as argument lists (after the timeout)."""
    text = GPU_SH.read_text().replace("\\\n", " ")
    lines = [line.split("#")[0] for line in text.splitlines() if line.startswith("run ")]
    return [shlex.split(line)[2:] for line in lines]


def _layers_module():
    spec = importlib.util.spec_from_file_location("bench_layers", ROOT / "benchmarks" / "layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _with_vars(args: list[str], out: Path) -> list[str]:
    return [a.replace("$py", sys.executable).replace("$out", str(out)) for a in args]


def test_gpu_script_parses_and_stays_under_8_minutes():
    subprocess.run(["bash", "-n", str(GPU_SH)], check=True)
    timeouts = [int(line.split()[1]) for line in GPU_SH.read_text().splitlines() if line.startswith("run ")]
    assert len(timeouts) >= 4 and sum(timeouts) <= 480 - 30  # 30 s left for start-up and the version lines


def test_every_hybridprune_command_of_the_gpu_script_parses(tmp_path):
    from hybridprune.cli import build_parser

    commands = [c for c in _commands() if c[1:3] == ["-m", "hybridprune"]]
    assert commands
    for command in commands:
        args = build_parser().parse_args(_with_vars(command, tmp_path)[3:])  # SystemExit on an unknown flag
        assert args.handler


def test_the_gpu_script_selects_real_gpu_tests():
    for command in (c for c in _commands() if c[1:3] == ["-m", "pytest"]):
        args = [a for a in command[3:] if not a.startswith("--junitxml") and "$out" not in a]
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        per_file = [int(n) for n in re.findall(r"^\S+\.py: (\d+)$", done.stdout, re.MULTILINE)]
        assert done.returncode == 0 and sum(per_file) > 0, done.stdout[-500:]


def test_layers_benchmark_runs_its_sparse_branch_on_a_cpu(tmp_path):
    layers = _layers_module()
    (command,) = [c for c in _commands() if c[1].endswith("layers.py")]
    layers.parse_args(_with_vars(command, tmp_path)[2:])  # the GPU run's flags parse
    out = tmp_path / "layers.json"
    argv = ["--device", "cpu", "--check-kernel", "--conv1x1-channels", "32", "--conv3x3-channels", "16",
            "--linear-features", "32", "--batch-sizes", "2", "--spatial", "3", "--repeats", "2",
            "--out", str(out)]  # fmt: skip
    assert layers.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["layer"] for r in rows] == ["conv1x1", "conv3x3", "linear"]
    for r in rows:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["sparse_host_ms"] >= 0
        assert r["relative_error"] < 1e-5  # a dense GEMM in place of the sparse kernel: the lowering is exact
    assert "python benchmarks/layers.py" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("script", ["layers.py"])
def test_benchmark_scripts_answer_help(script):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})  # fmt: skip
    assert done.returncode == 0 and "--check-kernel" in done.stdout, done.stderr[-500:]
