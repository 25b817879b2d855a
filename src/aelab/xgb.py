"""Where XGBoost trains: the one place that turns a stage's device setting (auto, cpu, cuda) into XGBoost's, and
its engine (local, or xgboost.dask on a dask.distributed cluster) into a fitted classifier."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import xgboost
from xgboost import XGBClassifier

from aelab.config import ConfigError

if TYPE_CHECKING:
    from distributed import Client


def xgb_device(setting: str, key: str) -> str:
    """XGBoost's ``device`` (``cpu`` or ``cuda``) for the config value ``setting`` held at ``key``.

    ``auto`` takes the GPU when torch sees one and this xgboost was built with CUDA, else the CPU (warning when a GPU
    is there but xgboost cannot use it). A forced ``cuda`` that cannot run fails at once, naming ``key``: xgboost
    itself would only warn and fall back to the CPU.
    """
    if setting == "cpu":
        return "cpu"
    gpu, built = torch.cuda.is_available(), bool(xgboost.build_info().get("USE_CUDA"))
    if gpu and built:
        return "cuda"
    if setting == "cuda":
        why = f"xgboost {xgboost.__version__} was built without CUDA" if gpu else "torch sees no CUDA GPU"
        raise ConfigError(f"{key}=cuda, but {why}: set {key}=auto or {key}=cpu")
    if gpu:
        warnings.warn(f"{key}=auto: a CUDA GPU is present but xgboost {xgboost.__version__} was built without CUDA, "
                      "so XGBoost trains on the CPU (install a CUDA build of xgboost to use the GPU)", stacklevel=2)
    return "cpu"


@contextmanager
def xgb_client(engine: str, dask_cfg) -> Iterator[Client | None]:
    """For ``engine=dask`` a dask.distributed client: of the scheduler at ``dask.scheduler``, or of a
    ``LocalCluster`` of ``dask.n_workers`` processes on this machine (closed afterwards). None for ``local``."""
    if engine == "local":
        yield None
        return
    from distributed import Client, LocalCluster

    if dask_cfg.scheduler:
        with Client(dask_cfg.scheduler, timeout=dask_cfg.connect_timeout) as client:
            yield client
        return
    with LocalCluster(n_workers=dask_cfg.n_workers, threads_per_worker=dask_cfg.threads_per_worker,
                      host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def fit_xgb(params: dict, x: np.ndarray, y: np.ndarray, client: Client | None = None) -> XGBClassifier:
    """``XGBClassifier(**params)`` fitted on (x, y): in this process, or with ``xgboost.dask`` on ``client``'s
    workers (the rows split in one partition per worker). Either way a local classifier comes back, to predict
    and to log like any other."""
    if client is None:
        return XGBClassifier(**params).fit(x, y)
    import dask.array as da
    from xgboost.dask import DaskXGBClassifier

    rows = -(-len(x) // max(1, len(client.scheduler_info()["workers"])))
    model = DaskXGBClassifier(**params)
    model.client = client
    model.fit(da.from_array(x, chunks=(rows, x.shape[1])), da.from_array(y, chunks=rows))
    local = XGBClassifier(**params)
    local.load_model(model.get_booster().save_raw("json"))
    return local
