import json

import pytest
import torch
from safetensors.torch import save_file

from hybridprune.checkpoint import load_checkpoint, save_checkpoint
from hybridprune.config import PruneConfig
from hybridprune.errors import HybridPruneError
from hybridprune.nm import nm_prune_
from hybridprune.pipeline import prune_filters_


def test_round_trip_of_a_pruned_model_gives_identical_logits(tiny_model, tmp_path):
    prune_filters_(tiny_model, PruneConfig(metric="l1", filter_ratio=0.4, round_to=8), [])
    masks = nm_prune_(tiny_model)
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, masks, {"stage": "hybrid"})
    loaded, loaded_masks, meta = load_checkpoint(path)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded(x), tiny_model(x))
    assert loaded.spec() == tiny_model.spec()
    assert set(loaded_masks) == set(masks) and all(torch.equal(loaded_masks[k], masks[k]) for k in masks)
    assert meta == {"stage": "hybrid"}


def test_checkpoints_hold_no_pickle(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"]["hybridprune"])["spec"]["name"] == "alexnet"
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
