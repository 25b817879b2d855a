"""The results document, ``reports/results.md``, written from the numbers and never typed.

Every table reads ``reports/metrics/*.json`` (this run) and ``reports/spread.json`` (``python -m aelab.spread``).
Where a stage's numbers are the spread's run for this seed, a cell is the mean ± sample standard deviation over the
spread's seeds; where they are not (another machine, changed code, no spread yet), it is this run's value ± the
spread's std, and the document says so at its top and in the stage's section. A comparison sentence is decided
here: a difference counts when it is beyond ``SIGMAS`` times the larger of the two seed stds (the tolerance
``check_metrics`` allows), or the stage's rounding floor where one was measured (``check_metrics.ROUNDING``).
The commit, machine and date of the runs come from the metrics' provenance (``aelab.stages.stamp_metrics``).

``python -m aelab.results`` writes the document and the README's headline block from the committed files; the
report stage does the same as part of ``dvc repro``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from aelab.check_metrics import flat_metrics, read_folder, rounding_floor
from aelab.paths import atomic_path

SIGMAS = 3.0
OUT = Path("reports/results.md")
README = Path("README.md")
BEGIN, END = "<!-- results:headline (written by the report stage from reports/; do not edit) -->", \
    "<!-- /results:headline -->"


@dataclass(frozen=True)
class Num:
    """One number: ``value``, its seed ``std`` (None: no spread measured) and whether it is the seeds' mean."""

    value: float
    std: float | None
    mean: bool

    def text(self, digits: int) -> str:
        """``value ± std`` with ``digits`` decimals (``±`` left out without a spread)."""
        shown = f"{self.value:.{digits}f}".replace("-", "−")
        return shown if self.std is None else f"{shown} ± {self.std:.{digits}f}"


class Numbers:
    """This run's metrics and the seed spread, by flat key (``downstream.ae.accuracy``)."""

    def __init__(self, metrics: dict[str, dict], spread: dict, seed: int):
        self.files = metrics
        self.current = flat_metrics(metrics)
        self.spread = spread.get("metrics", {})
        self.seeds = spread.get("seeds", [])
        self.overrides = spread.get("overrides", [])
        self.machines = spread.get("machines", {})
        self.seed = seed
        apart = {k.split(".", 1)[0] for k, s in self.spread.items()
                 if not math.isclose(self.current.get(k, math.nan), s["values"].get(str(seed), math.nan),
                                     rel_tol=1e-9, abs_tol=1e-12)}
        self.covered_stages = {k.split(".", 1)[0] for k in self.spread} - apart

    def covered(self, stage: str) -> bool:
        """Whether the spread holds this run of ``stage``: each of its numbers with a spread equals the spread's
        value for this seed."""
        return stage in self.covered_stages

    def __contains__(self, key: str) -> bool:
        return key in self.current

    def __getitem__(self, key: str) -> Num:
        s = self.spread.get(key)
        if s and self.covered(key.split(".", 1)[0]):
            return Num(s["mean"], s["std"], True)
        return Num(self.current[key], s["std"] if s else None, False)

    def cell(self, key: str, digits: int) -> str:
        return self[key].text(digits) if key in self else "—"

    def versus(self, a: str, b: str, digits: int, lower_is_better: bool = False) -> str:
        """``a`` against ``b``: the signed difference, how many seed stds it is, and whether it counts."""
        if a not in self or b not in self:
            return "not measured"
        x, y = self[a], self[b]
        diff = x.value - y.value
        noise = max(x.std or 0.0, y.std or 0.0)
        floor = max(rounding_floor(a), rounding_floor(b))
        allowed = max(SIGMAS * noise, floor)
        shown = f"{diff:+.{digits}f}".replace("-", "−")
        if x.std is None and y.std is None:
            return f"{shown} (no seed spread measured: not a claim)"
        scale = f"{abs(diff) / noise:.1f}× the larger seed std" if noise > 0 else "no spread across seeds"
        if floor > SIGMAS * noise:
            scale += f"; rounding floor {floor:g}"
        if abs(diff) <= allowed:
            return f"{shown} ({scale}): **within the noise**"
        better = (diff < 0) if lower_is_better else (diff > 0)
        return f"{shown} ({scale}): **{'better' if better else 'worse'}**"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, first column left-aligned, the others right-aligned."""
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def grid(n: Numbers, stage: str, rows: dict[str, str], columns: dict[str, tuple[str, int]],
         first: str = "") -> list[str]:
    """Rows (key prefix -> label) by columns (key suffix -> (heading, decimals)) of ``stage``'s numbers."""
    return table([first, *(h for h, _ in columns.values())],
                 [[label, *(n.cell(f"{stage}.{row}.{col}", d) for col, (_, d) in columns.items())]
                  for row, label in rows.items()])


