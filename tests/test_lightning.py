"""The Lightning callback: filter pruning at a chosen epoch, 2:4 after it held on every step, the pruned
checkpoint written and rebuilt from a fresh instance with identical logits."""

import pytest
import torch
import torch.nn.functional as F

import hybridprune as hp
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.nm import satisfies_nm
from zoo import ResidualNet

L = pytest.importorskip("lightning.pytorch", reason='the optional extra: pip install -e ".[lightning]"')


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = ResidualNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


class PatternCheck(L.Callback):
    """After every optimizer step: the masked weights, their gradients and momentum are zero where pruned."""

    def __init__(self, pruning: hp.HybridPruningCallback) -> None:
        self.pruning, self.checked = pruning, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        for name, mask in self.pruning.masks.items():
            w = pl_module.net.get_submodule(name).weight
            assert satisfies_nm(w) and not w[~mask].any()
            assert not opt.state[w]["momentum_buffer"][~mask].any()
            self.checked += 1


def _loader(n: int = 32, seed: int = 0) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(
        torch.rand(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    )
    return torch.utils.data.DataLoader(data, batch_size=8)


def test_the_callback_prunes_holds_2_4_and_saves_a_checkpoint_a_fresh_instance_loads(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    model = Tiny()
    pruning = hp.HybridPruningCallback(
        hp.PruneConfig(metric="hybrid", filter_ratio=0.5, round_to=4),
        filter_epoch=0,
        nm_epoch=1,
        module="net",
        checkpoint=tmp_path / "pruned.safetensors",
    )
    check = PatternCheck(pruning)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning, check])  # fmt: skip
    trainer.fit(model, _loader())
    assert model.net.b1.conv1.out_channels == 8 and model.net.pruning_history  # filter-pruned at epoch 0
    assert pruning.masks and check.checked == 4 * len(pruning.masks)  # epoch 1: 4 steps, every one checked
    assert trainer.optimizers[0].param_groups[0]["params"][0] is next(model.parameters())  # rebuilt optimizer

    loaded, masks, meta = hp.load_checkpoint(tmp_path / "pruned.safetensors", model=ResidualNet())
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(loaded(x), model.net.eval()(x))
    assert masks.keys() == pruning.masks.keys() and meta["plan"]["groups"]


def test_bad_callback_arguments_are_one_line():
    with pytest.raises(HybridPruneError, match="filter_epoch <= nm_epoch"):
        hp.HybridPruningCallback(hp.PruneConfig(), filter_epoch=2, nm_epoch=1)
    with pytest.raises(HybridPruneError, match="PruneConfig"):
        hp.HybridPruningCallback({"filter_ratio": 0.5})


def test_2_4_alone_traces_a_training_batch_and_holds_from_its_epoch(one_torch_thread):
    model = Tiny()
    pruning = hp.HybridPruningCallback(hp.PruneConfig(filter_ratio=0.0), filter_epoch=0, nm_epoch=0, module="net")
    check = PatternCheck(pruning)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning, check])  # fmt: skip
    trainer.fit(model, _loader())
    assert pruning.plan is None and "stem.0" not in pruning.masks and check.checked == 4 * len(pruning.masks) > 0
