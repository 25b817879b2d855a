"""One module per DVC stage; each is a Hydra app (``python -m aelab.stages.<name>``, ``-m`` for sweeps).

Under ``dvc repro`` the stages read the composed ``params.yaml`` (see dvc.yaml); run by hand they compose
``conf/`` directly, so config groups can be swept: ``python -m aelab.stages.pretrain -m model=simple,deep,conv``.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")


def output_root() -> Path:
    """``.`` for a single run (DVC's declared outs); the job's own folder in a Hydra multirun, so jobs don't clash."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(".")