def bullets(lines: list[str]) -> list[str]:
    return [f"- {line}" for line in lines] + [""]


def provenance_lines(n: Numbers, stages: list[str]) -> list[str]:
    """Where the metrics were made (grouped by machine, commit, date) and where their spread was."""
    groups: dict[tuple, list[str]] = {}
    for stage in stages:
        p = n.files[stage].get("provenance", {})
        groups.setdefault((p.get("machine"), p.get("commit"), p.get("date")), []).append(stage)
    lines = []
    for (machine, commit, date), names in groups.items():
        where = (f"on {machine} at commit `{commit}` on {date}" if machine
                 else "before the stages recorded their machine (no provenance in the file)")
        lines.append(f"Metrics of {', '.join(names)}: made {where}.")
    seeds = ", ".join(map(str, n.seeds)) or "none"
    lines.append(f"Seed spread (`reports/spread.json`): seeds {seeds}"
                 + (f" with `{' '.join(n.overrides)}`" if n.overrides else "") + ".")
    by_machine: dict[str, list[str]] = {}
    for stage in stages:
        by_machine.setdefault(n.machines.get(stage, ""), []).append(stage)
    for machine, names in by_machine.items():
        lines.append(f"Spread of {', '.join(names)}: "
                     + (f"measured on {machine}." if machine else "its machine is not recorded (measured before "
                                                                  "`aelab.spread` recorded it)."))
    return lines


def honesty_lines(n: Numbers, stages: list[str]) -> list[str]:
    """Which stages' numbers are not the spread's, and which come from another machine than their spread."""
    lines = []
    apart = [s for s in stages if not n.covered(s)]
    if apart:
        lines.append(f"**Not the spread's run**: {', '.join(apart)}. Their cells are this run's values ± the "
                     "spread's std, not means (`python -m aelab.check_metrics` says how far they moved).")
    elsewhere = [s for s in stages if "provenance" in n.files[s] and s in n.machines
                 and n.files[s]["provenance"]["machine"] not in n.machines[s].split(" / ")]
    if elsewhere:
        lines.append(f"**Another machine than the spread**: {', '.join(elsewhere)} were made on a machine the "
                     "spread did not run on; their seed stds measure seeds, not machines, so a difference between "
                     "machines may exceed them.")
    return lines or [f"Every stage's numbers are the spread's run for seed {n.seed}."]


# ---------------------------------------------------------------------------------------------------- sections

FEATURES = {"raw": "raw pixels (784)", "pca": "PCA-32", "ae": "autoencoder codes (32)"}


def features(n: Numbers) -> list[str]:
    mse = table(["features", "test reconstruction MSE"],
                [["PCA-32", n.cell("features.pca_test_mse", 5)],
                 ["autoencoder (32)", n.cell("features.ae_test_mse", 5)]])
    acc = grid(n, "downstream", FEATURES, {"accuracy": ("XGBoost test accuracy", 4), "macro_f1": ("macro-F1", 4)},
               "features")
    return [*mse, *acc, *bullets([
        f"AE reconstruction MSE against PCA's: {n.versus('features.ae_test_mse', 'features.pca_test_mse', 5, True)}",
        "AE codes against PCA-32, XGBoost accuracy: "
        f"{n.versus('downstream.ae.accuracy', 'downstream.pca.accuracy', 4)}",
        f"AE codes against raw pixels: {n.versus('downstream.ae.accuracy', 'downstream.raw.accuracy', 4)}"])]


