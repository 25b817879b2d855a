"""`dvc repro` of the whole pipeline on the smoke profile, in a throwaway copy of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from aelab.stages import report

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not FASHION.is_dir(), reason=f"needs the offline Fashion-MNIST copy in {FASHION} "
                                                     "(Debian package dataset-fashion-mnist; .ci/run installs it)"),
]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git copy of the project's files with params.yaml composed for the smoke profile."""
    dest = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{dest.parent}/mlflow.db", "GIT_AUTHOR_NAME": "e2e",
           "GIT_AUTHOR_EMAIL": "e2e@localhost", "GIT_COMMITTER_NAME": "e2e", "GIT_COMMITTER_EMAIL": "e2e@localhost"}
    env.pop("AELAB_MIRROR", None)
    run(["git", "init", "-q"], dest, env)
    run([sys.executable, "-m", "aelab.compose", "profile=smoke"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "smoke"], dest, env)
    return dest, env


def test_dvc_repro_smoke_then_only_changed_stages_rerun(repo):
    path, env = repo
    out = run(["dvc", "repro"], path, env)
    stages = list(yaml.safe_load((path / "dvc.yaml").read_text())["stages"])
    for stage in stages:
        assert f"Running stage '{stage}'" in out

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], path, env))
    values = next(iter(metrics.values()))["data"]
    assert 0 < values["reports/metrics/features.json"]["data"]["ae_test_mse"] < 1
    downstream = values["reports/metrics/downstream.json"]["data"]
    assert set(downstream) == {"raw", "pca", "ae", "provenance"} and downstream["provenance"]["date"]
    manifest = json.loads((path / "data/raw/fashion_mnist/manifest.json").read_text())
    assert manifest["files"]["train-images-idx3-ubyte.gz"]["source"] == str(FASHION / "train-images-idx3-ubyte.gz")
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], path, env)  # the pipeline (studies/ run apart)
    # Within the seed spread of the committed smoke baseline (python -m aelab.spread ... -S profile=smoke); the studies'
    # committed metrics (studies/dvc.yaml, default config) are not the smoke run's and are not in that baseline
    for study in yaml.safe_load((path / "studies/dvc.yaml").read_text())["stages"]:
        (path / f"reports/metrics/{study}.json").unlink()
    out = run([sys.executable, "-m", "aelab.check_metrics", "--baseline", "reports/baseline/smoke/metrics",
               "--spread", "reports/baseline/smoke/spread.json"], path, env)
    assert " 0 beyond tolerance" in out
    page = (path / "reports/index.html").read_text()
    assert '<section id=' in page and 'class="status">ran<' in page
    statuses = dict(re.findall(r'<section id="([a-z0-9-]+)" class="([a-z-]+)">', page))
    studies = {s.slug for s in report.SECTIONS if s.study}
    assert statuses and all(status == "ran" for slug, status in statuses.items() if slug not in studies)
    # the studies' tables are committed; their figures are DVC-cached outputs, not in a fresh clone until they run
    assert studies <= set(statuses) and all(statuses[slug] in ("ran", "incomplete") for slug in studies)

    # A downstream-only change, through DVC's Hydra composition: the autoencoder is not retrained.
    out = run(["dvc", "exp", "run", "-S", "profile=smoke", "-S", "downstream.max_depth=2"], path, env)
    assert [s for s in stages if f"Running stage '{s}'" in out] == ["downstream", "report"]
    assert "max_depth: 2" in (path / "params.yaml").read_text()

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    tracked = [run.data.tags["stage"] for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert sorted(tracked) == sorted(stages + ["downstream", "report"])  # one run per stage, plus the exp's reruns
    assert all(run.info.status == "FINISHED" for run in runs)
