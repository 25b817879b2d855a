"""The lecture's classifier: each variant key changes the model or the loss it says it does, the classify stage end to
end on tiny data, bad values rejected before any work, and the classifier's search through the ensemble."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch
from torch import nn

from aelab.config import ConfigError, check_label_budget, validate
from aelab.data.images import ImageDataModule
from aelab.lit.classifier import ClassifierModule, accuracy_and_loss, classifier_module
from aelab.models.classifier import MLPClassifier, apply_max_norm
from aelab.models.penalties import weight_l1
from aelab.search import ensemble_training_losses, search_data, search_losses, short_training_loss
from aelab.stages import classify
from conftest import compose_cfg

MLP = {"_target_": "aelab.models.classifier.MLPClassifier", "hidden": [32, 16]}
TINY = ["classify.train_labels=100", "classify.val_limit=null", "classify.batch_size=32", "classify.max_epochs=4"]


def test_dropout_layers_carry_the_configured_rates():
    net = MLPClassifier([32, 16], dropout_input=0.2, dropout_hidden=0.5)
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.5, 0.5]
    assert not any(isinstance(m, nn.Dropout) for m in MLPClassifier([32, 16]).modules())


def test_batch_norm_before_or_after_the_activation():
    pre = [type(m) for m in MLPClassifier([32], norm="bn_pre").net]
    post = [type(m) for m in MLPClassifier([32], norm="bn_post").net]
    assert pre == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert post == [nn.Flatten, nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Linear]
    # code_norm=False: none on the last hidden layer, as on an autoencoder's code layer
    code = [type(m) for m in MLPClassifier([32, 8], norm="bn_pre", code_norm=False).net]
    assert code == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


@pytest.mark.parametrize("init, expected", [("he", math.sqrt(2 / 784)), ("xavier", math.sqrt(2 / (784 + 512))),
                                            ("default", 1 / math.sqrt(3 * 784))])
def test_init_schemes_set_the_first_layer_scale(init, expected):
    torch.manual_seed(0)
    layer = MLPClassifier([512], init=init).hidden_layers()[0]
    assert layer.weight.std().item() == pytest.approx(expected, rel=0.05)


def test_max_norm_bounds_every_hidden_unit_after_a_step():
    torch.manual_seed(0)
    module = ClassifierModule({**MLP, "max_norm": 0.5}, {"lr": 0.5})
    opt = torch.optim.SGD(module.parameters(), lr=5.0)
    loss, _, _ = module.losses(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    loss.backward()
    opt.step()
    assert max(layer.weight.norm(dim=1).max().item() for layer in module.model.hidden_layers()) > 0.5
    apply_max_norm(module.model)
    for layer in module.model.hidden_layers():
        assert layer.weight.norm(dim=1).max().item() <= 0.5 + 1e-5
    output = [m for m in module.model.net if isinstance(m, nn.Linear)][-1]
    assert output.weight.norm(dim=1).max().item() > 0.5  # the output layer is not constrained


def test_l1_enters_the_loss_and_cross_entropy_is_the_eval_loss():
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    module = ClassifierModule(MLP, l1_weight=1e-3)
    ce, penalty, logits = module.losses(x, y)
    assert penalty.item() == pytest.approx(1e-3 * weight_l1(module.model).item(), rel=1e-5)
    assert ce.item() == pytest.approx(nn.functional.cross_entropy(logits, y).item())
    module.train()
    assert module.search_loss(x, y).item() == pytest.approx((ce + penalty).item())
    module.eval()
    assert module.search_loss(x, y).item() == pytest.approx(ce.item(), rel=1e-5)


def test_variant_keys_reach_the_module():
    base = ["classify.model.hidden=[8]"]
    assert classifier_module(compose_cfg(*base, "classify.l1_weight=1e-4")).hparams.l1_weight == 1e-4
    module = classifier_module(compose_cfg(*base, "classify.optim.weight_decay=1e-3"))
    assert module.configure_optimizers().defaults["weight_decay"] == 1e-3
    assert classifier_module(compose_cfg(*base, "classify.model.max_norm=3")).model.max_norm == 3


@pytest.mark.parametrize("overrides, key", [
    (["classify.optim.weight_decay=-1e-4"], "classify.optim.weight_decay"),
    (["classify.model.dropout_hidden=1.0"], "classify.model.dropout_hidden"),
    (["classify.model.dropout_input=1.5"], "classify.model.dropout_input"),
    (["classify.model.norm=layer"], "classify.model.norm"),
    (["classify.model.max_norm=0"], "classify.model.max_norm"),
])
def test_bad_values_are_rejected_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(*overrides))


@pytest.mark.parametrize("overrides", [["classify.train_labels=54001"],
                                       ["data.train_limit=1000", "classify.train_labels=901"]])
def test_a_label_budget_larger_than_the_split_fails_before_any_work(overrides, workdir):
    cfg = compose_cfg(*overrides)
    check_label_budget(compose_cfg())  # the default fits
    with pytest.raises(ConfigError, match=r"classify\.train_labels: \d+ is more than the (54000|900) images"):
        classify.main.__wrapped__(cfg)  # before any data is read: workdir holds none


def test_a_variant_with_a_bad_value_is_named(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, *TINY, "+classify.variants.broken=['classify.model.dropout_input=1.0']")
    with pytest.raises(ConfigError, match=r"(?s)classify\.variants\.broken: .*classify\.model\.dropout_input"):
        classify.main.__wrapped__(cfg)


def test_a_label_budget_larger_than_the_files_split_fails_naming_the_key(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, "classify.train_labels=145")  # the tiny split holds 144
    with pytest.raises(ValueError, match=r"classify\.train_labels"):
        ImageDataModule(cfg.data, 32, 0, train_labels=cfg.classify.train_labels).setup()


def test_classify_stage_end_to_end(tiny_raw, smoke_overrides):
    variants = ('+classify.variants={none: [], bn_post: ["classify.model.norm=bn_post"], '
                'early: ["classify.early_stopping=2", "classify.max_epochs=40", "classify.optim.lr=0.01"]}')
    cfg = compose_cfg(*smoke_overrides, *TINY, "~classify.variants", variants)
    rows = classify.main.__wrapped__(cfg)
    assert [r["variant"] for r in rows] == ["none", "bn_post", "early"]
    assert rows[0]["steps_to_baseline"] is not None and rows[0]["epochs"] == 4
    assert rows[2]["epochs"] < 40  # 100 labels overfit within a few epochs: stopped 2 epochs after val_loss's best
    for row in rows:
        assert 0 <= row["test_error"] <= 1 and row["test_cross_entropy"] > 0
        assert row["gap_train_minus_test"] == pytest.approx(row["train_accuracy"] - row["test_accuracy"])
    metrics = json.loads((tiny_raw / "reports/metrics/classify.json").read_text())
    assert metrics["train_labels"] == 100 and set(metrics) >= {"none", "bn_post", "early"}
    assert metrics["baseline_best_val_error"] == pytest.approx(rows[0]["best_val_error"])
    table = (tiny_raw / "reports/classify.md").read_text()
    assert table.startswith("| variant | test_error |") and "| bn_post |" in table
    curve = (tiny_raw / "reports/plots/classify_val_error.csv").read_text().splitlines()
    assert curve[0] == "epoch,none,bn_post,early" and len(curve) == 1 + max(r["epochs"] for r in rows)
    assert (tiny_raw / "reports/figures/classify_curves.png").stat().st_size > 1000
    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["variant"] for r in children) == ["bn_post", "early", "none"]
    assert all("test_error" in r.data.metrics for r in children)


def test_accuracy_and_loss_in_eval_mode():
    torch.manual_seed(0)
    module = ClassifierModule({**MLP, "dropout_hidden": 0.5}).train()
    x, y = torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,))
    first = accuracy_and_loss(module, x, y, batch_size=7)
    assert first == pytest.approx(accuracy_and_loss(module, x, y), rel=1e-6)  # dropout off: batches do not matter
    assert module.training  # the module's mode is restored


def toy_labelled() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Separable toy classes: 96 images whose class sets which band is bright."""
    from conftest import make_tiny_images
    from aelab.data.images import to_tensor

    images, labels = make_tiny_images(96, seed=0)
    x, y = to_tensor(images), torch.from_numpy(labels).long()
    return (x[:64], y[:64]), (x[64:], y[64:])