CODES = {"raw": "raw pixels (784)", "pca_32": "PCA-32", "deep": "deep",
         "deep_bn_post": "deep + BN after the activation",
         "deep_bn_pre": "deep + BN before the activation", "deep_denoising": "deep, denoising",
         "conv_bn_post": "conv + BN"}


def codes(n: Numbers) -> list[str]:
    rows = grid(n, "codes", CODES, {"test_mse": ("test MSE", 5), "xgb_accuracy": ("XGBoost accuracy", 4),
                                    "probe_accuracy": ("linear-probe accuracy", 4)}, "features")
    return [*rows, *bullets(
        [f"{CODES[m]} against PCA-32, XGBoost accuracy: "
         f"{n.versus(f'codes.{m}.xgb_accuracy', 'codes.pca_32.xgb_accuracy', 4)}"
         for m in ("deep", "deep_bn_post", "deep_bn_pre", "deep_denoising", "conv_bn_post")])]


INITS = {"default": "default init", "he": "He init", "pretrained": "pretrained, fine-tuned",
         "frozen": "pretrained, frozen"}


def finetune(n: Numbers) -> list[str]:
    budgets = sorted(n.files.get("finetune", {}).keys() - {"provenance"}, key=int)
    rows = [[f"{int(b):,}", *(n.cell(f"finetune.{b}.{i}.test_accuracy", 3) for i in INITS)] for b in budgets]
    lines = [f"{int(b):,} labels, pretrained against {INITS[i]}: "
             f"{n.versus(f'finetune.{b}.pretrained.test_accuracy', f'finetune.{b}.{i}.test_accuracy', 3)}"
             for b in budgets for i in ("default", "he")]
    return ["Test accuracy by labelled images.", "",
            *table(["labelled images", *INITS.values()], rows), *bullets(lines)]


REGULARIZERS = {"baseline": "baseline", "dropout_10_50": "dropout 10% in / 50% hidden", "bn_pre": "BN before the "
                "activation", "bn_post": "BN after the activation", "l2_1e-4": "L2 (weight decay 1e-4)",
                "l1_1e-6": "L1 on weights 1e-6", "he_init": "He init", "sparse_l1_1e-4": "sparse: L1 on the code 1e-4",
                "sparse_kl": "sparse: KL to ρ = 0.05"}


def regularization(n: Numbers) -> list[str]:
    rows = grid(n, "regularization", REGULARIZERS, {
        "best_val_loss": ("best val loss", 4), "gap_val_minus_train": ("gap (val − train)", 4),
        "test_mse": ("test MSE", 4), "mean_activation": ("mean code activation", 2),
        "frac_near_zero": ("fraction of codes < 0.01", 2), "xgb_accuracy_on_codes": ("XGBoost acc. on codes", 3)},
        "variant")
    return [*rows, *bullets(
        [f"{label}, best validation loss against the baseline: "
         f"{n.versus(f'regularization.{v}.best_val_loss', 'regularization.baseline.best_val_loss', 4, True)}"
         for v, label in REGULARIZERS.items() if v != "baseline"])]


VARIANTS = {"none": "none (He init, no regularizer)", "dropout_10_50": "dropout 10% in / 50% hidden (lecture)",
            "dropout_20_50": "dropout 20% / 50% (dropout paper)", "l2_1e-4": "L2, weight decay 1e-4",
            "l1_1e-5": "L1 on weights 1e-5", "bn_pre": "BN after the summation", "bn_post": "BN after the activation",
            "init_default": "PyTorch's default init", "init_xavier": "Xavier init", "max_norm_1": "max-norm 1",
            "early_stopping": "early stopping"}
CLASSIFIER_COLUMNS = {"test_error": ("test error", 4), "best_val_error": ("best val error", 4),
                      "gap_train_minus_test": ("gap (train − test)", 4),
                      "test_cross_entropy": ("test cross-entropy", 3)}


