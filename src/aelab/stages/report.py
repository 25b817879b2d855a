"""Stage report: one static, self-contained HTML page (``reports/index.html``) of what the pipeline wrote.

The page is a list of :class:`Section` specs: a title, the DVC stage that makes the section's input files, the
files, and a render function that makes the section's HTML. A section whose files are all missing still appears,
marked "not run", with the command that makes them (``dvc repro <stage>``); a single missing file of a section that
ran is named in place. Images are embedded as base64 data URIs, curves in ``reports/plots/*.csv`` are drawn here with
matplotlib and the stages' ``reports/*.md`` are rendered by markdown-it-py (CommonMark and GitHub tables, raw HTML
escaped), so the file can be mailed or opened anywhere. The page around the sections (overview, section headers,
"not run" notes) is the Jinja2 template ``aelab/templates/report.html.j2``. Adding a stage to the report is one more
entry in ``SECTIONS``. The stage also writes ``reports/results.md`` and the README's headline block
(:mod:`aelab.results`), whose section closes the page.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import hydra
import mlflow
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markupsafe import Markup, escape
from omegaconf import DictConfig, OmegaConf

from aelab import results
from aelab.config import validate
from aelab.data.images import raw_dir
from aelab.figures import plt
from aelab.paths import atomic_path
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.stages.report_template import PAGE
from aelab.tracking import git_commit, start_run

log = logging.getLogger(__name__)

OUT = "reports/index.html"


# ---------------------------------------------------------------------------------------------------- HTML helpers

def esc(value) -> str:
    return str(escape(value))


def fmt(value) -> str:
    """Numbers to 4 significant digits, everything else as text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return esc(value)


def table(header: list[str], rows: list[list], numeric=None) -> str:
    """An HTML table; the ``numeric`` columns (indices; default: all but the first) are right-aligned."""
    numeric = range(1, len(header)) if numeric is None else numeric
    align = lambda i: ' class="num"' if i in numeric else ""  # noqa: E731
    head = "".join(f"<th{align(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{align(i)}>{fmt(v)}</td>" for i, v in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def scalars(data: dict, keys: list[str] | None = None) -> str:
    """A two-column table of the scalar entries of a metrics dict (``keys`` in that order, or all)."""
    keys = keys or [k for k, v in data.items() if not isinstance(v, dict | list)]
    return table(["metric", "value"], [[k, data[k]] for k in keys if k in data])


# The page's classes for the separator row's alignment (markdown-it writes style="text-align:..."); left is the default
ALIGN_CLASS = {"text-align:right": "num", "text-align:center": "center"}


def _page_tags(state: StateCore) -> None:
    """markdown-it core rule: a heading goes three levels down (``#`` -> h4, under the section's h2) and a table
    cell's alignment becomes the class the page's CSS styles, as in :func:`table`."""
    for token in state.tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + 3, 6)}"
        elif token.type in ("th_open", "td_open") and "style" in token.attrs:
            align = ALIGN_CLASS.get(str(token.attrs.pop("style")))
            if align:
                token.attrs["class"] = align


MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
MARKDOWN.core.ruler.push("report_page_tags", _page_tags)


def markdown_html(text: str) -> str:
    """The Markdown the stages write (CommonMark plus GitHub tables) as HTML; raw HTML in it is escaped."""
    return MARKDOWN.render(text)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(src: str, caption: str) -> str:
    return f'<figure><img src="{src}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


# ---------------------------------------------------------------------------------------------------- sections

