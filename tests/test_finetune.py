"""The finetune study: the encoder's weights land in the classifier, move when fine-tuned and stay when frozen; label
budgets are class-stratified, seeded and the same for every init; the study end to end on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aelab.config import ConfigError
from aelab.data.images import ImageDataModule
from aelab.finetune_figure import spread_curves, spread_figure
from aelab.lit.autoencoder import autoencoder_module
from aelab.lit.classifier import classifier_module
from aelab.stages import finetune, pretrain
from conftest import compose_cfg


def encoder_and_classifier(init: str = "he", *overrides: str):
    cfg = compose_cfg("model.hidden=[16,8]", "model.code_dim=4", *overrides)
    encoder = autoencoder_module(cfg).model.encoder
    return encoder, classifier_module(finetune.encoder_shaped(cfg, init, 100))


def first_linears(module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)][:3]


@pytest.mark.parametrize("norm", ["none", "bn_pre", "bn_post"])
def test_every_norm_of_the_encoder_lands_batch_norm_included(norm):
    encoder, module = encoder_and_classifier("he", f"model.norm={norm}")
    for bn in (m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_mean.uniform_()  # statistics a trained encoder has, unlike a fresh classifier's zeros
    module.model.load_encoder(encoder)
    mine, theirs = module.model.net[:len(encoder)].state_dict(), encoder.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in encoder) == (0 if norm == "none" else 2)


@pytest.mark.parametrize("freeze", [False, True])
def test_the_encoder_lands_in_the_classifier_then_moves_only_when_not_frozen(freeze):
    encoder, module = encoder_and_classifier()
    module.model.load_encoder(encoder, freeze)
    for mine, theirs in zip(first_linears(module.model), first_linears(encoder)):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
    before = [p.detach().clone() for layer in first_linears(module.model) for p in layer.parameters()]
    head = module.model.net[-1].weight.detach().clone()
    opt = module.configure_optimizers()
    for _ in range(3):
        loss = module.losses(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [p for layer in first_linears(module.model) for p in layer.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) == freeze
    assert not torch.equal(head, module.model.net[-1].weight)  # the softmax head always trains


def test_an_encoder_of_another_shape_is_refused():
    cfg = compose_cfg("model.hidden=[16]", "model.code_dim=4")
    _, module = encoder_and_classifier()
    with pytest.raises(ValueError, match="first layers"):
        module.model.load_encoder(autoencoder_module(cfg).model.encoder)


def test_budgets_are_stratified_seeded_and_the_same_for_every_init(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides)

    def labels(seed: int) -> np.ndarray:
        data = ImageDataModule(cfg.data, 32, seed, train_labels=50, stratify=True)
        data.setup()
        return data.train_set.tensors[1].numpy()

    first, again, other = labels(0), labels(0), labels(1)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    data = ImageDataModule(cfg.data, 32, 0)
    data.setup()
    split = np.bincount(data.train_set.tensors[1].numpy(), minlength=10) / len(data.train_set)
    assert np.abs(np.bincount(first, minlength=10) / 50 - split).max() <= 1 / 50 + 1e-9  # proportional, to a label


def test_bad_studies_fail_before_any_work(tiny_raw, smoke_overrides):
    with pytest.raises(ConfigError, match=r"finetune\.budgets\[1\]: 54001 is more than the 54000"):
        finetune.check_study(compose_cfg(*smoke_overrides, "finetune.budgets=[10,54001]"))
    with pytest.raises(ConfigError, match=r"finetune\.inits: .*dense autoencoder with a ReLU code"):
        finetune.check_study(compose_cfg(*smoke_overrides, "model=conv"))


def test_finetune_study_end_to_end(tiny_raw, smoke_overrides):
    base = [*smoke_overrides, "model.hidden=[16,8]", "model.code_dim=4"]
    pretrain.main.__wrapped__(compose_cfg(*base))
    cfg = compose_cfg(*base, "finetune.budgets=[20,100]", "finetune.inits=[default,he,pretrained,frozen]",
                      "finetune.val_limit=null")
    results = finetune.main.__wrapped__(cfg)
    assert list(results) == [20, 100] and all(list(r) == ["default", "he", "pretrained", "frozen"]
                                              for r in results.values())
    for by_init in results.values():
        for row in by_init.values():
            assert 0 <= row["test_accuracy"] <= 1 and row["test_error"] == pytest.approx(1 - row["test_accuracy"])
    metrics = json.loads((tiny_raw / "reports/metrics/finetune.json").read_text())
    assert set(metrics) == {"20", "100", "provenance"} and metrics["100"]["frozen"]["epochs"] >= 1
    csv = (tiny_raw / "reports/plots/finetune_accuracy.csv").read_text().splitlines()
    assert csv[0] == "labels,log10_labels,default,he,pretrained,frozen" and len(csv) == 3
    assert (tiny_raw / "reports/figures/finetune_accuracy.png").stat().st_size > 1000


def test_spread_figure_draws_each_init_over_the_seeds(tmp_path):
    metrics = {f"finetune.{b}.{i}.test_accuracy": {"mean": acc + 0.005, "std": 0.007, "n": 2,
                                                   "values": {"42": acc, "43": acc + 0.01}}
               for b, i, acc in [(100, "he", 0.5), (1000, "he", 0.7), (100, "pretrained", 0.6), (1000, "pretrained", 0.8)]}
    metrics["finetune.100.he.epochs"] = {"mean": 3, "std": 0, "values": {"42": 3, "43": 3}}
    metrics["downstream.ae.accuracy"] = {"mean": 0.8, "std": 0, "values": {"42": 0.8, "43": 0.8}}
    curves = spread_curves(metrics)
    assert curves == {i: {b: metrics[f"finetune.{b}.{i}.test_accuracy"] for b in (100, 1000)}
                      for i in ("he", "pretrained")}  # the spread's own mean, std and seeds, nothing recomputed
    path = spread_figure(tmp_path / "fig.png", curves, [42, 43])
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="aelab.spread"):
        spread_curves({"downstream.ae.accuracy": metrics["downstream.ae.accuracy"]})