def classify(n: Numbers) -> list[str]:
    labels = n.files.get("classify", {}).get("train_labels", "?")
    rows = grid(n, "classify", VARIANTS, {**CLASSIFIER_COLUMNS, "epochs": ("epochs", 0)}, "variant")
    return [f"MLP 784-1024-1024-10 on {labels} labelled images.", "", *rows, *bullets(
                [f"{label}, test error against none: "
                 f"{n.versus(f'classify.{v}.test_error', 'classify.none.test_error', 4, True)}"
                 for v, label in VARIANTS.items() if v != "none"])]


def recipe(n: Numbers) -> list[str]:
    rows = grid(n, "recipe", {"fixed": "fixed recipe", "tuned": "tuned (the picks)"}, CLASSIFIER_COLUMNS, "model")
    return [*rows, *bullets([
        f"tuned against fixed, test error: {n.versus('recipe.tuned.test_error', 'recipe.fixed.test_error', 4, True)}",
        f"tuned against the plain `classify` net, test error: "
        f"{n.versus('recipe.tuned.test_error', 'classify.none.test_error', 4, True)}"])]


def searches(n: Numbers) -> list[str]:
    return table(
        ["search", "pick", "validation loss at the pick"],
        [["learning rate", n.cell("lr_search.best_lr", 5), n.cell("lr_search.best_loss", 4)],
         ["1 − momentum", n.cell("momentum_search.best_one_minus_momentum", 4),
          n.cell("momentum_search.best_loss", 4)]])


def tabular(n: Numbers) -> list[str]:
    rows = grid(n, "tabular", {"raw": "raw", "codes": "sparse over-complete AE codes", "raw_codes": "raw + codes"},
                {"n_features": ("features", 0), "roc_auc_mean": ("ROC-AUC, mean of the folds", 4),
                 "roc_auc_std": ("its std over the folds", 4)}, "input")
    return [*rows, *bullets([
        f"codes against raw, ROC-AUC: {n.versus('tabular.codes.roc_auc_mean', 'tabular.raw.roc_auc_mean', 4)}",
        f"raw + codes against raw: {n.versus('tabular.raw_codes.roc_auc_mean', 'tabular.raw.roc_auc_mean', 4)}"])]


METHODS = {"model": "denoising AE", "noisy": "noisy input", "median": "median filter", "gaussian": "Gaussian filter"}


