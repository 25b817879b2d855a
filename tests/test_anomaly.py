"""Anomaly scores (AUCs on toy scores), the protocols' splits, config checks, and the anomaly stage on tiny data."""

from __future__ import annotations

import csv

import mlflow
import numpy as np
import pytest

from aelab.config import ConfigError, anomaly_classes, validate
from aelab.stages import anomaly
from conftest import compose_cfg, read_metrics

METRICS = {"roc_auc", "pr_auc"}


def test_separable_anomalies_score_one_and_random_scores_one_half():
    rng = np.random.default_rng(0)
    anomalous = rng.random(20000) < 0.1
    clean, curve = anomaly.detection_scores(anomalous + rng.normal(0, 0.1, anomalous.size), anomalous)
    assert clean["roc_auc"] == pytest.approx(1.0, abs=1e-3) and clean["pr_auc"] == pytest.approx(1.0, abs=1e-2)
    assert curve[1] == pytest.approx(1.0) and curve.shape == anomaly.FPR.shape  # all anomalies found at 1% FPR
    chance, curve = anomaly.detection_scores(rng.random(anomalous.size), anomalous)
    assert chance["roc_auc"] == pytest.approx(0.5, abs=0.02)
    assert chance["pr_auc"] == pytest.approx(anomalous.mean(), abs=0.02)  # PR-AUC by chance: the anomaly rate
    assert np.abs(curve - anomaly.FPR).max() < 0.05  # the diagonal


def test_scores_of_any_scale_and_sign_rank_alike():
    """Scores outside [0, 1] are not mistaken for logits: only their order counts."""
    rng = np.random.default_rng(1)
    anomalous = rng.random(2000) < 0.3
    scores = anomalous + rng.normal(0, 0.8, anomalous.size)
    reference, _ = anomaly.detection_scores(scores, anomalous)
    for transformed in (1e4 * scores, scores - 1e3, np.exp(5 * scores)):
        assert anomaly.detection_scores(transformed, anomalous)[0] == pytest.approx(reference)
    flipped, _ = anomaly.detection_scores(-scores, anomalous)
    assert flipped["roc_auc"] == pytest.approx(1 - reference["roc_auc"])


def test_protocols_train_on_the_normal_images_and_flag_the_others():
    y_train, y_test = np.array([0, 1, 2, 1, 0]), np.array([2, 1, 0])
    fit, positive = anomaly.split_masks("one_out", 1, y_train, y_test)
    assert fit.tolist() == [True, False, True, False, True] and positive.tolist() == [False, True, False]
    fit, positive = anomaly.split_masks("one_in", 1, y_train, y_test)
    assert fit.tolist() == [False, True, False, True, False] and positive.tolist() == [True, False, True]


def test_default_runs_every_class_one_out_and_classes_take_names_or_indices():
    cfg = compose_cfg()
    assert cfg.anomaly.protocol == "one_out" and cfg.anomaly.classes is None
    assert anomaly_classes(None, "fashion_mnist") == list(range(10))
    assert anomaly_classes(["Bag", 0, 8], "fashion_mnist") == [8, 0]
    validate(compose_cfg("anomaly.protocol=one_in", "anomaly.classes=[Trouser,9]"))


@pytest.mark.parametrize("override, fragment", [
    ("anomaly.protocol=one_vs_rest", "anomaly.protocol: Input should be 'one_out' or 'one_in'"),
    ("anomaly.classes=[10]", "anomaly.classes: [10] not among fashion_mnist's classes"),
    ("anomaly.classes=[Jacket]", "anomaly.classes: ['Jacket'] not among"),
    ("anomaly.classes=[]", "anomaly.classes: List should have at least 1 item"),
    ("anomaly.max_epochs=0", "anomaly.max_epochs: Input should be greater than 0"),
    ("anomaly.train_limit=-5", "anomaly.train_limit: Input should be greater than 0"),
])
def test_bad_anomaly_config_fails_before_any_work(tiny_raw, smoke_overrides, override, fragment):
    with pytest.raises(ConfigError, match=r"(?s)" + fragment.replace("[", r"\[").replace("]", r"\]")):
        anomaly.main(compose_cfg(*smoke_overrides, override))
    assert not (tiny_raw / "reports").exists() and not (tiny_raw / "mlflow.db").exists()


def test_class_missing_from_the_limited_test_set_is_refused(tiny_raw, smoke_overrides):
    with pytest.raises(ConfigError, match="anomaly.classes: 'T-shirt/top' needs .* data.test_limit"):
        anomaly.main(compose_cfg(*smoke_overrides, "data.test_limit=1"))  # one test image: one class at most
    assert not (tiny_raw / "mlflow.db").exists()


def test_anomaly_stage_on_tiny_data(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides)  # the smoke profile: classes 0 and 1, one epoch
    metrics = anomaly.main(cfg)

    names = ["T-shirt/top", "Trouser"]
    assert read_metrics(tiny_raw / "reports/metrics/anomaly.json") == metrics
    assert metrics["protocol"] == "one_out" and metrics["classes"] == names and metrics["epochs"] == 1
    assert set(metrics) == {"protocol", "classes", "per_class", "mean", "train_seconds", "epochs"}
    assert list(metrics["per_class"]) == names
    for result in [*metrics["per_class"].values(), metrics["mean"]]:
        assert set(result) == set(anomaly.METHODS) and all(set(r) == METRICS for r in result.values())
        assert all(0 <= v <= 1 for r in result.values() for v in r.values())
    assert metrics["mean"]["pca"]["roc_auc"] == pytest.approx(
        np.mean([r["pca"]["roc_auc"] for r in metrics["per_class"].values()]))
    assert metrics["mean"]["pca"]["roc_auc"] > 0.9  # a class's band is where the others have only noise

    with open(tiny_raw / "reports/plots/anomaly_roc.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["fpr", "ae", "pca", "iforest"] and len(rows) == len(anomaly.FPR)
    assert float(rows[-1]["fpr"]) == 1 and all(float(rows[-1][m]) == 1 for m in anomaly.METHODS)
    table = (tiny_raw / "reports/anomaly.md").read_text()
    assert "| class | anomaly_rate | ae_roc_auc | ae_pr_auc | pca_roc_auc" in table and "| mean | — |" in table
    assert (tiny_raw / "reports/figures/anomaly_roc.png").stat().st_size > 5000

    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = {run.data.tags["anomaly_class"]: run for run in runs if run is not parent}
    assert parent.data.tags["stage"] == "anomaly" and parent.data.params["anomaly.protocol"] == "one_out"
    assert parent.data.metrics["mean.ae.roc_auc"] == pytest.approx(metrics["mean"]["ae"]["roc_auc"])
    assert parent.data.metrics["per_class.Trouser.iforest.pr_auc"] == pytest.approx(
        metrics["per_class"]["Trouser"]["iforest"]["pr_auc"])
    assert set(children) == set(names)
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in children.values())
    trouser = metrics["per_class"]["Trouser"]
    assert children["Trouser"].data.metrics["ae.roc_auc"] == pytest.approx(trouser["ae"]["roc_auc"])
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(children["Trouser"].info.run_id, "val_loss")) == 1  # one per epoch
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"anomaly.md", "anomaly_roc.png", "anomaly_roc.csv", "anomaly.json", "config.yaml"} <= artifacts
