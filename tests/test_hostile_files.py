"""Files nested or sized to break a parser, absurd timings, commands that only read, and analysis that never ends.

Every JSON and YAML file the tool reads goes through `hybridprune.parse`, which bounds nesting and size: a file
nested 200,000 levels deep must end as one line and exit 2 (Python's parsers recurse once a level, so unbounded
it ends in a RecursionError traceback), with nothing written. Tracing a user's model is bounded by
`--analysis-timeout`: past it, one line naming the stage and the model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import time

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from helpers import TINY_RUN, assert_refused, call, refused_unchanged, tree
from hybridprune.errors import HybridPruneError
from hybridprune.parse import MAX_DEPTH, loads_json, read_json, read_yaml
from hybridprune.pruning.graph import dependency_graph
from hybridprune.pruning.latency import MAX_ENTRY_MS, load_table
from hybridprune.stages import StageTimeout, long_stage, stage_limit

DEEP = 200_000  # levels: far past Python's recursion limit, so only a bound that does not recurse can refuse it


def deep_json(levels: int = DEEP) -> str:
    return "[" * levels + "]" * levels


def deep_yaml_flow(levels: int = 50_000) -> str:
    return "a: " + "[" * levels + "]" * levels + "\n"


def deep_yaml_block(levels: int = 400) -> str:
    return "".join(" " * i + "k:\n" for i in range(levels)) + " " * levels + "v: 1\n"


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 5_000, DEEP])
def test_json_nested_past_the_bound_is_refused_without_recursing(levels):
    with pytest.raises(HybridPruneError, match=f"nests {levels} levels deep"):
        loads_json(deep_json(levels), "x.json")


def test_json_at_the_bound_and_brackets_inside_strings_are_read():
    assert loads_json(deep_json(MAX_DEPTH), "x.json") is not None
    text = json.dumps({"key": "[" * 10_000, "list": [1, [2, [3]]]})
    assert loads_json(text, "x.json")["list"] == [1, [2, [3]]]


def test_oversized_json_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"entries": "x" * 2000}))
    with pytest.raises(HybridPruneError, match="reads at most 1,000"):
        read_json(path, "latency table", max_bytes=1000)


@pytest.mark.parametrize(
    "text,names",
    [
        (deep_yaml_flow(), "nests deeper than"),
        (deep_yaml_block(), "nests deeper than"),
        # aliases of aliases: 9 short lines that stand for 10^9 values
        ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)),
         "aliases counted in full"),
    ],
    ids=["flow 50,000 deep", "block 400 deep", "billion laughs"],
)  # fmt: skip
def test_hostile_yaml_is_refused_in_one_line(tmp_path, text, names):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(HybridPruneError, match=names):
        read_yaml(path, "experiment config")


def test_yaml_aliases_that_stay_small_are_read(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("seeds: &s [0, 1]\nother: *s\n")
    assert read_yaml(path) == {"seeds": [0, 1], "other": [0, 1]}


# --- through the real command: one line, exit 2, nothing written ------------------------------------------------


def test_a_deeply_nested_latency_table_is_one_line(tmp_path, capsys):
    (tmp_path / "table.json").write_text(deep_json())
    argv = ["profile", "--model", "resnet20", "--latency-table", tmp_path / "table.json", "--out", tmp_path / "t.json"]
    refused_unchanged(argv, tmp_path, capsys, names="nests 200000 levels deep")


def test_a_deeply_nested_experiment_file_is_one_line(tmp_path, capsys):
    (tmp_path / "deep.yaml").write_text(deep_yaml_flow())
    argv = ["experiment", tmp_path / "deep.yaml", "--list"]
    refused_unchanged(argv, tmp_path, capsys, names="nests deeper than")


def test_a_deeply_nested_checkpoint_header_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"hybridprune": deep_json(DEEP)})
    refused_unchanged(["evaluate", path, "--json", tmp_path / "r.json"], tmp_path, capsys, names="levels deep")


def test_deeply_nested_bench_results_given_to_report_are_one_line(tmp_path, capsys, finished_store):
    (tmp_path / "bench.json").write_text(deep_json())
    argv = ["report", "--store", finished_store, "--bench", tmp_path / "bench.json", "--out", tmp_path / "report"]
    refused_unchanged(argv, tmp_path, capsys, names="levels deep")


def test_a_deeply_nested_result_in_a_store_is_one_line(tmp_path, capsys, finished_store):
    with sqlite3.connect(finished_store) as db:
        db.execute("UPDATE runs SET result = ?", (deep_json(),))
    argv = ["report", "--store", finished_store, "--out", tmp_path / "report"]
    refused_unchanged(argv, tmp_path, capsys, names="levels deep")


@pytest.fixture
def finished_store(tmp_path):
    """A store holding one finished run, its row copied from a real one's columns (no training needed)."""
    from hybridprune.experiments.store import Store, column_names

    store = Store(tmp_path / "store" / "s.sqlite")
    row = {c: None for c in column_names("runs")}
    row.update(key="k", dataset="digits", model="alexnet", metric="l1", recipe="plain", ratio=0.4, seed=0,
               result=json.dumps({"filter": {"macs": 1}, "dense": {"macs": 2}}), config="{}")  # fmt: skip
    with sqlite3.connect(store.path) as db:
        types = dict(db.execute("SELECT name, type FROM pragma_table_info('runs')").fetchall())
    for c, kind in types.items():
        if row[c] is None:
            row[c] = 0.5 if "REAL" in kind else 1 if "INT" in kind else "x"
    store.add(row)
    return store.path


