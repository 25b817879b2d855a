"""Resident batches: every sample once per epoch in a seeded order, on the device, through Lightning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import TensorDataset

from aelab.data.resident import ResidentBatches, ResidentDataModule


def epoch_rows(batches: ResidentBatches) -> list[int]:
    return torch.cat([b[0] for b in batches]).tolist()


def test_every_sample_once_per_epoch_in_a_seeded_order():
    rows = torch.arange(103)
    batches = ResidentBatches((rows, rows * 10), batch_size=16, shuffle=True, seed=7)
    assert len(batches) == 7
    first, second = epoch_rows(batches), epoch_rows(batches)
    assert sorted(first) == sorted(second) == list(range(103))
    assert first != second  # a new order every epoch ...
    again = ResidentBatches((rows, rows * 10), batch_size=16, shuffle=True, seed=7)
    assert epoch_rows(again) == first and epoch_rows(again) == second  # ... the same ones for the same seed
    assert epoch_rows(ResidentBatches((rows,), 16, shuffle=True, seed=8)) != first
    assert all(torch.equal(x * 10, y) for x, y in again)  # rows stay paired across tensors


def test_unshuffled_batches_are_slices_in_row_order_and_prepared():
    images = torch.arange(10, dtype=torch.uint8)
    batches = ResidentBatches((images,), batch_size=4, prepare=lambda x: (x.float() / 255,))
    out = list(batches)
    assert [len(b[0]) for b in out] == [4, 4, 2] and out[0][0].dtype == torch.float32
    assert torch.equal(torch.cat([b[0] for b in out]), images.float() / 255)


def test_tensors_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="different lengths"):
        ResidentBatches((torch.zeros(3), torch.zeros(4)), batch_size=2)


class _Recorder(L.LightningModule):
    """Records the rows and devices of the batches Lightning hands to the training step."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []
        self.devices: set[str] = set()

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen[-1] += y.tolist()
        self.devices.add(x.device.type)
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trains_on_resident_batches_one_epoch_each_sample_once():
    y = torch.arange(50)
    data = ResidentDataModule(8, seed=3, train_set=TensorDataset(torch.rand(50, 1), y))
    module = _Recorder()
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=data)
    assert len(module.seen) == 3 and all(sorted(epoch) == list(range(50)) for epoch in module.seen)
    assert module.seen[0] != module.seen[1] and module.devices == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_live_on_the_gpu():
    batches = ResidentBatches((torch.arange(20),), batch_size=8, shuffle=True, seed=0, device="cuda")
    assert all(b[0].is_cuda for b in batches)
    assert sorted(epoch_rows(batches)) == list(range(20))