def denoise(n: Numbers) -> list[str]:
    head = table(["", *METHODS.values()], [[label, *(n.cell(f"denoise.{score}.{m}", d) for m in METHODS)]
                                           for score, label, d in (("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 3))])
    levels = sorted(n.files["denoise"].get("robustness", {}), key=lambda s: float(s.rsplit("_", 1)[-1]))
    sweep = table(["level", *(f"PSNR {v}" for v in METHODS.values()), "SSIM model"],
                  [[level.replace("_", " "), *(n.cell(f"denoise.robustness.{level}.psnr.{m}", 2) for m in METHODS),
                    n.cell(f"denoise.robustness.{level}.ssim.model", 3)] for level in levels])
    images = n.files.get("denoise", {}).get("images", "all")
    best = max(("median", "gaussian"), key=lambda m: n[f"denoise.psnr.{m}"].value if f"denoise.psnr.{m}" in n else 0)
    return [f"Test set ({images:,} images):" if isinstance(images, int) else "Test set:", "", *head,
            "Robustness: the test images at other noise levels than the one trained on:", "", *sweep, *bullets([
                f"model against the {METHODS[best]}, PSNR: {n.versus('denoise.psnr.model', f'denoise.psnr.{best}', 2)}",
                f"model against the noisy input: {n.versus('denoise.psnr.model', 'denoise.psnr.noisy', 2)}"])]


def colorize(n: Numbers) -> list[str]:
    head = table(["", "PSNR (RGB)", "SSIM", "ab mean abs. error", "colorfulness"],
                 [[label, *(n.cell(f"colorize.{k}.{m}", d) for k, d in (("psnr", 2), ("ssim", 3), ("ab_mae", 1),
                                                                          ("colorfulness", 1)))]
                  for m, label in (("gray", "grayscale"), ("model", "model"))])
    photos = sorted(n.files.get("colorize", {}).get("per_photo", {}))
    per = table(["test photograph", "PSNR model", "PSNR gray", "PSNR gain", "SSIM gain"],
                [[p, n.cell(f"colorize.per_photo.{p}.psnr.model", 2), n.cell(f"colorize.per_photo.{p}.psnr.gray", 2),
                  n.cell(f"colorize.per_photo.{p}.psnr_gain_vs_gray", 2),
                  n.cell(f"colorize.per_photo.{p}.ssim_gain_vs_gray", 3)] for p in photos]) if photos else []
    lines = [f"model against gray, PSNR: {n.versus('colorize.psnr.model', 'colorize.psnr.gray', 2)}",
             f"model against gray, SSIM: {n.versus('colorize.ssim.model', 'colorize.ssim.gray', 3)}",
             *(f"{p}, PSNR against gray: "
               f"{n.versus(f'colorize.per_photo.{p}.psnr.model', f'colorize.per_photo.{p}.psnr.gray', 2)}"
               for p in photos)]
    source = ("the offline fallback (photograph patches)" if n.files.get("colorize", {}).get("fallback")
              else "CIFAR-10")
    return [f"Trained and tested on {source}.", "", *head,
            *per, *bullets(lines)]


def segment(n: Numbers) -> list[str]:
    head = table(["", "global accuracy G", "class-average accuracy C", "mIoU"],
                 [["SegNet (test)", n.cell("segment.test_global_acc", 3), n.cell("segment.test_class_acc", 3),
                   n.cell("segment.test_miou", 3)]])
    classes = sorted(n.files.get("segment", {}).get("test_iou", {}))
    iou = table(["class", "test IoU"], [[c, n.cell(f"segment.test_iou.{c}", 3)] for c in classes])
    return [*head, *iou]


DETECTORS = {"ae": "AE", "pca": "PCA", "iforest": "Isolation Forest"}


def anomaly(n: Numbers) -> list[str]:
    classes = sorted(n.files.get("anomaly", {}).get("per_class", {}))
    rows = [[c, *(n.cell(f"anomaly.per_class.{c}.{d}.roc_auc", 3) for d in DETECTORS)] for c in classes]
    rows.append(["**mean**", *(n.cell(f"anomaly.mean.{d}.roc_auc", 3) for d in DETECTORS)])
    return ["ROC-AUC, each class held out of training as the anomaly:", "",
            *table(["anomaly class", *(f"{v} ROC-AUC" for v in DETECTORS.values())], rows), *bullets([
                f"AE against PCA, mean ROC-AUC: {n.versus('anomaly.mean.ae.roc_auc', 'anomaly.mean.pca.roc_auc', 3)}",
                f"AE against Isolation Forest: "
                f"{n.versus('anomaly.mean.ae.roc_auc', 'anomaly.mean.iforest.roc_auc', 3)}"])]


# Sections in reading order: title, the stages (metrics files) it reads, the function that writes its body.
SECTIONS = [("Autoencoder codes vs PCA vs raw pixels (`features`, `downstream`)", ("features", "downstream"), features),
            ("Which autoencoder's codes (the `codes` study)", ("codes",), codes),
            ("Pretraining as initialization (the `finetune` study)", ("finetune",), finetune),
            ("The lecture's regularizers on the autoencoder (the `regularization` study)", ("regularization",),
             regularization),
            ("The lecture's classifier: overfitting and its regularizers (`classify`)", ("classify",), classify),
            ("The tuning recipe on the classifier (the `recipe` study)", ("recipe", "classify"), recipe),
            ("Learning-rate and momentum search (`lr_search`, `momentum_search`)", ("lr_search", "momentum_search"),
             searches),
            ("Tabular data: sparse over-complete codes for XGBoost (`tabular`)", ("tabular",), tabular),
            ("Denoising (`denoise`)", ("denoise",), denoise),
            ("Colorization (`make_color_set`, `colorize`)", ("colorize",), colorize),
            ("Segmentation (`make_segmentation_set`, `segment`)", ("segment",), segment),
            ("Anomaly detection (`anomaly`)", ("anomaly",), anomaly)]


def section(n: Numbers, needs: tuple[str, ...], render) -> list[str]:
    """One section's body; a note instead when its metrics are missing or not in the shape its stage writes."""
    missing = [s for s in needs if s not in n.files]
    if missing:
        return ["No numbers yet: " + ", ".join(f"`reports/metrics/{s}.json`" for s in missing) + " missing.", ""]
    try:
        return render(n)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return [f"Could not read the metrics of {', '.join(needs)}: {err!r}.", ""]


def document(n: Numbers, title: bool = True) -> str:
    """The whole results document (without its ``# Results`` title: for the report page's section)."""
    stages = sorted(n.files)
    lines = ["# Results", ""] if title else []
    lines += ["Written by the report stage from `reports/metrics/*.json` and `reports/spread.json` "
             "(`python -m aelab.results` rewrites it); do not edit. What each study is and what it answers: "
             "[docs/results.md](../docs/results.md).", "",
             f"Cells are mean ± sample std over the spread's seeds; a comparison counts only beyond {SIGMAS:g}× "
             "the larger of its two stds (or the stage's measured rounding floor).", "",
             *bullets(provenance_lines(n, stages)), *bullets(honesty_lines(n, stages))]
    for heading, needs, render in SECTIONS:
        lines += [f"## {heading}", "", *section(n, needs, render)]
    return "\n".join(lines).rstrip() + "\n"


def headline(n: Numbers) -> str:
    """The README's short table of the pipeline's main numbers (between ``BEGIN`` and ``END``)."""
    rows = [["AE codes → XGBoost (test accuracy)", n.cell("downstream.ae.accuracy", 4),
             f"PCA-32 {n.cell('downstream.pca.accuracy', 4)}, raw pixels {n.cell('downstream.raw.accuracy', 4)}"],
            ["denoising AE (test PSNR, dB)", n.cell("denoise.psnr.model", 2),
             f"noisy input {n.cell('denoise.psnr.noisy', 2)}"],
            ["colorization (test PSNR, dB)", n.cell("colorize.psnr.model", 2),
             f"gray {n.cell('colorize.psnr.gray', 2)}"],
            ["SegNet segmentation (test mIoU)", n.cell("segment.test_miou", 3),
             f"G {n.cell('segment.test_global_acc', 3)}"],
            ["AE anomaly detection (mean ROC-AUC)", n.cell("anomaly.mean.ae.roc_auc", 3),
             f"PCA {n.cell('anomaly.mean.pca.roc_auc', 3)}"]]
    return "\n".join(table(["result", "pipeline", "against"], rows)).rstrip() + "\n"


def with_headline(readme: str, block: str) -> str:
    """``readme`` with the text between its headline markers replaced by ``block`` (unchanged without markers)."""
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{BEGIN}\n{block}{END}", readme)


def load(root: Path = Path("."), seed: int = 42) -> Numbers:
    """The numbers under ``root``: its metrics files and spread file (empty when there is none)."""
    spread = root / "reports/spread.json"
    return Numbers(read_folder(root / "reports/metrics"), json.loads(spread.read_text()) if spread.exists() else {},
                   seed)


def write(n: Numbers, out_root: Path, readme: Path | None = None) -> None:
    """``reports/results.md`` under ``out_root``; with ``readme``, its headline block rewritten there too."""
    with atomic_path(out_root / OUT) as tmp:
        tmp.write_text(document(n), encoding="utf-8")
    if readme is not None and readme.is_file():
        text = readme.read_text(encoding="utf-8")
        updated = with_headline(text, headline(n))
        if updated != text:
            with atomic_path(out_root / readme.name) as tmp:
                tmp.write_text(updated, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42, help="the seed of the run in reports/metrics")
    args = parser.parse_args(argv)
    write(load(seed=args.seed), Path("."), README)
    print(f"wrote {OUT} and the headline block of {README}")


if __name__ == "__main__":
    main()
