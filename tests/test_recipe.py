"""The lecture's tuning recipe on the classifier: its steps chain (each step's candidates carry the picks before
it), the stage end to end on tiny data, and bad values rejected before any work."""

from __future__ import annotations

import json

import mlflow
import pytest

from aelab.config import ConfigError
from aelab.stages import recipe
from conftest import compose_cfg

TINY = ["classify.train_labels=100", "classify.val_limit=null", "classify.batch_size=32", "classify.max_epochs=2",
        "classify.model.hidden=[32,16]", "recipe.val_limit=40", "search.n_lr=4", "search.n_momentum=3"]


def test_each_steps_pick_reaches_the_next_step(tiny_raw, smoke_overrides, monkeypatch):
    seen = {}

    def last_is_best(cfgs, train, val, n_batches):  # the last candidate wins, so every pick differs from the start
        step = recipe.STEPS[len(seen)]
        seen[step] = cfgs
        return [float(len(cfgs) - i) for i in range(len(cfgs))], {"vectorized": False, "device": "cpu"}

    monkeypatch.setattr(recipe, "step_losses", last_is_best)
    cfg = recipe.recipe_start(compose_cfg(*smoke_overrides, *TINY))
    mlflow.set_experiment("recipe-chain")  # in this test's store: an earlier test's experiment id is not there
    with mlflow.start_run():
        steps, picks = recipe.run_recipe(cfg, *recipe.search_data(cfg), tiny_raw)
    assert list(steps) == list(recipe.STEPS)
    lr, wd = cfg.search.lr_max, cfg.recipe.weight_decay_max
    beta1 = 1 - cfg.search.one_minus_momentum_max
    assert [c.classify.optim.lr for c in seen["weight_decay"]] == [pytest.approx(lr)] * 3
    assert [c.classify.optim.weight_decay for c in seen["momentum"]] == [pytest.approx(wd)] * 3
    for c in seen["dropout"]:
        assert (c.classify.optim.lr, c.classify.optim.weight_decay) == (pytest.approx(lr), pytest.approx(wd))
        assert c.classify.optim.betas[0] == pytest.approx(beta1)
    assert [c.classify.model.dropout_input for c in seen["dropout"]] == [0.0, 0.1]  # the smoke profile's grid
    assert picks == {"classify.optim.lr": pytest.approx(lr), "classify.optim.weight_decay": pytest.approx(wd),
                     "classify.optim.betas": [pytest.approx(beta1), 0.999],
                     "classify.model.dropout_input": 0.1, "classify.model.dropout_hidden": 0.5}
    assert all(s["at_edge"] for s in steps.values()) and steps["lr"]["best_x"] == pytest.approx(lr)
    assert steps["dropout"]["start"] == {k: v for k, v in picks.items() if "dropout" not in k}
    # the fixed recipe is where the first step starts: dropout 10 % / 50 % and ridge
    assert {(c.classify.model.dropout_input, c.classify.model.dropout_hidden) for c in seen["lr"]} == {(0.1, 0.5)}
    assert {c.classify.optim.weight_decay for c in seen["lr"]} == {1e-4}


def test_step_candidates_follow_the_optimizer():
    sgd = compose_cfg("classify.optim.name=sgd", "search.n_momentum=2")
    candidates, x, _ = recipe.step_candidates(sgd, "momentum")
    assert [c["classify.optim.momentum"] for c in candidates] == pytest.approx([1 - v for v in x])
    adam, _, _ = recipe.step_candidates(compose_cfg("search.n_momentum=2"), "momentum")
    assert [c["classify.optim.betas"][1] for c in adam] == [0.999, 0.999]


def test_recipe_stage_end_to_end(tiny_raw, smoke_overrides):
    out = recipe.main.__wrapped__(compose_cfg(*smoke_overrides, *TINY))
    metrics = json.loads((tiny_raw / "reports/metrics/recipe.json").read_text())
    assert list(out["steps"]) == list(recipe.STEPS) and metrics["picks"] == out["picks"]
    steps = [metrics["steps"][step] for step in recipe.STEPS]
    assert [s["n_candidates"] for s in steps] == [4, 3, 3, 2]
    assert [s["n_batches"] for s in steps] == [5, 4, 4, 4]  # 100 labels: 4 batches of 32
    done = {}
    for result in steps:  # each step started from the picks before it
        assert result["start"] == done
        done.update(result["pick"])
    for name in ("fixed", "tuned"):
        assert 0 <= metrics[name]["test_error"] <= 1 and metrics[name]["epochs"] == 2
    table = (tiny_raw / "reports/recipe.md").read_text()
    assert table.startswith("| step | pick |") and "| tuned |" in table and "| fixed |" in table
    for step in recipe.STEPS:
        assert (tiny_raw / f"reports/plots/recipe_{step}.csv").exists()
        assert (tiny_raw / f"reports/figures/recipe_{step}.png").stat().st_size > 1000
    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    children = sorted(r.data.tags.get("step", r.data.tags.get("variant")) for r in runs
                      if "mlflow.parentRunId" in r.data.tags)
    assert children == sorted([*(f"{s}" for s in recipe.STEPS), "fixed", "tuned"])


@pytest.mark.parametrize("overrides, key", [
    (["recipe.dropout_hidden=[0.5,1.0]"], "recipe.dropout_hidden"),
    (["recipe.weight_decay_min=0.5"], "weight_decay_min < weight_decay_max"),
    (["recipe.fixed=['classify.optim.weight_decay=-1']"], "recipe.fixed"),
    (["classify.train_labels=54001"], "classify.train_labels"),
])
def test_bad_values_fail_before_any_work(workdir, overrides, key):
    with pytest.raises(ConfigError, match=key):
        recipe.main.__wrapped__(compose_cfg(*overrides))  # workdir holds no data: any work would fail otherwise
