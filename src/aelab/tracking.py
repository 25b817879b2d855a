"""The one place that knows MLflow: tracking URI, experiment, run tags, params and artifacts."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import socket
import subprocess
import time
import warnings
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import fluent
from omegaconf import DictConfig, OmegaConf

from aelab.distributed import is_main_process
from aelab.errors import TrackingStoreError
from aelab.interrupts import interrupting_signal, process_alive, signals_interrupt

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger


SQLITE = "sqlite:///"
DVC_EXP_TMP = (".dvc", "tmp", "exps")  # where `dvc exp run --temp` / `--queue` run a copy of the project
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"  # the UI's "model training"
DIGEST_CHARS = 32  # of the manifest's sha256, as a dataset digest (MLflow's column holds 36)
DATASET_ATTEMPTS = 3  # log_input tries when a parallel job inserted the same dataset first
DUPLICATE_KEY_MESSAGES = ("duplicate key", "UNIQUE constraint failed", "Duplicate entry")  # PostgreSQL, SQLite, MySQL
SWEEP_RUN_ENV = "AELAB_SWEEP_RUN_ID"  # the parent run of the Hydra multirun this process runs jobs of
ALIAS = "pipeline"  # the registered version the workspace's last run of a stage made
REGISTERED = {"autoencoder": "aelab-autoencoder", "denoiser": "aelab-denoiser", "colorizer": "aelab-colorizer",
              "segmenter": "aelab-segmenter", "xgb_ae": "aelab-xgb-ae"}


def stage_folder() -> Path:
    """Where a stage runs: ``DVC_ROOT`` (which DVC sets for stage commands) or the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def project_root() -> Path:
    """The project a stage belongs to: its :func:`stage_folder`, and for an experiment DVC runs in a temporary copy
    (``<project>/.dvc/tmp/exps/...``), the project holding it."""
    root = stage_folder()
    parts = root.parts
    for i in range(len(parts) - len(DVC_EXP_TMP) + 1):
        if parts[i:i + len(DVC_EXP_TMP)] == DVC_EXP_TMP:
            return Path(*parts[:i])
    return root


def tracking_uri(cfg: DictConfig) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the config's (a sqlite file: MLflow >= 3.13 refuses the file store).

    A relative sqlite path is the project's (``project_root``): runs of ``dvc exp run --temp`` or ``--queue`` land in
    the project's store, not in one deleted with DVC's temporary copy.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/") and uri != SQLITE + ":memory:":
        return SQLITE + str(project_root() / uri[len(SQLITE):])
    return uri


def project_tracking_uri() -> str:
    """The store the stages track into, for the commands beside them (predict, serve_bench): ``MLFLOW_TRACKING_URI``,
    else ``mlflow.tracking_uri`` of the working directory's params.yaml (the composed config the stages read), else
    of conf/config.yaml."""
    from aelab.stages import CONF_DIR

    params = Path("params.yaml")
    return tracking_uri(OmegaConf.load(params if params.exists() else Path(CONF_DIR) / "config.yaml"))