@dataclass
class Inputs:
    """One section's input files by name (under ``root``); each reader returns a "missing" note instead of
    failing."""

    cfg: DictConfig
    stage: str
    paths: dict[str, Path]
    root: Path = Path(".")

    def exists(self, name: str) -> bool:
        return self.paths[name].is_file()

    def missing(self, name: str) -> str:
        return (f'<p class="missing">missing <code>{esc(self.paths[name])}</code>: '
                f"<code>dvc repro {esc(self.stage)}</code> makes it</p>")

    def json(self, name: str) -> dict | None:
        return json.loads(self.paths[name].read_text()) if self.exists(name) else None

    def image(self, name: str, caption: str) -> str:
        if not self.exists(name):
            return self.missing(name)
        return figure(png_uri(self.paths[name].read_bytes()), caption)

    def markdown(self, name: str) -> str:
        return markdown_html(self.paths[name].read_text()) if self.exists(name) else self.missing(name)

    def chart(self, name: str, x: str, ys: list[str] | None = None, title: str = "", ylabel: str = "") -> str:
        """A line chart of columns ``ys`` (default: all but ``x``) of a CSV against ``x``, drawn with matplotlib."""
        if not self.exists(name):
            return self.missing(name)
        with open(self.paths[name], newline="") as f:
            rows = list(csv.DictReader(f))
        ys = ys or [c for c in (rows[0] if rows else {}) if c != x]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for y in ys:
            points = [(float(r[x]), float(r[y])) for r in rows if r.get(y) not in ("", None)]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 40 else None, label=y)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(ys) > 1:
            ax.legend(fontsize=8)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return figure(png_uri(buf.getvalue()), title or f"{self.paths[name]}")


@dataclass(frozen=True)
class Section:
    """One part of the report: ``inputs`` (name -> path, ``{raw}`` = the data set's raw folder) are made by
    ``stage``; ``render`` turns them into HTML; ``headline`` (optional) is the one-line result in the overview.
    A study's stage (``studies/dvc.yaml:<name>``) is outside the pipeline: the report shows its committed outputs
    but does not depend on them (a dep would pull the study into ``dvc repro``)."""

    title: str
    stage: str
    inputs: dict[str, str]
    render: Callable[[Inputs], str]
    intro: str = ""
    headline: Callable[[Inputs], str] | None = None

    @property
    def study(self) -> bool:
        """Whether ``stage`` is a study's (studies/dvc.yaml), run apart from the pipeline."""
        return self.stage.startswith(STUDIES)

    @property
    def slug(self) -> str:
        """The section's HTML id."""
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def _data(inp: Inputs) -> str:
    m = inp.json("manifest")
    rows = [[name, f.get("bytes", ""), "×".join(map(str, f.get("shape", []))), f.get("source", ""),
             f.get("decoded_sha256", ""), f.get("sha256", "")] for name, f in m.get("files", {}).items()]
    return (f"<p>Data set <strong>{esc(m.get('dataset', inp.cfg.data.name))}</strong>, {len(rows)} files.</p>"
            + table(["file", "bytes", "shape", "source", "sha256 of the decoded payload", "sha256 of the file"],
                    rows, numeric=(1, 2)))


def _pretrain(inp: Inputs) -> str:
    m = inp.json("metrics")
    return ((scalars(m, ["epochs", "best_epoch", "best_val_loss", "test_loss", "test_mse", "n_params"]) if m
             else inp.missing("metrics"))
            + inp.image("grid", "test images and their reconstructions")
            + inp.chart("loss", "epoch", ["train_loss", "val_loss"], "training and validation loss per epoch"))


def _latent(inp: Inputs) -> str:
    return inp.image("map", "test images in 2-D, coloured by class: PCA-2 and t-SNE of the autoencoder codes, "
                            "PCA-2 of the pixels")


def _features(inp: Inputs) -> str:
    m = inp.json("metrics")
    if not m:
        return inp.missing("metrics") + inp.image("grid", "original / AE / PCA reconstructions")
    k = m.get("code_dim", "k")
    return (table(["features", "test reconstruction MSE (per pixel)"],
                  [[f"autoencoder, {k}-d code", m["ae_test_mse"]], [f"PCA, {k} components", m["pca_test_mse"]]])
            + f"<p>PCA-{k} explains {m.get('pca_explained_variance', float('nan')):.1%} of the pixel variance.</p>"
            + inp.image("grid", f"test images, AE-{k} and PCA-{k} reconstructions"))