@pytest.mark.parametrize("overrides, rel", [
    ([], 1e-4),
    (["classify.model.norm=bn_pre", "classify.model.dropout_hidden=0.3"], 1e-2),  # Adam on BN amplifies rounding
    (["classify.model.max_norm=0.5"], 1e-4),
])
def test_classifier_search_ensemble_picks_what_the_loop_picks(overrides, rel):
    cfg = compose_cfg("search.subject=classifier", "search.batch_size=16", "classify.model.hidden=[32,16]", *overrides)
    adam = {"name": "adam", "betas": [0.9, 0.999], "weight_decay": 0.0}
    optims = [{**adam, "lr": lr} for lr in (1e-5, 1e-3, 1e-2, 10.0)] + [{**adam, "lr": 1e-3, "weight_decay": 0.1}]
    train, val = toy_labelled()
    loop = [short_training_loss(cfg, o, train, val, 8) for o in optims]
    ensemble = ensemble_training_losses(cfg, optims, train, val, 8)
    assert ensemble == pytest.approx(loop, rel=rel)
    assert min(range(len(loop)), key=loop.__getitem__) == min(range(len(ensemble)), key=ensemble.__getitem__)
    losses, how = search_losses(cfg, optims, train, val, 8)
    assert how["vectorized"] and losses == pytest.approx(loop, rel=rel)


def test_search_data_of_the_classifier_is_its_label_budget(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, "search.subject=classifier", "classify.train_labels=50", "search.val_limit=10")
    (x, y), (xv, yv) = search_data(cfg)
    assert x.shape == (50, 1, 28, 28) and y.shape == (50,) and y.dtype == torch.long
    assert xv.shape == (10, 1, 28, 28) and yv.shape == (10,)
    ae_train, _ = search_data(compose_cfg(*smoke_overrides))
    assert len(ae_train) == 1  # the autoencoder's rows carry no labels