def prepare_store(uri: str) -> None:
    """Create or upgrade a local sqlite store once, under a file lock beside it: MLflow's schema migration breaks
    (and leaves the database unusable) when several stages start on a new database at once."""
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    if not uri.startswith(SQLITE) or uri == SQLITE + ":memory:":
        return
    db = Path(uri[len(SQLITE):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        check_sqlite(db)
        MlflowClient(uri).search_experiments(max_results=1)  # opening the store creates or migrates its tables


def check_sqlite(db: Path) -> None:
    """Raise TrackingStoreError naming ``db`` when it exists but is not a readable SQLite database (truncated,
    overwritten), before MLflow touches it: it is opened read-only and checked (``PRAGMA quick_check``)."""
    import sqlite3

    if not db.exists() or db.stat().st_size == 0:
        return  # a new store
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            problem = con.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as err:
        problem = str(err)
    if problem != "ok":
        raise TrackingStoreError(
            f"the tracking store {db} is not a readable SQLite database ({problem}). The pipeline's outputs do not "
            f"depend on it: move it aside (`mv {db} {db}.broken`) and rerun for a new store, or point "
            "MLFLOW_TRACKING_URI at another one")


def check_server(uri: str, timeout: float = 10) -> None:
    """Raise TrackingStoreError when the tracking server at ``uri`` does not answer its ``/health``, instead of
    MLflow's minutes of retries."""
    import urllib.error
    import urllib.request

    local = "://127.0.0.1" in uri or "://localhost" in uri
    opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if local else []))
    try:
        opener.open(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (behind a proxy or auth, say): MLflow takes it from here
    except OSError as err:
        raise TrackingStoreError(
            f"cannot reach the tracking server {uri} ({getattr(err, 'reason', err)}): start it (`make server`), "
            "or unset MLFLOW_TRACKING_URI to track into sqlite:///mlflow.db") from None


def close_stale_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose stage process is gone (SIGKILL, a crashed machine), with
    their child runs; return their ids."""
    client = MlflowClient()
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    host = socket.gethostname()
    stale = {run.info.run_id for run in running if run.data.tags.get("host") == host
             and run.data.tags.get("pid", "").isdigit() and not process_alive(int(run.data.tags["pid"]))}
    stale |= {run.info.run_id for run in running if run.data.tags.get("mlflow.parentRunId") in stale}
    for run_id in stale:
        client.set_tag(run_id, "closed_by", "a later stage: the process of this run was gone")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    return sorted(stale)


def use_experiment(name: str) -> str:
    """Make ``name`` the active experiment and return its id; a new one in a local sqlite store keeps its artifacts
    in the project's ``mlruns/`` (MLflow's default is relative to whichever directory first created it). The
    experiment is marked as model training, so the MLflow UI opens on its runs (MLflow 3 opens an experiment of no
    kind on its GenAI overview)."""
    if mlflow.get_experiment_by_name(name) is None and mlflow.get_tracking_uri().startswith(SQLITE):
        try:
            mlflow.create_experiment(name, artifact_location=(project_root() / "mlruns").as_uri(),
                                     tags={EXPERIMENT_KIND: TRAINING_KIND})
        except MlflowException:
            pass  # created meanwhile by a stage that started at the same time
    experiment = mlflow.set_experiment(name)
    if EXPERIMENT_KIND not in experiment.tags:
        MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
    return experiment.experiment_id


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (``model name``, ``cpu family``, ...); empty off Linux."""
    path = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux)."""
    return cpuinfo().get("model name") or platform.processor() or "unknown"


def machine() -> str:
    """What the numbers were computed on, in one line: the CPU (model name, family/model numbers, core count, bf16
    or not, as the trainer decides its CPU precision) and the GPU, if PyTorch sees one. Metrics agree digit for
    digit only on one."""
    import torch

    from aelab.lit.trainer import cpu_computes_bf16

    fields = cpuinfo()
    family = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields else ""
    bf16 = "bf16" if cpu_computes_bf16() else "no bf16"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}{family}, {os.cpu_count()} CPUs, {bf16}; {gpu}"


def provenance() -> dict[str, str]:
    """Where and when a stage's metrics were made: :func:`machine`, torch's version, the commit and the UTC date.
    The stages add it to their metrics files (``"provenance"``, text, so ``check_metrics`` ignores it)."""
    import torch

    return {"machine": machine(), "torch": torch.__version__, "commit": git_commit(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


# The distributions that install an import name, where it is not the name itself (xgboost-cpu installs xgboost);
# a lookup of every installed package (importlib.metadata.packages_distributions) costs 1.4 s per stage here.
DISTRIBUTIONS = {"xgboost": ("xgboost", "xgboost-cpu")}


def installed_version(module: str) -> str:
    """The version of the distribution that installs ``module`` (e.g. xgboost from xgboost-cpu), read from its
    metadata without importing it (importing lightning alone takes seconds)."""
    for dist in DISTRIBUTIONS.get(module, (module,)):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "not installed"


def environment_tags() -> dict[str, str]:
    """What can explain different numbers from the same commit and data: package versions, the device, the CPU model
    and the thread count."""
    import torch

    versions = {f"env.{name}": installed_version(name) for name in ("lightning", "numpy", "xgboost")}
    return {"env.python": platform.python_version(), "env.torch": torch.__version__, **versions,
            "env.mlflow": mlflow.__version__, "env.cpu": cpu_model(), "env.torch_threads": str(torch.get_num_threads()),
            "env.device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def log_dataset(manifest: Path | str, name: str, sha256: str) -> None:
    """Log the data folder holding ``manifest`` as the active run's training input, its digest from ``sha256``.

    The tracking store looks the dataset up, then inserts it when new, in one transaction: parallel jobs (a Hydra
    multirun on ``mlflow server``) that start at once can both insert it, and the second fails on the unique key
    and rolls back; tried again, it finds the first one's row."""
    with warnings.catch_warnings():  # MLflow registers its local-file source twice, then warns it is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(manifest).resolve().parent))
    dataset = MetaDataset(source, name=name, digest=sha256[:DIGEST_CHARS])
    for attempt in range(DATASET_ATTEMPTS):
        try:
            return mlflow.log_input(dataset, context="training")
        except MlflowException as err:  # parallel jobs inserting the same new dataset: the loser's insert fails
            if attempt + 1 == DATASET_ATTEMPTS or not any(m in str(err) for m in DUPLICATE_KEY_MESSAGES):
                raise
            time.sleep(0.2 * (attempt + 1))  # the winner's row is there now: the retry links the run to it