def _downstream(inp: Inputs) -> str:
    return inp.markdown("table") + inp.image("confusion", "XGBoost on the AE codes: test confusion matrix")


def _regularization(inp: Inputs) -> str:
    return inp.markdown("table") + inp.chart("val_loss", "epoch", title="validation loss per epoch, one line per "
                                             "variant", ylabel="validation loss")


def _classify(inp: Inputs) -> str:
    return inp.markdown("table") + inp.image("curves", "validation error per epoch of every variant; the "
                                             "unregularized net's train vs validation accuracy")


STUDIES = "studies/dvc.yaml:"
STUDY_NOTE = ("A study, outside the pipeline: its committed results, from the default config; "
              "dvc repro studies/dvc.yaml reruns the studies, then dvc repro -f -s report this page.")
RECIPE_FIGURES = {step: f"reports/figures/recipe_{step}.png" for step in ("lr", "weight_decay", "momentum", "dropout")}


def _recipe(inp: Inputs) -> str:
    return inp.markdown("table") + "".join(inp.image(step, f"recipe step {step}: validation loss per candidate")
                                           for step in RECIPE_FIGURES)


def _finetune(inp: Inputs) -> str:
    return inp.markdown("table") + inp.image("figure", "test accuracy vs labelled images, one line per init "
                                             "(seed 42)")


def _searches(inp: Inputs) -> str:
    out = []
    for name, keys in (("lr", ["best_lr", "best_loss", "n_candidates", "n_batches", "optimizer"]),
                       ("momentum", ["best_momentum", "best_one_minus_momentum", "best_loss", "lr", "n_candidates"])):
        m = inp.json(f"{name}_metrics")
        out.append(scalars(m, keys) if m else inp.missing(f"{name}_metrics"))
        out.append(inp.image(f"{name}_figure", f"{name} search: validation loss per candidate"))
    return "".join(out)


def _table(inp: Inputs) -> str:
    return inp.markdown("table")


def _by_method(m: dict, metrics: dict[str, str], methods: list[str]) -> str:
    """Rows = methods, columns = ``metrics`` (key -> heading), from {metric: {method: value}}; "" where absent."""
    return table(["method", *metrics.values()],
                 [[meth, *(m.get(k, {}).get(meth, "") for k in metrics)] for meth in methods])


def _denoise(inp: Inputs) -> str:
    m = inp.json("metrics")
    methods = ["model", "noisy", "median", "gaussian"]
    return ((_by_method(m, {"psnr": "PSNR (dB)", "ssim": "SSIM"}, methods) if m else inp.missing("metrics"))
            + inp.image("grid", "clean / noisy / denoised test images")
            + inp.chart("robustness", "level", ["psnr_model", "psnr_noisy", "psnr_median", "psnr_gaussian"],
                        f"test PSNR by {inp.cfg.denoise.eval_noise} level", ylabel="PSNR (dB)"))


def _colorize(inp: Inputs) -> str:
    m = inp.json("metrics")
    if not m:
        return inp.missing("metrics") + inp.image("grid", "gray input / colorized / true colours")
    note = ("<p>The colour data set was unreachable: trained and scored on photograph patches instead.</p>"
            if m.get("fallback") else "")
    per_photo = m.get("per_photo", {})
    photos = table(["held-out photograph", "PSNR model (dB)", "PSNR gray (dB)", "PSNR gain (dB)", "SSIM gain"],
                   [[name, p["psnr"]["model"], p["psnr"]["gray"], p["psnr_gain_vs_gray"], p["ssim_gain_vs_gray"]]
                    for name, p in per_photo.items()]) if per_photo else ""
    return (_by_method(m, {"psnr": "PSNR (dB)", "ssim": "SSIM", "ab_mae": "ab MAE (Lab)",
                           "colorfulness": "colorfulness"}, ["model", "gray", "true"]) + note + photos
            + inp.image("grid", "gray input / colorized / true colours"))


