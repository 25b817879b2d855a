"""A stage publishes all its outputs or none: writes are staged and moved into place when the stage returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aelab.paths import write_json
from aelab.stages import STAGING_PREFIX, output_root, pretrain, publishes_outputs
from conftest import compose_cfg


def test_outputs_appear_together_only_when_the_stage_returns(workdir):
    seen = {}

    @publishes_outputs
    def stage(fail: bool):
        write_json(output_root() / "reports/metrics/x.json", {"fail": fail})
        write_json(output_root() / "models/x/model.json", {"fail": fail})
        seen["during"] = (workdir / "reports/metrics/x.json").exists()
        if fail:
            raise RuntimeError("a figure could not be written")
        return "done"

    assert stage(False) == "done" and seen["during"] is False
    metrics = json.loads((workdir / "reports/metrics/x.json").read_text())
    assert metrics.pop("provenance").keys() == {"machine", "torch", "commit", "date"}  # the metrics file only
    assert metrics == json.loads((workdir / "models/x/model.json").read_text()) == {"fail": False}
    with pytest.raises(RuntimeError):
        stage(True)
    assert '"fail": false' in (workdir / "models/x/model.json").read_text()  # the previous outputs, untouched
    assert not list(workdir.glob(f"{STAGING_PREFIX}*"))


def test_staging_left_by_a_killed_stage_is_removed_next_time(workdir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = workdir / f"{STAGING_PREFIX}{dead.pid}-x1y2"
    running = workdir / f"{STAGING_PREFIX}{os.getpid()}-a3b4"  # another stage of a live process
    for folder in (stale, running):
        (folder / "models").mkdir(parents=True)
    publishes_outputs(lambda cfg: None)(None)
    assert not stale.exists() and running.exists()


def test_pretrain_failing_after_its_fit_keeps_the_previous_checkpoint_and_metrics(tiny_raw, smoke_overrides,
                                                                                monkeypatch):
    cfg = compose_cfg(*smoke_overrides)
    pretrain.main(cfg)
    outputs = [tiny_raw / "models/pretrain/ae.ckpt", tiny_raw / "reports/metrics/pretrain.json"]
    before = [p.read_bytes() for p in outputs]

    def unwritable(*args, **kwargs):
        raise OSError("No space left on device: reports/figures/pretrain_recon.png")

    monkeypatch.setattr(pretrain, "image_rows", unwritable)
    with pytest.raises(OSError, match="No space left"):
        pretrain.main(compose_cfg(*smoke_overrides, "trainer.max_epochs=2"))
    assert [p.read_bytes() for p in outputs] == before
