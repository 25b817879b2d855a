"""The tabular stage: breast-cancer default, any CSV, bad tables rejected before training, no fold leakage."""

from __future__ import annotations


import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.model_selection import StratifiedKFold

from aelab.config import ConfigError
from aelab.data.tabular import TableError, load_table, read_csv
from aelab.stages import tabular
from aelab.tracking import file_hash
from conftest import compose_cfg, read_metrics

FEATURES = [f"f{i}" for i in range(6)]


def write_table(path, n: int = 80, seed: int = 0) -> None:
    """A CSV of ``n`` rows, 6 numeric features on different scales and a yes/no target set by f0 + f1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)) * [1, 2, 5, 10, 50, 100] + [0, 1, -3, 10, 100, 1000]
    label = np.where(x[:, 0] + x[:, 1] / 2 + rng.normal(scale=0.3, size=n) > 0.5, "yes", "no")
    lines = [",".join(FEATURES + ["label"])]
    lines += [",".join([*(f"{v:.6f}" for v in row), y]) for row, y in zip(x, label)]
    path.write_text("\n".join(lines) + "\n")


def tiny_overrides(csv) -> list[str]:
    return ["tabular.source=csv", f"tabular.csv_path={csv}", "tabular.target=label", "tabular.folds=3",
            "tabular.epochs=3", "tabular.batch_size=16", "tabular.model.code_dim=12", "tabular.xgb.n_estimators=10"]


def test_stage_on_a_tiny_csv(workdir):
    csv = workdir / "table.csv"
    write_table(csv)
    results = tabular.main(compose_cfg(*tiny_overrides(csv)))

    assert results["dataset"] == "table.csv" and results["rows"] == 80 and results["folds"] == 3
    assert results["positive_class"] == "yes"
    assert {name: results[name]["n_features"] for name in tabular.FEATURE_SETS} == {"raw": 6, "codes": 12,
                                                                                    "raw_codes": 18}
    for name in tabular.FEATURE_SETS:
        m = results[name]
        assert set(m) == {"n_features", "roc_auc_mean", "roc_auc_std", "fit_seconds"}
        assert 0 <= m["roc_auc_mean"] <= 1 and 0 <= m["roc_auc_std"] < 0.5 and m["fit_seconds"] > 0
    assert results["raw"]["roc_auc_mean"] > 0.8  # the target is a noisy threshold on f0 + f1/2
    ae = results["ae"]
    assert ae["code_dim"] == 12 and ae["fit_seconds"] > 0 and ae["test_mse"] > 0
    assert 0 < ae["sparsity"]["mean_activation"] < 1 and 0 <= ae["sparsity"]["frac_near_zero"] <= 1
    assert read_metrics(workdir / "reports/metrics/tabular.json") == results
    report = (workdir / "reports/tabular.md").read_text()
    assert "| raw + codes | 18 |" in report and "3-fold" in report

    (run,) = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "tabular"
    assert run.data.tags["dataset"] == "table.csv" and run.data.tags["dataset_manifest_sha256"] == file_hash(csv)
    assert run.data.metrics["raw.roc_auc_mean"] == results["raw"]["roc_auc_mean"]
    per_fold = mlflow.MlflowClient().get_metric_history(run.info.run_id, "codes_roc_auc")
    assert sorted(m.step for m in per_fold) == [0, 1, 2]


def test_breast_cancer_is_the_default_table():
    cfg = compose_cfg()
    assert cfg.tabular.source == "breast_cancer" and cfg.tabular.model.code_dim == 100
    table = load_table(cfg.tabular)
    assert table.x.shape == (569, 30) and table.x.dtype == np.float32 and len(table.features) == 30
    assert set(np.unique(table.y)) == {0, 1} and table.classes == ["malignant", "benign"]
    assert table.source_file.name == "breast_cancer.csv" and table.source_file.is_file()


def test_each_fold_scaler_is_fit_on_exactly_its_training_rows(workdir, monkeypatch):
    csv = workdir / "table.csv"
    write_table(csv)
    table = read_csv(csv, "label")
    x = table.x.astype(np.float64)
    fitted = []

    class RecordingScaler(tabular.StandardScaler):
        def fit(self, X, y=None, sample_weight=None):
            fitted.append(np.asarray(X, dtype=np.float64).copy())
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr(tabular, "StandardScaler", RecordingScaler)
    cfg = compose_cfg(*tiny_overrides(csv))
    tabular.main(cfg)

    folds = list(StratifiedKFold(3, shuffle=True, random_state=cfg.seed).split(x, table.y))
    assert len(fitted) == len(folds)
    for rows, (train, test) in zip(fitted, folds):
        assert len(rows) == len(train)
        seen = {tuple(r) for r in rows}
        assert seen == {tuple(r) for r in x[train]} and not seen & {tuple(r) for r in x[test]}


def test_a_fold_is_blind_to_its_test_part():
    """Same training part, wildly different test part: the autoencoder trains to the very same loss."""
    table = load_table(compose_cfg().tabular)
    params = OmegaConf.to_container(compose_cfg("tabular.epochs=2", "tabular.xgb.n_estimators=5").tabular)
    train, test = np.arange(0, 400), np.arange(400, 569)
    args = (table.x[train], table.y[train])
    a = tabular.run_fold(params, 0, *args, table.x[test], table.y[test])
    b = tabular.run_fold(params, 0, *args, table.x[test] * 50 + 1000, table.y[test])
    assert a["ae_train_loss"] == b["ae_train_loss"]
    assert a["ae_test_mse"] != b["ae_test_mse"]


def _csv(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, target, fragments",
    [
        ("a,b,y\n1,2,0\n3,4,1\n", "label", ["no target column 'label'", "columns present: a, b, y"]),
        ("a,b,label\n1,2,0\n3,4,1\n5,6,2\n", "label", ["'label'", "exactly 2 distinct values", "has 3"]),
        ("a,b,c,label\n1,,2,0\n3,4,,1\n5,6,7,1\n", "label", ["NaN cells in column(s) b, c"]),
        ("a,color,label\n1,red,0\n2,blue,1\n", "label", ["non-numeric feature column(s) color"]),
        ("a,b,label\n1,inf,0\n2,3,1\n", "label", ["infinite values in column(s) b"]),
        ("label\n0\n1\n", "label", ["no feature columns"]),
        ("a,label\n1,0\n2,1\n3,1\n", "label", ["tabular.folds=5", "class '0'", "only 1 row"]),
    ],
    ids=["no-target", "not-binary", "nan", "non-numeric", "infinite", "no-features", "too-few-per-class"],
)
def test_bad_table_is_rejected_before_training(workdir, text, target, fragments):
    csv = _csv(workdir / "bad.csv", text)
    cfg = compose_cfg("tabular.source=csv", f"tabular.csv_path={csv}", f"tabular.target={target}")
    with pytest.raises(TableError) as err:
        tabular.main(cfg)
    assert str(csv) in str(err.value) or "tabular.folds" in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert not (workdir / "mlflow.db").exists() and not (workdir / "reports").exists()


def test_missing_csv_names_the_key_and_the_file(workdir):
    cfg = compose_cfg("tabular.source=csv", "tabular.csv_path=data/nowhere.csv")
    with pytest.raises(TableError, match=r"tabular\.csv_path: no such file data/nowhere\.csv"):
        tabular.main(cfg)
    assert not (workdir / "mlflow.db").exists()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["tabular.source=csv"], "tabular.source=csv needs tabular.csv_path"),
        (["tabular.model.code_activation=relu"], "tabular.penalty.sparsity_kl > 0 needs tabular.model.code_activation"),
        (["tabular.folds=1"], "tabular.folds: Input should be greater than or equal to 2"),
        (["tabular.source=parquet"], "tabular.source: Input should be 'breast_cancer' or 'csv'"),
        (["tabular.model._target_=aelab.models.autoencoders.ConvAutoencoder"], "tabular.model._target_ must be"),
        (["tabular.xgb.max_depth=0"], "tabular.xgb.max_depth"),
    ],
)
def test_bad_tabular_config_names_the_key(workdir, overrides, fragment):
    with pytest.raises(ConfigError) as err:
        tabular.main(compose_cfg(*overrides))
    assert fragment in str(err.value)
    assert not (workdir / "mlflow.db").exists()
