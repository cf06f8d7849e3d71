import json
import os

import pytest
import torch
from safetensors.torch import save_file

from helpers import stored_logits_tolerance
from hybridprune.config import ModelSource, PruneConfig
from hybridprune.errors import HybridPruneError
from hybridprune.models.sources import build_model
from hybridprune.pruning.checkpoint import load_checkpoint, save_checkpoint
from hybridprune.pruning.filters import prune_filters_
from hybridprune.pruning.nm import nm_prune_


def test_round_trip_of_a_pruned_model_gives_identical_logits(zoo_model, tmp_path):
    prune_filters_(zoo_model, PruneConfig(metric="l1", filter_ratio=0.4, round_to=4), [])
    masks = nm_prune_(zoo_model)
    path = save_checkpoint(tmp_path / "m.safetensors", zoo_model, masks, {"stage": "hybrid"})
    source = zoo_model.source.name if zoo_model.source.kind == "user" else None
    loaded, loaded_masks, meta = load_checkpoint(path, source)
    x = torch.rand(4, *zoo_model.input_shape)
    assert torch.equal(loaded(x), zoo_model(x))
    assert loaded.spec() == zoo_model.spec() and loaded.spec()["history"]
    assert set(loaded_masks) == set(masks) and all(torch.equal(loaded_masks[k], masks[k]) for k in masks)
    assert meta == {"stage": "hybrid"}


def test_checkpoints_hold_no_pickle(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    spec = json.loads(header["__metadata__"]["hybridprune"])["spec"]
    assert spec["model"] == {"kind": "builtin", "name": "alexnet", "args": {"width": 0.25}}
    assert b"\x80\x04" not in raw[:16]  # not a pickle stream


def test_existing_file_is_not_overwritten(tiny_model, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_text("keep me")
    with pytest.raises(HybridPruneError, match="exists"):
        save_checkpoint(path, tiny_model)
    assert path.read_text() == "keep me"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_missing_corrupted_and_foreign_files_fail_clearly(tiny_model, tmp_path):
    with pytest.raises(HybridPruneError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    good = save_checkpoint(tmp_path / "good.safetensors", tiny_model)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(HybridPruneError, match="corrupted"):
        load_checkpoint(broken)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(HybridPruneError, match="not a hybridprune checkpoint"):
        load_checkpoint(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(tiny_model, pickled)
    with pytest.raises(HybridPruneError, match="corrupted or another format"):
        load_checkpoint(pickled)


def test_version_1_alexnet_checkpoints_keep_loading():
    from pathlib import Path

    from safetensors.torch import load_file

    data = Path(__file__).parent / "data"
    model, masks, meta = load_checkpoint(data / "alexnet-v1.safetensors")
    expected = load_file(str(data / "alexnet-v1-logits.safetensors"))
    # the logits were stored on another machine: kernels chosen by CPU (AVX2, AVX-512, AMX) and thread count sum in
    # another order, so they agree to rounding, not bit for bit (see helpers.stored_logits_tolerance)
    torch.testing.assert_close(model(expected["x"]), expected["logits"], **stored_logits_tolerance(expected["logits"]))
    assert meta["stage"] == "hybrid" and "net.features.2.conv" in masks
    assert model.input_shape == (1, 16, 16)


def test_user_code_checkpoints_load_only_when_the_user_names_the_factory(tmp_path):
    from conftest import make_model

    path = save_checkpoint(tmp_path / "m.safetensors", make_model("zoo:plain_net"))
    with pytest.raises(HybridPruneError, match="pass --model zoo:plain_net"):
        load_checkpoint(path)
    with pytest.raises(HybridPruneError, match="pass --model zoo:plain_net"):
        load_checkpoint(path, "zoo:residual_net")
    assert load_checkpoint(path, "zoo:plain_net")[0].source.name == "zoo:plain_net"


def _with_spec(path, tmp_path, edit):
    """A copy of the checkpoint at `path` whose header spec went through `edit`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["hybridprune"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(header["spec"])
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata={"hybridprune": json.dumps(header)})
    return out


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s["model"]["args"].update(width=1e12),
        lambda s: s["model"]["args"].update(width="wide"),
        lambda s: s["model"]["args"].update(width=float("nan")),
        lambda s: s["input"].update(num_classes=10**9),
        lambda s: s["input"].update(image_size=-3),
        lambda s: s["input"].update(channels="3"),
        lambda s: s.pop("model"),
        lambda s: s.update(model="alexnet"),
        lambda s: s["model"].update(kind="pickle"),
        lambda s: s.update(history=[["net.features.0.conv", True, [-1]]]),
        lambda s: s.update(history=[["net.nope", True, [0]]]),
        lambda s: s.update(history="all"),
    ],
)
def test_hostile_headers_fail_with_one_line_before_anything_is_built(tiny_model, tmp_path, edit):
    good = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    with pytest.raises(HybridPruneError) as err:
        load_checkpoint(_with_spec(good, tmp_path, edit))
    assert "\n" not in str(err.value)


def test_a_googlenet_checkpoint_written_before_aux_heads_were_kept_loads_without_them(tmp_path):
    """Older checkpoints carry no aux_logits: those networks were built without heads, and load so."""
    torch.manual_seed(0)
    model = build_model(ModelSource("torchvision", "googlenet", {"aux_logits": False}), image_size=32).eval()
    prune_filters_(model, PruneConfig(metric="l1", filter_ratio=0.4), [torch.rand(2, 3, 32, 32)])
    good = save_checkpoint(tmp_path / "m.safetensors", model)
    loaded, _, _ = load_checkpoint(_with_spec(good, tmp_path, lambda s: s["model"]["args"].pop("aux_logits")))
    x = torch.rand(2, 3, 32, 32)
    assert loaded.net.aux1 is None and torch.equal(loaded.eval()(x), model(x))


OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "avx2", reason="this run already uses those kernels")
def test_stored_logits_hold_on_other_kernels():
    """The stored-logit check in a process restricted to AVX2 kernels and one thread, as another machine runs it
    (CI runs the whole suite so as well)."""
    import subprocess
    import sys
    from pathlib import Path

    test = f"{Path(__file__).resolve()}::test_version_1_alexnet_checkpoints_keep_loading"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          env={**os.environ, **OTHER_KERNELS}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-2000:]
