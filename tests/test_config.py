"""Config composition and validation: bad values fail early, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from aelab.config import ConfigError, validate
from conftest import compose_cfg

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf/experiment").glob("*.yaml"))


def test_default_and_smoke_configs_are_valid():
    validate(compose_cfg())
    smoke = compose_cfg("profile=smoke")
    validate(smoke)
    assert smoke.data.train_limit == 2000 and smoke.trainer.max_epochs == 2


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_composes_into_a_valid_config_that_changes_it(name):
    cfg = compose_cfg(f"experiment={name}")
    validate(cfg)
    assert cfg != compose_cfg()


def test_classifier_presets_set_what_they_say():
    assert compose_cfg("experiment=classifier_early_stopping").classify.early_stopping == 5
    tuned = compose_cfg("experiment=classifier_tuned").classify
    assert (tuned.optim.lr, tuned.model.dropout_hidden, tuned.model.dropout_input) == (0.00105, 0.0, 0.1)


@pytest.mark.parametrize("model, code_dim", [("simple", 32), ("deep", 32), ("conv", 32)])
def test_model_group_selects_architecture(model, code_dim):
    cfg = compose_cfg(f"model={model}")
    assert cfg.model.name == model and cfg.model.code_dim == code_dim


@pytest.mark.parametrize("dataset", ["mnist", "kmnist"])
def test_data_group_inherits_defaults(dataset):
    cfg = compose_cfg(f"data={dataset}")
    assert cfg.data.name == dataset and cfg.data.val_fraction == 0.1


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("pretrain.optim.lr=-1", "pretrain.optim.lr", "greater than 0"),
        ("pretrain.loss=l1", "pretrain.loss", "'bce' or 'mse'"),
        ("trainer.max_epochs=abc", "trainer.max_epochs", "valid integer"),
        ("trainer.max_epochs=0", "trainer.max_epochs", "greater than 0"),
        ("data.val_fraction=1.5", "data.val_fraction", "less than 1"),
        ("model.code_dim=0", "model.code_dim", "greater than 0"),
        ("model.hidden=[128,-4]", "model.hidden.1", "greater than 0"),
        ("downstream.max_depth=2.5", "downstream.max_depth", "integer"),
        ("data.name=cifar100", "data.name", "known datasets: fashion_mnist, kmnist, mnist"),
        ("+pretrain.optim.lr_typo=1", "pretrain.optim.lr_typo", "Extra inputs are not permitted"),
    ],
)
def test_bad_value_names_key(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(override))
    line = next(line for line in str(err.value).splitlines() if line.strip().startswith(f"{key}:"))
    assert fragment in line


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("pretrain.optim.lr=0", "pretrain.batch_size=-3"))
    assert "pretrain.optim.lr:" in str(err.value) and "pretrain.batch_size:" in str(err.value)