def absurd_table(tmp_path, median_ms: float):
    from hybridprune.pruning.latency import LatencyTable

    raw = LatencyTable("cpu").to_dict()
    raw["rest"] = {"x": {"median_ms": median_ms, "p10_ms": 1.0, "p90_ms": 1.0, "repeats": 3}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("ms", [1e308, MAX_ENTRY_MS * 2, -MAX_ENTRY_MS * 2])
def test_an_absurd_timing_in_a_table_is_refused(tmp_path, ms):
    with pytest.raises(HybridPruneError, match="one minute"):
        load_table(absurd_table(tmp_path, ms))


def test_a_sane_timing_in_a_table_is_read(tmp_path):
    assert load_table(absurd_table(tmp_path, 12.5)).rest["x"].median_ms == 12.5


def test_listing_an_experiment_creates_no_store(tmp_path, capsys):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"metrics": ["l1"], "ratios": [0.4], "seeds": [0]}))
    before = tree(tmp_path)
    o = call(["experiment", tmp_path / "grid.yaml", "--store", tmp_path / "new" / "s.sqlite", "--list"], capsys)
    assert o.code == 0 and "todo" in o.out, o.err
    assert tree(tmp_path) == before


# --- no silent minutes -------------------------------------------------------------------------------------------


class SlowToTrace(nn.Module):
    """A model whose forward pass takes seconds: what tracing a very large model looks like from outside."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.conv, self.fc, self.seconds = nn.Conv2d(3, 8, 3), nn.Linear(8, 10), seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not self.training:  # Torch-Pruning's trace: eval mode, with autograd
            time.sleep(self.seconds)
        return self.fc(self.conv(x).mean((2, 3)))


def test_tracing_past_its_bound_stops_in_one_line_naming_stage_and_model():
    model = SlowToTrace(3.0)
    start = time.monotonic()
    with stage_limit(1.0), pytest.raises(StageTimeout) as stopped:
        dependency_graph(model, torch.rand(1, 3, 8, 8))
    assert time.monotonic() - start < 5
    line = str(stopped.value)
    assert "\n" not in line and "tracing the channel groups of SlowToTrace" in line and "--analysis-timeout" in line


def test_tracing_within_its_bound_finishes():
    with stage_limit(30):
        graph = dependency_graph(SlowToTrace(0.0), torch.rand(1, 3, 8, 8))
    assert graph.module2node


def test_a_stage_that_swallows_the_stop_still_stops():
    with stage_limit(0.2), pytest.raises(StageTimeout), long_stage("scoring", "a net"):
        for _ in range(40):
            try:
                time.sleep(0.1)
            except Exception:  # noqa: BLE001, S110 - what a library's broad except does
                pass


def test_a_slow_stage_says_what_it_is_doing(capsys):
    with long_stage("tracing the channel groups of", "timm:big", quiet_s=0.1, every_s=0.2):
        time.sleep(0.5)
    err = capsys.readouterr().err
    assert "tracing the channel groups of timm:big ... 0 s" in err


def test_a_short_stage_prints_nothing(capsys):
    with long_stage("building", "resnet20"):
        pass
    assert capsys.readouterr().err == ""


def test_the_cli_bounds_tracing_with_its_flag(tmp_path, capsys, monkeypatch):
    """`--analysis-timeout` reaches the tracing of a user's model through the real command."""
    (tmp_path / "slownet.py").write_text(
        "import time\nimport torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8, num_classes)\n"
        "    def forward(self, x):\n"
        "        if torch.is_grad_enabled() and not self.training:  # tracing: eval mode, with autograd\n"
        "            time.sleep(3)\n"
        "        return self.fc(self.conv(x).mean((2, 3)))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    width = TINY_RUN.index("--width")
    tiny = TINY_RUN[:width] + TINY_RUN[width + 2 :]  # a user's model has no width to scale
    argv = ["run", "--model", "slownet:Net", *tiny, "--analysis-timeout", "1", "--out", out]
    outcome = call(argv, capsys)
    # on a loaded machine the stage may have shown its elapsed time ("... 2 s") before it was stopped
    outcome.err = "".join(line for line in outcome.err.splitlines(True) if not re.search(r" \.\.\. \d+ s$", line))
    line = assert_refused(outcome, names="slownet:Net")
    assert "--analysis-timeout 1" in line
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # finished steps kept, nothing half-written


def test_sigterm_ends_a_command_as_ctrl_c_does():
    from hybridprune.cli import stop_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is previous