def _segment(inp: Inputs) -> str:
    m = inp.json("metrics")
    if m:
        head = table(["model", "global accuracy G", "class-average accuracy C", "mIoU", "best val mIoU", "epochs"],
                     [[m.get("model", ""), m.get("test_global_acc", ""), m.get("test_class_acc", ""),
                       m.get("test_miou", ""), m.get("best_val_miou", ""), m.get("epochs", "")]])
        iou = sorted(m.get("test_iou", {}).items(), key=lambda kv: -kv[1])
        head += "<h4>Test IoU per class</h4>" + table(["class", "IoU"], [list(kv) for kv in iou])
    else:
        head = inp.missing("metrics")
    return (head + inp.image("overlays", "test images with their true and predicted classes, and the class colours")
            + inp.image("confusion", "test pixel confusion matrix (row-normalised) and per-class IoU"))


def _anomaly(inp: Inputs) -> str:
    return inp.markdown("table") + inp.image("roc", "test ROC curves per class: AE, PCA and Isolation Forest scores")


def _results(inp: Inputs) -> str:
    return markdown_html(results.document(results.load(inp.root, inp.cfg.seed), title=False))


def _config(inp: Inputs) -> str:
    yaml = OmegaConf.to_yaml(inp.cfg, resolve=True)
    return (f"<p>Git commit <code>{esc(git_commit())}</code> (<code>-dirty</code>: tracked files had changes). "
            "To reproduce: check that commit out and run <code>dvc repro</code> (<code>dvc pull</code> first if a "
            "DVC remote holds the outputs). The composed configuration every stage read (<code>params.yaml</code>, "
            "from <code>conf/</code>):</p>"
            f"<pre>{esc(yaml)}</pre>")


def metric_line(template: str, name: str = "metrics") -> Callable[[Inputs], str]:
    """A headline: ``template`` formatted with the section's metrics dict as ``m``; empty if it lacks a key."""
    def headline(inp: Inputs) -> str:
        try:
            return template.format(m=inp.json(name))
        except (KeyError, TypeError, ValueError, IndexError):
            return ""
    return headline


