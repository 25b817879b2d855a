"""One module per DVC stage; each is a Hydra app (``python -m aelab.stages.<name>``, ``-m`` for sweeps).

Under ``dvc repro`` the stages read the composed ``params.yaml`` (see dvc.yaml); run by hand they compose
``conf/`` directly, so config groups can be swept: ``python -m aelab.stages.pretrain -m model=simple,deep,conv``.

A stage's ``main`` is wrapped in :func:`publishes_outputs`: it writes under ``output_root()``, a staging folder,
and its outputs are moved into place together when it returns; a stage that fails publishes none of them. Each
metrics file it wrote (``reports/metrics/*.json``) gains a ``"provenance"`` entry first: machine, torch, commit,
date (:func:`aelab.tracking.provenance`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from aelab.errors import reported
from aelab.interrupts import process_alive
from aelab.paths import write_json
from aelab.tracking import in_multirun, provenance

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")
STAGING_PREFIX = ".aelab-staging-"
_staging: ContextVar[Path | None] = ContextVar("aelab_staging", default=None)


def final_root() -> Path:
    """``.`` for a single run (DVC's declared outs); the job's own folder in a Hydra multirun, so jobs don't clash."""
    if in_multirun():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(".")


def output_root() -> Path:
    """Where a stage writes its outputs: its staging folder while it runs (see ``publishes_outputs``), else
    ``final_root()``."""
    return _staging.get() or final_root()


def publishes_outputs(main):
    """Run a stage's ``main(cfg)`` with its writes staged in a folder beside its outputs; move every file into place
    when it returns, so a failing stage leaves the previous outputs as they were (and none half-new). Staging
    folders left by killed processes are removed first. Run from the command line (a Hydra app), an expected
    failure is one message and exit status 1 (``aelab.errors.reported``); called with a config, it raises."""
    @functools.wraps(main)
    def run(cfg):
        final = final_root()
        final.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(final)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=final))
        try:
            with staged_in(staging), reported(program(main)) if HydraConfig.initialized() else nullcontext():
                result = main(cfg)
            stamp_metrics(staging)
            publish(staging, final)
            return result
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return run


def program(main) -> str:
    """The command that runs ``main``'s stage (``aelab.stages.pretrain``, also when run as ``python -m``)."""
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    return spec.name if spec is not None else main.__module__


@contextmanager
def staged_in(staging: Path):
    """``output_root()`` is ``staging`` inside the block. (A function of this module, so that ``run`` above, which
    launchers such as joblib's pickle, refers to no ContextVar itself.)"""
    token = _staging.set(staging)
    try:
        yield
    finally:
        _staging.reset(token)


METRICS_GLOB = "reports/metrics/*.json"


def stamp_metrics(staging: Path) -> None:
    """Add where and when they were made (``"provenance"``) to the metrics files under ``staging``."""
    files = sorted(staging.glob(METRICS_GLOB))
    stamp = provenance() if files else {}
    for path in files:
        write_json(path, {**json.loads(path.read_text()), "provenance": stamp})


def publish(staging: Path, final: Path) -> None:
    """Move every file under ``staging`` to the same place under ``final`` (renames on one file system)."""
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = final / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def remove_stale_staging(final: Path) -> None:
    """Remove the staging folders under ``final`` whose process is gone."""
    for folder in final.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX):].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)

