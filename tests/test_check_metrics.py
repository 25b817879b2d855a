"""Telling a real change from noise: metrics against a baseline with tolerances from the seed spread."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from aelab import check_metrics
from aelab.check_metrics import compare, flat_metrics, per_stage, read_revision, rounding_floor
from aelab.spread import machines, markdown, merge_into, pipeline_stages, summarize


def test_flat_metrics_keeps_numbers_and_drops_wall_times_flags_and_text():
    flat = flat_metrics({"pretrain": {"test_mse": 0.01, "train_seconds": 80.0, "model": "deep", "fallback": True,
                                      "iou": {"Shirt": 0.4}, "epochs": 30}})
    assert flat == {"pretrain.test_mse": 0.01, "pretrain.iou.Shirt": 0.4, "pretrain.epochs": 30.0}


def test_a_change_passes_within_its_seed_spread_and_fails_beyond_it():
    base = {"a": 0.80, "b": 19.25, "c": 1.0}
    spread = {"a": 0.01, "b": 0.5}
    rows = {r["metric"]: r for r in compare({"a": 0.82, "b": 17.0, "c": 1.0}, base, spread, sigmas=3)}
    assert rows["a"]["ok"] and rows["a"]["tolerance"] == pytest.approx(0.03)
    assert not rows["b"]["ok"] and "beyond 3 x its seed spread" in rows["b"]["why"]
    assert rows["c"]["ok"]  # no spread: equal to rtol
    rows = {r["metric"]: r for r in compare({"a": 0.8, "c": 1.001, "new": 2.0}, base, spread)}
    assert not rows["c"]["ok"] and "no measured spread" in rows["c"]["why"]
    assert (rows["b"]["why"], rows["new"]["why"]) == ("only in the baseline", "new metric")


def test_per_stage_counts_what_moved_beyond_tolerance():
    rows = compare({"segment.miou": 0.6, "segment.g": 0.96, "pretrain.mse": 0.01}, {"segment.miou": 0.75,
                   "segment.g": 0.96, "pretrain.mse": 0.01}, {"segment.miou": 0.015})
    assert per_stage(rows) == {"pretrain": (0, 1), "segment": (1, 2)}


def test_spread_summary_and_table():
    spread = summarize({42: {"a": 1.0, "b": 5.0}, 43: {"a": 3.0, "b": 5.0, "only_here": 1.0}})
    assert spread == {"a": {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2, "values": {"42": 1.0, "43": 3.0}},
                      "b": {"mean": 5.0, "std": 0.0, "n": 2, "values": {"42": 5.0, "43": 5.0}}}
    table = markdown(spread, [42, 43], ["profile=smoke"]).splitlines()
    assert table[2] == "| metric | mean ± std | seed 42 | seed 43 |" and table[4] == "| a | 2 ± 1.4 | 1 | 3 |"


def test_a_stage_spread_replaces_only_that_stages_metrics_and_machine(tmp_path):
    path = tmp_path / "spread.json"
    old = {"colorize.psnr.model": {"mean": 20.7, "std": 5.1}, "colorize.gone": {"mean": 1, "std": 0},
           "denoise.psnr.model": {"mean": 21.06, "std": 0.06}}
    path.write_text(json.dumps({"seeds": [42, 43], "overrides": [], "metrics": old,
                                "machines": {"colorize": "old box", "denoise": "old box"}}))
    new = {"colorize.psnr.model": {"mean": 18.0, "std": 0.2}, "colorize.per_photo.coffee.psnr.model": {"mean": 19.0}}
    merged = merge_into(path, {"seeds": [42, 43], "overrides": [], "metrics": new,
                               "machines": {"colorize": "new box"}}, ["colorize"])
    assert merged["metrics"] == {**new, "denoise.psnr.model": old["denoise.psnr.model"]}
    assert list(merged["metrics"]) == sorted(merged["metrics"])
    assert merged["machines"] == {"colorize": "new box", "denoise": "old box"}
    with pytest.raises(ValueError, match=r"seeds \[42, 43\] .* not \[42, 43, 44\] .* without --stages"):
        merge_into(path, {"seeds": [42, 43, 44], "overrides": [], "metrics": new, "machines": {}}, ["colorize"])


def test_the_spread_records_each_stages_machine_from_its_metrics_provenance():
    runs = {42: {"segment": {"miou": 0.6, "provenance": {"machine": "box A"}}, "old": {"x": 1}},
            43: {"segment": {"miou": 0.7, "provenance": {"machine": "box B"}}, "old": {"x": 1}}}
    assert machines(runs) == {"segment": "box A / box B"}


def test_a_whole_pipeline_spread_summarizes_the_pipelines_stages_not_the_studies():
    stages = pipeline_stages(Path(__file__).resolve().parents[1] / "dvc.yaml")
    assert {"pretrain", "segment", "report"} <= set(stages) and not {"codes", "finetune"} & set(stages)


def test_check_metrics_allows_colorize_its_rounding_floor():
    assert rounding_floor("colorize.per_photo.coffee.psnr.model") == 1.0
    assert rounding_floor("colorize.ssim_gain_vs_gray") == 0.04 and rounding_floor("denoise.psnr.model") == 0.0
    rows = compare({"colorize.psnr.model": 21.6}, {"colorize.psnr.model": 20.9}, {"colorize.psnr.model": 0.1})
    assert rows[0]["ok"]  # 0.7 dB: seven seed stds, within the 1 dB floor


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_the_cli_checks_the_workspace_against_the_committed_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "reports/metrics"
    folder.mkdir(parents=True)
    (folder / "pretrain.json").write_text(json.dumps({"test_mse": 0.0120, "train_seconds": 80}))
    git("init", "-q", cwd=tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qam", "x", "--allow-empty", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "metrics", cwd=tmp_path)
    assert read_revision("HEAD") == {"pretrain": {"test_mse": 0.0120, "train_seconds": 80}}

    (folder / "pretrain.json").write_text(json.dumps({"test_mse": 0.0121, "train_seconds": 95}))  # slower: ignored
    assert check_metrics.main([]) == 1  # no spread measured: 0.0001 is a change
    (tmp_path / "reports/spread.json").write_text(json.dumps(
        {"seeds": [1, 2], "metrics": {"pretrain.test_mse": {"mean": 0.012, "std": 0.0001, "n": 2}}}))
    assert check_metrics.main([]) == 0  # within 3 x the seed spread
    out = capsys.readouterr().out
    assert "1 with a seed spread" in out and re.search(r"pretrain +0 of +1 beyond tolerance", out)