SECTIONS: list[Section] = [
    Section("Data", "download", {"manifest": "{raw}/manifest.json"}, _data,
            "Where each file came from and its checksums; the download stage verified the decoded payload."),
    Section("Autoencoder pretraining", "pretrain",
            {"metrics": "reports/metrics/pretrain.json", "grid": "reports/figures/pretrain_recon.png",
             "loss": "reports/plots/pretrain_loss.csv"}, _pretrain,
            "The configured autoencoder trained on the training split; the best validation epoch is kept.",
            metric_line("test MSE {m[test_mse]:.4g} after {m[epochs]} epochs")),
    Section("Latent space", "features", {"map": "reports/figures/latent_map.png"}, _latent,
            "How the classes lie in the autoencoder's code space compared with the pixels' principal components."),
    Section("Autoencoder vs PCA", "features",
            {"metrics": "reports/metrics/features.json", "grid": "reports/figures/features_recon.png"}, _features,
            "Reconstruction error of the autoencoder and of PCA with as many components, on the test set.",
            metric_line("test MSE: AE {m[ae_test_mse]:.4g} vs PCA {m[pca_test_mse]:.4g}")),
    Section("XGBoost on pixels, PCA and AE codes", "downstream",
            {"table": "reports/downstream.md", "metrics": "reports/metrics/downstream.json",
             "confusion": "reports/figures/confusion_ae.png"}, _downstream,
            "The same gradient-boosted classifier trained on raw pixels, on PCA components and on the AE codes.",
            metric_line("test accuracy: raw {m[raw][accuracy]:.4f}, PCA {m[pca][accuracy]:.4f}, "
                        "AE {m[ae][accuracy]:.4f}")),
    Section("Classifier: overfitting and the regularizers against it", "classify",
            {"table": "reports/classify.md", "metrics": "reports/metrics/classify.json",
             "curves": "reports/figures/classify_curves.png"}, _classify,
            "The lecture's MLP classifier on a small label budget, one regularizer per row (errors on the test set; "
            "gap = train - test accuracy).",
            metric_line("{m[train_labels]} labels; unregularized test error {m[none][test_error]:.4f}, gap "
                        "{m[none][gap_train_minus_test]:.4f}")),
    Section("Regularizing the autoencoder (study)", f"{STUDIES}regularization",
            {"table": "reports/regularization.md", "val_loss": "reports/plots/regularization_val_loss.csv"},
            _regularization, "The lecture's regularizers on the autoencoder, side by side on one small training "
            "set (it hardly overfits: the classifier above is where they have overfitting to fight). " + STUDY_NOTE),
    Section("The tuning recipe on the classifier (study)", f"{STUDIES}recipe",
            {"table": "reports/recipe.md", "metrics": "reports/metrics/recipe.json",
             **RECIPE_FIGURES},
            _recipe, "The lecture's recipe, each step from the picks before it: learning rate, weight decay, "
            "momentum, dropout; then the classifier trained with the picks against the fixed recipe. " + STUDY_NOTE,
            metric_line("test error: tuned {m[tuned][test_error]:.4f} vs fixed {m[fixed][test_error]:.4f}")),
    Section("Which autoencoder's codes (study)", f"{STUDIES}codes",
            {"table": "reports/codes.md"}, _table,
            "Several autoencoders scored on their 32-d test codes by XGBoost and a linear probe, beside PCA-32 and "
            "raw pixels. " + STUDY_NOTE),
    Section("Pretraining as initialization (study)", f"{STUDIES}finetune",
            {"table": "reports/finetune.md", "figure": "reports/figures/finetune_accuracy.png"}, _finetune,
            "The classifier from default or He init against the pretrained encoder, fine-tuned or frozen, "
            "test accuracy by label budget. " + STUDY_NOTE),
    Section("Learning-rate and momentum search", "momentum_search",
            {"lr_metrics": "reports/metrics/lr_search.json", "lr_figure": "reports/figures/lr_search.png",
             "momentum_metrics": "reports/metrics/momentum_search.json",
             "momentum_figure": "reports/figures/momentum_search.png"}, _searches,
            "The lecture's recipe: many learning rates, a few mini-batches each; then 1 - momentum at the best rate.",
            metric_line("momentum {m[best_momentum]:.4g} at lr {m[lr]:.3g}", "momentum_metrics")),
    Section("Tabular data: sparse over-complete codes", "tabular",
            {"table": "reports/tabular.md", "metrics": "reports/metrics/tabular.json"}, _table,
            "A sparse over-complete autoencoder on a table, its codes fed to XGBoost, stratified cross-validation.",
            metric_line("ROC-AUC: raw {m[raw][roc_auc_mean]:.4f}, codes {m[codes][roc_auc_mean]:.4f}")),
    Section("Denoising", "denoise",
            {"metrics": "reports/metrics/denoise.json", "grid": "reports/figures/denoise_grid.png",
             "robustness": "reports/plots/denoise_robustness.csv"}, _denoise,
            "A convolutional denoising autoencoder against the noisy input and median/Gaussian filters (test set).",
            metric_line("test PSNR {m[psnr][model]:.2f} dB (noisy input {m[psnr][noisy]:.2f} dB)")),
    Section("Colorization", "colorize",
            {"metrics": "reports/metrics/colorize.json", "grid": "reports/figures/colorize_grid.png"}, _colorize,
            "A U-Net predicts colour (Lab ab) from luminance; compared with the gray image.",
            metric_line("test PSNR {m[psnr][model]:.2f} dB (gray {m[psnr][gray]:.2f} dB)")),
    Section("Segmentation", "segment",
            {"metrics": "reports/metrics/segment.json", "overlays": "reports/figures/segment_overlays.png",
             "confusion": "reports/figures/segment_confusion.png"}, _segment,
            "A SegNet-style encoder-decoder labels every pixel; SegNet's G / C / mIoU on the test set.",
            metric_line("test G {m[test_global_acc]:.3f}, C {m[test_class_acc]:.3f}, mIoU {m[test_miou]:.3f}")),
    Section("Anomaly detection", "anomaly",
            {"metrics": "reports/metrics/anomaly.json", "table": "reports/anomaly.md",
             "roc": "reports/figures/anomaly_roc.png"}, _anomaly,
            "Reconstruction error as an anomaly score, against PCA reconstruction error and an Isolation Forest.",
            metric_line("mean ROC-AUC: AE {m[mean][ae][roc_auc]:.3f}, PCA {m[mean][pca][roc_auc]:.3f}, "
                        "Isolation Forest {m[mean][iforest][roc_auc]:.3f}")),
    Section("All results with their seed spread", "", {}, _results,
            "Every stage's and study's numbers, mean ± std over seeds, with the comparisons the spread supports "
            "(also reports/results.md). python -m aelab.spread measures the spread."),
    Section("Configuration", "", {}, _config, "What produced these results."),
]


