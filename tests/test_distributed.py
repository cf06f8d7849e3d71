"""Several processes (torchrun, Gloo on the CPU): every rank ends with bit-identical weights and masks."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from hybridprune.config import PruneConfig, RunConfig, TrainConfig
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.nm import satisfies_nm
from hybridprune.world import World, shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("n,size", [(10, 2), (11, 2), (9, 4), (3, 2)])
def test_every_rank_gets_an_equal_disjoint_shard(n, size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [shard(order, World(rank, size)).tolist() for rank in range(size)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // size  # same step count on every rank
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) and set(flat) <= set(order.tolist())


def _rank_worker(rank: int, size: int, port: int, folder: str) -> None:
    """Dense training, filter pruning, 2:4 and fine-tuning under DDP, then this rank's weights and masks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from hybridprune.data.datasets import load_dataset
    from hybridprune.experiments.job import nm_pruned_copy
    from hybridprune.models.sources import build_model
    from hybridprune.pruning.filters import prune_filters_
    from hybridprune.training.loop import calibration_batches, fit
    from hybridprune.world import world_from_env

    world, device = world_from_env("cpu")
    data = load_dataset("digits")
    data = type(data)(data.name, data.train.subset(96, 0), data.test, data.hflip)
    torch.manual_seed(0)
    model = build_model("zoo:residual_net", in_channels=1, image_size=32)
    fit(model, data, TrainConfig(epochs=1, batch_size=16), device, progress=False, world=world)
    images = calibration_batches(data.train, 1, 16)
    prune_filters_(model, PruneConfig(metric="hybrid_output", filter_ratio=0.5, round_to=4), images, world=world)
    cfg = RunConfig(prune=PruneConfig(metric="hybrid"))
    model, masks, _ = nm_pruned_copy(model, cfg, world)
    fit(model, data, TrainConfig(epochs=1, batch_size=16, lr=0.01), device, masks=masks, progress=False, world=world)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state |= {f"mask.{k}": v.to(torch.uint8) for k, v in masks.items()}
    save_file(state, f"{folder}/rank{rank}.safetensors")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_end_with_identical_weights_and_masks(tmp_path):
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and any(k.startswith("mask.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical, BatchNorm statistics included
    for key in (k for k in a if k.startswith("mask.")):
        assert satisfies_nm(a[f"{key[5:]}.weight"])


def test_a_batch_that_does_not_divide_over_the_ranks_is_refused_before_any_work(tmp_path):
    from hybridprune.experiments.job import run

    cfg = RunConfig(train=TrainConfig(batch_size=33))
    with pytest.raises(HybridPruneError, match="batch size 33 does not divide over 2 processes"):
        run(cfg, tmp_path / "out", torch.device("cpu"), world=World(rank=0, size=2))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_runs_the_whole_job_and_only_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    args = ["--model", "resnet20", "--width", "0.5", "--train-size", "96", "--test-size", "48", "--epochs", "1"]
    args += ["--finetune-epochs", "1", "--batch-size", "32", "--round-to", "4", "--metric", "l1"]
    args += ["--calib-batches", "1", "--bn-recalib-batches", "1", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hybridprune", "run",
         *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("checkpoints and results.json in") == 1 and "(2 processes)" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    from hybridprune.data.datasets import load_dataset
    from hybridprune.pruning.checkpoint import load_checkpoint
    from hybridprune.training.loop import evaluate

    model, masks, _ = load_checkpoint(out / "l1-hybrid.safetensors")
    test = load_dataset("digits").test.subset(48, 1)
    assert evaluate(model, test, torch.device("cpu")) == result["results"][0]["hybrid"]["accuracy"]
    assert all(satisfies_nm(model.get_submodule(n).weight) for n in masks)
    assert not list(out.glob(".*.tmp"))  # nothing half-written


@pytest.mark.slow
def test_a_job_killed_mid_run_leaves_no_corrupt_file_and_resumes(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = ["--model", "resnet20", "--width", "0.5", "--train-size", "96", "--test-size", "48", "--epochs", "1"]
    args += ["--finetune-epochs", "3", "--batch-size", "32", "--round-to", "4", "--metric", "l1,l2"]
    args += ["--calib-batches", "1", "--bn-recalib-batches", "1", "--no-progress", "--device", "cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hybridprune", "run"]
    job = subprocess.Popen([*command, *args, "--out", str(out)], cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "step-l1-filter.json").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # every rank at once, mid-run
    job.wait()
    assert not (out / "results.json").exists()
    from hybridprune.pruning.checkpoint import load_checkpoint

    for ckpt in out.glob("*.safetensors"):  # whatever was written is whole
        load_checkpoint(ckpt)
    proc = subprocess.run([*command, *args, "--out", str(out), "--resume"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reusing" in proc.stdout and json.loads((out / "results.json").read_text())["results"]


def test_sync_batchnorm_is_refused_on_cpus_with_one_line():
    from hybridprune.models.sources import build_model
    from hybridprune.training.distributed import synced_batchnorm

    model = build_model("zoo:residual_net", image_size=16)
    with pytest.raises(HybridPruneError, match="--sync-bn needs GPUs"):
        with synced_batchnorm(model, World(rank=0, size=2), torch.device("cpu")):
            pass


def test_sync_batchnorm_layers_turn_back_into_the_original_types_sharing_their_tensors():
    from torch import nn

    from conftest import make_model
    from hybridprune.pruning.graph import set_module
    from hybridprune.training.distributed import plain_batchnorm

    model = make_model("zoo:residual_net")
    x = torch.rand(2, *model.input_shape)
    before = model(x)
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert all(isinstance(synced.get_submodule(n), nn.SyncBatchNorm) for n in kinds)
    tensors = {n: synced.get_submodule(n).running_mean.data_ptr() for n in kinds}
    for name, kind in kinds.items():
        set_module(synced, name, plain_batchnorm(synced.get_submodule(name), kind))
    assert {n: type(synced.get_submodule(n)) for n in kinds} == kinds
    assert {n: synced.get_submodule(n).running_mean.data_ptr() for n in kinds} == tensors
    torch.testing.assert_close(synced.eval()(x), before)
