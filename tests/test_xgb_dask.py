"""XGBoost on Dask (``engine=dask``): the stages write the same metrics as the local engine, trained by
xgboost.dask on a 2-worker LocalCluster (the stage's own, or a running scheduler named in the config)."""

from __future__ import annotations


import mlflow
import numpy as np
import pytest
from distributed import LocalCluster
from omegaconf import OmegaConf

from aelab.stages import downstream, features, pretrain, tabular
from aelab.xgb import fit_xgb, xgb_client
from conftest import compose_cfg, read_metrics
from test_tabular import tiny_overrides, write_table

DASK = OmegaConf.create({"scheduler": None, "n_workers": 2, "threads_per_worker": 1, "connect_timeout": 30})


def test_a_dask_fit_comes_back_as_a_local_classifier_trained_on_both_workers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    params = {"n_estimators": 20, "max_depth": 3, "tree_method": "hist", "random_state": 0, "n_jobs": 1}
    with xgb_client("dask", DASK) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        model = fit_xgb(params, x, y, client)
    local = fit_xgb(params, x, y)
    assert type(model) is type(local) and model.n_classes_ == 3
    assert (model.predict(x) == y).mean() == pytest.approx((local.predict(x) == y).mean(), abs=0.03)


def test_downstream_on_dask_writes_the_local_engines_metrics(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, "downstream.n_estimators=20")
    pretrain.main(cfg)
    features.main(cfg)
    local = downstream.main(cfg)
    on_dask = downstream.main(compose_cfg(*smoke_overrides, "downstream.n_estimators=20", "downstream.engine=dask"))
    assert read_metrics(tiny_raw / "reports/metrics/downstream.json") == on_dask
    assert {k: set(v) for k, v in on_dask.items()} == {k: set(v) for k, v in local.items()}
    for name in local:  # 40 test images: one of them is 0.025 of accuracy
        assert on_dask[name]["accuracy"] == pytest.approx(local[name]["accuracy"], abs=0.1)
    runs = mlflow.search_runs(experiment_names=["aelab"], filter_string="tags.stage = 'downstream'",
                              output_format="list", order_by=["attributes.start_time"])
    assert [r.data.params["xgb_engine"] for r in runs] == ["local", "dask"]


def test_tabular_on_dask_uses_the_scheduler_named_in_the_config(workdir):
    csv = workdir / "table.csv"
    write_table(csv)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        results = tabular.main(compose_cfg(*tiny_overrides(csv), "tabular.xgb.engine=dask",
                                           f"dask.scheduler={cluster.scheduler_address}"))
        assert "array" in cluster.scheduler.task_prefixes  # the folds' rows went to this cluster's workers
    assert results["raw"]["roc_auc_mean"] > 0.8