def input_paths(cfg: DictConfig, studies: bool = False) -> list[Path]:
    """Every file the report reads from the pipeline (the report stage's deps in dvc.yaml); with ``studies``, the
    studies' committed outputs too."""
    return [Path(p.format(raw=raw_dir(cfg.data))) for s in SECTIONS if studies or not s.study
            for p in s.inputs.values()]


@dataclass(frozen=True)
class Rendered:
    """One section as the page template shows it: ``status`` is ``ran``, ``incomplete``, ``not run`` (the template
    lists ``paths``, the inputs) or ``error`` (``error`` says why); ``body`` is the render function's HTML."""

    section: Section
    status: str
    paths: list[Path]
    headline: str = ""
    body: Markup = Markup()
    error: str = ""


def render_section(section: Section, cfg: DictConfig, root: Path) -> Rendered:
    """One section's status, headline and body, from its input files under ``root``."""
    inp = Inputs(cfg, section.stage, {k: root / p.format(raw=raw_dir(cfg.data)) for k, p in section.inputs.items()},
                 root)
    paths = list(inp.paths.values())
    found = [name for name in section.inputs if inp.exists(name)]
    if section.inputs and not found:
        return Rendered(section, "not run", paths)
    status = "ran" if len(found) == len(section.inputs) else "incomplete"
    headline = section.headline(inp) if section.headline else ""
    try:
        return Rendered(section, status, paths, headline, Markup(section.render(inp)))
    except Exception as err:  # noqa: BLE001 - one unreadable file must not cost the whole report
        log.exception("section %r failed to render", section.title)
        return Rendered(section, "error", paths, headline, error=repr(err))


def build(cfg: DictConfig, root: Path = Path(".")) -> tuple[str, dict[str, str]]:
    """The report page (the template around every section) and each section's status."""
    sections = [render_section(section, cfg, root) for section in SECTIONS]
    page = PAGE.render(data=cfg.data.name, model=cfg.model.name, commit=git_commit(),
                       generated=datetime.now(timezone.utc), ran=sum(s.status != "not run" for s in sections),
                       sections=sections)
    return page, {s.section.title: s.status for s in sections}


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict[str, str]:
    validate(cfg)
    out = output_root() / OUT
    page, statuses = build(cfg)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    results.write(results.load(seed=cfg.seed), output_root(), results.README)
    manifest = raw_dir(cfg.data) / "manifest.json"
    with start_run(cfg, "report", manifest if manifest.is_file() else None):
        mlflow.log_artifact(str(out))
        mlflow.log_metrics({"report_sections_run": sum(s != "not run" for s in statuses.values()),
                            "report_sections_not_run": sum(s == "not run" for s in statuses.values())})
    for title, status in statuses.items():
        log.info("%-45s %s", title, status)
    print(f"wrote {out}")
    return statuses


if __name__ == "__main__":
    main()
