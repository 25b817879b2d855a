"""Stage recipe: the lecture's hyper-parameter recipe on its subject, the classifier, step by step.

It starts from the lecture's fixed choices (``recipe.fixed`` on top of ``classify``: ReLU, He init, dropout 10 % /
50 %, ridge, batch 128, Adam 0.9 / 0.999), then picks, in the lecture's order, the learning rate (``search.n_lr``
values, ``recipe.lr_batches`` mini-batches each), the weight decay, the momentum (``search.n_momentum`` values of
1 − m, Adam's β1 or SGD's momentum, one epoch each) and the input / hidden dropout rates; each step's candidates
start from the picks of the steps before it. A candidate is scored as in ``lr_search``: a short training from the
same initial weights on the same mini-batches of the label budget, best by validation loss (``aelab.search``;
candidates that differ only in their optimizer train as ensembles where that is faster). Each step is a child MLflow
run; then the classifier trained with the picks and with the fixed recipe, as ``classify`` trains its variants.

Outputs: ``reports/recipe.md`` (the picks, then tuned vs fixed), ``reports/metrics/recipe.json``,
``reports/plots/recipe_<step>.csv`` and ``reports/figures/recipe_<step>.png`` (loss per candidate).
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time

import hydra
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from aelab.config import ConfigError, check_label_budget, validate
from aelab.data.images import raw_dir
from aelab.paths import atomic_path, require, write_json
from aelab.search import log_grid, run_search, search_data, search_losses, short_training_loss, subject_optim
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.stages.classify import TABLE_KEYS, train_variant
from aelab.sweep import markdown_table
from aelab.tracking import start_run

log = logging.getLogger(__name__)
STEPS = ("lr", "weight_decay", "momentum", "dropout")


def with_values(cfg: DictConfig, values: dict) -> DictConfig:
    """``cfg`` with ``values`` (dotted key -> value) set."""
    out = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def recipe_start(cfg: DictConfig) -> DictConfig:
    """The recipe's starting config: ``recipe.fixed`` applied, the search pointed at the classifier with its batch
    size and ``recipe.val_limit`` validation images; validated, naming ``recipe.fixed`` on a bad override."""
    start = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(cfg.recipe.fixed)), {"search": {
        "subject": "classifier", "batch_size": cfg.classify.batch_size, "val_limit": cfg.recipe.val_limit}})
    try:
        validate(start)
    except ConfigError as err:
        raise ConfigError(f"recipe.fixed: {err}") from None
    return start


def step_candidates(cfg: DictConfig, step: str) -> tuple[list[dict], np.ndarray | list[str], str]:
    """The candidates of ``step`` (each: dotted key -> value), what to plot them by, and its axis label."""
    r, s, optim = cfg.recipe, cfg.search, cfg.classify.optim
    if step == "lr":
        xs = log_grid(s.lr_min, s.lr_max, s.n_lr)
        return [{"classify.optim.lr": float(x)} for x in xs], xs, "learning rate"
    if step == "weight_decay":
        xs = log_grid(r.weight_decay_min, r.weight_decay_max, r.n_weight_decay)
        return [{"classify.optim.weight_decay": float(x)} for x in xs], xs, "weight decay"
    if step == "momentum":
        xs = log_grid(s.one_minus_momentum_min, s.one_minus_momentum_max, s.n_momentum)
        if optim.name == "sgd":
            return [{"classify.optim.momentum": float(1 - x)} for x in xs], xs, "1 - momentum"
        return [{"classify.optim.betas": [float(1 - x), optim.betas[1]]} for x in xs], xs, "1 - beta1"
    pairs = list(itertools.product(r.dropout_input, r.dropout_hidden))
    return ([{"classify.model.dropout_input": float(i), "classify.model.dropout_hidden": float(h)} for i, h in pairs],
            [f"{i:g} / {h:g}" for i, h in pairs], "dropout input / hidden")


def step_batches(cfg: DictConfig, step: str, n_train: int) -> int:
    """Mini-batches each candidate of ``step`` trains for."""
    epoch = math.ceil(n_train / cfg.search.batch_size)
    return {"lr": cfg.recipe.lr_batches, "weight_decay": cfg.recipe.weight_decay_epochs * epoch, "momentum": epoch,
            "dropout": cfg.recipe.dropout_epochs * epoch}[step]


def step_losses(cfgs: list[DictConfig], train, val, n_batches: int) -> tuple[list[float], dict]:
    """Validation loss of each candidate config after ``n_batches``: by ``search_losses`` (ensembles where they
    pay) when the candidates differ only in their optimizer, else one short training after the other."""
    if all(c.classify.model == cfgs[0].classify.model for c in cfgs):
        return search_losses(cfgs[0], [subject_optim(c) for c in cfgs], train, val, n_batches)
    losses = [short_training_loss(c, subject_optim(c), train, val, n_batches)
              for c in tqdm(cfgs, desc="candidates", unit="run")]
    return losses, {"vectorized": False, "device": train[0].device.type}


def run_step(cfg: DictConfig, step: str, picks: dict, train, val, root) -> dict:
    """One step of the recipe from ``cfg`` with ``picks`` (the earlier steps' picks), in a child run: its pick,
    best loss and how it was computed."""
    start = with_values(cfg, picks)
    candidates, plot_x, xlabel = step_candidates(start, step)
    n_batches = step_batches(cfg, step, len(train[0]))
    began = time.perf_counter()
    with mlflow.start_run(run_name=f"recipe_{step}", nested=True, tags={"stage": "recipe", "step": step}):
        mlflow.log_params({"start": " ".join(f"{k}={v}" for k, v in picks.items()) or "(fixed recipe)",
                           "n_batches": n_batches})
        losses, how = step_losses([with_values(start, c) for c in candidates], train, val, n_batches)
        result = run_search(f"recipe_{step}", losses, plot_x, xlabel, f"validation loss after {n_batches} "
                            "mini-batches", root, **how)
        best = result.pop("best_index")
        pick = candidates[best]
        mlflow.log_params({f"pick.{k}": v for k, v in pick.items()})
    searched = {} if isinstance(plot_x[0], str) else {"best_x": float(plot_x[best]), "x": xlabel}
    return {"pick": pick, "start": dict(picks), **result, **searched, "at_edge": best in (0, len(candidates) - 1),
            "n_batches": n_batches, "seconds": time.perf_counter() - began}


def run_recipe(cfg: DictConfig, train, val, root) -> tuple[dict, dict]:
    """Every step in order, each from the picks before it: the steps' results and all picks."""
    picks, steps = {}, {}
    for step in STEPS:
        steps[step] = run_step(cfg, step, picks, train, val, root)
        picks.update(steps[step]["pick"])
        log.info("recipe %s: %s (validation loss %.4f)", step, steps[step]["pick"], steps[step]["best_loss"])
    return steps, picks


def picks_table(steps: dict) -> str:
    """The picks of the steps as a markdown table; a pick at either end of its candidates is marked."""
    def shown(key: str, value) -> str:
        name = key.rsplit(".", 1)[-1]
        return f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"

    return markdown_table([{"step": step, "pick": ", ".join(shown(k, v) for k, v in s["pick"].items())
                            + (" (edge of the range)" if s["at_edge"] else ""),
                            "val_loss": s["best_loss"], "candidates": s["n_candidates"],
                            "mini_batches_each": s["n_batches"], "diverged": s["n_diverged"],
                            "seconds": s["seconds"]} for step, s in steps.items()])


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    check_label_budget(cfg)
    start = recipe_start(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    train, val = search_data(start)
    with start_run(cfg, "recipe", manifest), tempfile.TemporaryDirectory() as workdir:
        steps, picks = run_recipe(start, train, val, root)
        tuned = [f"{k}={v}" for k, v in picks.items()]
        rows = [train_variant("fixed", start, list(cfg.recipe.fixed), workdir, stage="recipe")[0],
                train_variant("tuned", with_values(start, picks), [*cfg.recipe.fixed, *tuned], workdir,
                              stage="recipe")[0]]
        table = (picks_table(steps) + "\n" + markdown_table([{k: row[k] for k in TABLE_KEYS if k in row}
                                                               for row in rows]))
        with atomic_path(root / "reports/recipe.md") as tmp:
            tmp.write_text(table)
        write_json(root / "reports/metrics/recipe.json",
                   {"train_labels": cfg.classify.train_labels, "picks": picks, "steps": steps,
                    **{row["variant"]: row for row in rows}})
        mlflow.log_text(table, "recipe.md")
    print(table)
    return {"steps": steps, "picks": picks, "rows": rows}


if __name__ == "__main__":
    main()