def git_commit() -> str:
    """The current commit (with ``-dirty`` when the work tree has changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def file_hash(path: Path | str) -> str:
    """sha256 of a file (the dataset manifest identifies the data a run saw)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole."""
    out: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class _OncePerMessage(logging.Filter):
    """Lets each distinct message through once: MLflow's GPU monitor warns at every sample when the GPU does not
    report a value (the power draw or utilisation of some GPUs and of MIG slices)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        new = message not in self.seen
        self.seen.add(message)
        return new


def log_system_metrics(cfg: DictConfig) -> bool:
    """Whether the run :func:`start_run` opens gets MLflow's system metrics monitor (``mlflow.system_metrics``, every
    ``mlflow.system_metrics_interval`` seconds), and its interval set when so; its chatter quieted: the start and
    stop lines, the GPU-less machine's "Skip logging GPU metrics" (INFO) and repeats of a GPU's warnings."""
    if not cfg.mlflow.system_metrics or fluent.run_id_to_system_metrics_monitor:
        return False  # off, or a run of this process (a sweep's parent, an enclosing stage run) samples it already
    mlflow.set_system_metrics_sampling_interval(cfg.mlflow.system_metrics_interval)
    quiet = logging.getLogger("mlflow.system_metrics")
    if quiet.level == logging.NOTSET:  # unless someone set it: MLFLOW_LOGGING_LEVEL=DEBUG leaves it alone too
        quiet.setLevel(logging.WARNING)
    gpu = logging.getLogger("mlflow.system_metrics.metrics.gpu_monitor")
    if not any(isinstance(f, _OncePerMessage) for f in gpu.filters):
        gpu.addFilter(_OncePerMessage())
    return True


