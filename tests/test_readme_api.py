"""The Python API page's examples for a user's own model and loop, and for Lightning, run as they stand."""

import re
from pathlib import Path

import pytest

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def example_under(heading: str) -> str:
    """The first Python code block after a heading of docs/python-api.md."""
    text = API_PAGE.read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_plain_loop_example_runs(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    exec(compile(example_under("## Your own model and training loop"), "python-api.md", "exec"), {})
    assert (tmp_path / "r18-hybrid.safetensors").is_file()


@pytest.mark.slow
def test_the_lightning_example_runs(tmp_path, monkeypatch, one_torch_thread):
    pytest.importorskip("lightning", reason='the optional extra: pip install -e ".[lightning]"')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example_under("## PyTorch Lightning"), "python-api.md", "exec"), scope)
    assert scope["masks"] and scope["meta"]["plan"] and scope["model"].layer1[0].conv1.out_channels < 64