@contextmanager
def start_run(cfg: DictConfig, stage: str, manifest: Path | str | None = None, dataset: str | None = None):
    """An MLflow run for one stage, tagged with stage, git commit, dataset (``data.name`` unless given), dataset
    manifest hash, host and process id, config logged. Inside a Hydra multirun it is a child of the sweep's parent
    run (``SWEEP_RUN_ENV``, set by aelab.sweep: jobs in other processes, as the joblib and SLURM launchers run them,
    find it too) and carries the job's overrides.

    With ``mlflow.system_metrics`` (the default) MLflow samples the machine every ``mlflow.system_metrics_interval``
    seconds in a thread into the run's ``system/*`` metrics: CPU and memory (psutil), each NVIDIA GPU's utilisation,
    memory and power (nvidia-ml-py; none without a GPU or a driver, silently). The figures are the whole machine's:
    rank 0 alone tracks a DDP stage, and its run shows every GPU of the node. MLflow gives each run started with
    ``log_system_metrics=True`` a monitor of its own (a nested run shares nothing with its parent), so one process
    gets one: the run opened here has it unless a run of this process has one already. A sweep's parent run
    (aelab.sweep) has none, so each job's run has its own, in the job's process or the sweep's; the nested runs the
    stages open themselves (a variant, a class) have none, their stage run's covers them. Every job's run shows the
    machine while it ran, which is what tells whether the GPU worked.

    The store is prepared under a lock first and runs left RUNNING by dead processes are closed as KILLED. SIGTERM
    or SIGINT inside the block ends the run as KILLED and exits 128 + the signal (``aelab.interrupts``)."""
    if not is_main_process(cfg.trainer):
        yield None  # another rank of a DDP stage: rank 0 alone tracks it
        return
    uri = tracking_uri(cfg)
    prepare_store(uri)
    mlflow.set_tracking_uri(uri)
    close_stale_runs(use_experiment(cfg.mlflow.experiment))
    tags = {"stage": stage, "git_commit": git_commit(), "dataset": dataset or cfg.data.name,
            "host": socket.gethostname(), "pid": str(os.getpid())}
    tags.update(environment_tags())
    if manifest is not None:
        tags["dataset_manifest_sha256"] = file_hash(manifest)
    sweep = os.environ.get(SWEEP_RUN_ENV) if HydraConfig.initialized() else None
    if sweep is not None:
        tags["sweep_overrides"] = " ".join(HydraConfig.get().overrides.task)
        tags["sweep_job"] = str(HydraConfig.get().job.num)
    with signals_interrupt(), mlflow.start_run(run_name=tags.get("sweep_overrides", stage), tags=tags,
                                               nested=mlflow.active_run() is not None, parent_run_id=sweep,
                                               log_system_metrics=log_system_metrics(cfg)) as run:
        config = OmegaConf.to_container(cfg, resolve=True)
        mlflow.log_params(flatten(config))
        mlflow.log_dict(config, "config.yaml")
        if manifest is not None:  # the UI's Dataset column: the data's name, folder and content hash
            log_dataset(manifest, tags["dataset"], tags["dataset_manifest_sha256"])
        try:
            yield run
        except BaseException as err:  # a child run the signal cut short was closed (FAILED) by its own block already
            if interrupting_signal(err) is not None:
                mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise


def lightning_logger(cfg: DictConfig, run) -> MLFlowLogger | bool:
    """Lightning's MLflow logger writing into the already started ``run`` (per-epoch metrics); no logger (False)
    without a run (DDP ranks other than 0).

    Lightning is imported here, not at the top: stages without a Lightning fit (download, downstream) skip its import.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    if run is None:
        return False
    return MLFlowLogger(experiment_name=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg),
                        run_id=run.info.run_id)


def should_register() -> bool:
    """Register a version for a single run, not for each job of a Hydra multirun (a sweep's models stay logged
    models of their runs)."""
    return not in_multirun()


def in_workspace() -> bool:
    """Whether the stage runs in the project's own folder (not in a ``dvc exp run --temp`` copy)."""
    return project_root() == stage_folder()


def publish(kind: str, log_model, args: dict, metrics: dict[str, float], sha256: str):
    """Log a trained model from the active run: ``log_model(name=kind, **args)`` (a flavor's or pyfunc's),
    registered as ``REGISTERED[kind]`` when :func:`should_register`, its version tagged with the run's commit and the
    weights' sha256 and, for a run in the project's own workspace (``dvc repro``, ``dvc exp run`` without
    ``--temp``), aliased :data:`ALIAS`: ``models:/aelab-denoiser@pipeline`` is the model whose checkpoint is in
    ``models/`` now. ``metrics`` are logged to the run against the model (the UI's model page shows them)."""
    name = REGISTERED[kind] if should_register() else None
    info = log_model(name=kind, registered_model_name=name, **args)
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
    if name is not None:
        client, number = MlflowClient(), str(info.registered_model_version)
        client.set_model_version_tag(name, number, "git_commit",
                                     mlflow.active_run().data.tags.get("git_commit", "unknown"))
        client.set_model_version_tag(name, number, "weights_sha256", sha256)
        if in_workspace():
            client.set_registered_model_alias(name, ALIAS, number)
    return info
