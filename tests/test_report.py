"""The report stage: built from fixture outputs of every stage (every section filled), with some stages missing
("not run" plus the command), its dvc.yaml deps, and the page rendered in headless Chromium (no broken images, no
empty sections)."""

from __future__ import annotations

import dataclasses
import json
from html import unescape
from pathlib import Path

import mlflow
import pytest
import yaml
from markupsafe import escape
from PIL import Image

from aelab import results
from aelab.stages import report
from conftest import compose_cfg
from test_mlflow_ui import artifact_path, browser  # noqa: F401  (the shared headless Chromium fixture)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["T-shirt/top", "Trouser"]
AUC = {"roc_auc": 0.9, "pr_auc": 0.6}

# one file per input of every section, in the shape the stages write; "*.png" entries are generated images
FIXTURES = {
    "data/raw/fashion_mnist/manifest.json": {"dataset": "fashion_mnist", "files": {
        "t10k-labels-idx1-ubyte.gz": {"source": "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz",
                                      "bytes": 5125, "shape": [10000], "sha256": "8d36" * 16,
                                      "decoded_sha256": "0402" * 16}}},
    "reports/metrics/pretrain.json": {"epochs": 2, "best_epoch": 1, "best_val_loss": 0.3, "test_loss": 0.31,
                                      "test_mse": 0.0123, "n_params": 1000},
    "reports/figures/pretrain_recon.png": None,
    "reports/plots/pretrain_loss.csv": "epoch,epoch_seconds,train_loss,val_loss\n0,1.0,0.4,0.38\n1,1.0,0.3,0.31\n",
    "reports/figures/latent_map.png": None,
    "reports/metrics/features.json": {"code_dim": 32, "ae_test_mse": 0.012, "pca_test_mse": 0.015,
                                      "pca_explained_variance": 0.83, "ae_minus_pca_mse": -0.003},
    "reports/figures/features_recon.png": None,
    "reports/downstream.md": "| features | n features | test accuracy |\n|---|---:|---:|\n| raw | 784 | 0.9016 |\n",
    "reports/metrics/downstream.json": {k: {"accuracy": 0.9, "macro_f1": 0.9, "fit_seconds": 1.0, "n_features": 32}
                                        for k in ("raw", "pca", "ae")},
    "reports/figures/confusion_ae.png": None,
    "reports/regularization.md": "| variant | best val loss |\n|---|---:|\n| baseline | 0.28 |\n| bn_pre | 0.27 |\n",
    "reports/plots/regularization_val_loss.csv": "epoch,baseline,bn_pre\n1,0.3,0.29\n2,0.28,\n",
    "reports/classify.md": "| variant | test_error |\n|---|---|\n| none | 0.19 |\n| bn_pre | 0.18 |\n",
    "reports/metrics/classify.json": {"train_labels": 1000, "baseline_best_val_error": 0.17,
                                      "none": {"test_error": 0.19, "gap_train_minus_test": 0.19}},
    "reports/figures/classify_curves.png": None,
    "reports/recipe.md": "| step | pick |\n|---|---|\n| lr | lr=0.001 |\n",
    "reports/metrics/recipe.json": {"fixed": {"test_error": 0.19}, "tuned": {"test_error": 0.18}},
    **{f"reports/figures/recipe_{step}.png": None for step in ("lr", "weight_decay", "momentum", "dropout")},
    "reports/codes.md": "| features | xgb_accuracy |\n|---|---|\n| deep_bn_pre | 0.8736 |\n| pca_32 | 0.8691 |\n",
    "reports/finetune.md": "| labels | default | pretrained |\n|---|---|---|\n| 100 | 0.68 | 0.66 |\n",
    "reports/figures/finetune_accuracy.png": None,
    "reports/metrics/lr_search.json": {"best_lr": 0.003, "best_loss": 0.28, "n_candidates": 100, "n_batches": 30,
                                       "optimizer": "adam"},
    "reports/figures/lr_search.png": None,
    "reports/metrics/momentum_search.json": {"best_momentum": 0.95, "best_one_minus_momentum": 0.05,
                                             "best_loss": 0.27, "lr": 0.003, "n_candidates": 100},
    "reports/figures/momentum_search.png": None,
    "reports/tabular.md": "Sparse codes, `breast_cancer`.\n\n| features | ROC-AUC |\n|---|---:|\n| raw | 0.99 |\n",
    "reports/metrics/tabular.json": {"raw": {"roc_auc_mean": 0.9926}, "codes": {"roc_auc_mean": 0.9946}},
    "reports/metrics/denoise.json": {"psnr": {"model": 21.0, "noisy": 10.7, "median": 9.7, "gaussian": 12.4},
                                     "ssim": {"model": 0.84, "noisy": 0.5, "median": 0.31, "gaussian": 0.53}},
    "reports/figures/denoise_grid.png": None,
    "reports/plots/denoise_robustness.csv": "level,psnr_model,psnr_noisy,psnr_median,psnr_gaussian\n"
                                            "0.1,18.2,17.8,18.5,18.9\n0.3,21.8,13.0,13.6,15.1\n",
    "reports/metrics/colorize.json": {"psnr": {"model": 16.1, "gray": 17.4}, "ssim": {"model": 0.68, "gray": 0.86},
                                      "ab_mae": {"model": 28.5, "gray": 25.9},
                                      "colorfulness": {"model": 49.9, "gray": 0.0, "true": 44.7}, "fallback": 1,
                                      "per_photo": {"coffee": {"psnr": {"model": 19.5, "gray": 18.25},
                                                               "psnr_gain_vs_gray": 1.25, "ssim_gain_vs_gray": -0.05}}},
    "reports/figures/colorize_grid.png": None,
    "reports/metrics/segment.json": {"model": "segnet", "test_global_acc": 0.96, "test_class_acc": 0.87,
                                     "test_miou": 0.69, "best_val_miou": 0.7, "epochs": 4,
                                     "test_iou": {"background": 0.98, "Shirt": 0.4}},
    "reports/figures/segment_overlays.png": None,
    "reports/figures/segment_confusion.png": None,
    "reports/metrics/anomaly.json": {"protocol": "one class is the anomaly", "classes": CLASSES,
                                     "per_class": {c: {m: AUC for m in ("ae", "pca", "iforest")} for c in CLASSES},
                                     "mean": {m: AUC for m in ("ae", "pca", "iforest")}},
    "reports/anomaly.md": "| anomaly class | AE ROC-AUC |\n|---|---:|\n| Trouser | 0.9 |\n",
    "reports/figures/anomaly_roc.png": None,
}


def write_fixtures(root: Path, skip: tuple[str, ...] = ()) -> None:
    for rel, content in FIXTURES.items():
        if rel in skip:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            Image.new("RGB", (60, 30), (40, 120, 200)).save(path)
        elif isinstance(content, dict):
            path.write_text(json.dumps(content))
        else:
            path.write_text(content)


def page_checks(page) -> tuple[list[dict], list[dict]]:
    """Per image and per section what a reader would see: image decoded, section content visible."""
    images = page.evaluate("Array.from(document.images).map(i => ({src: i.src.slice(0, 30), ok: i.complete && "
                           "i.naturalWidth > 0}))")
    sections = page.evaluate("""Array.from(document.querySelectorAll('section')).map(s => ({
        id: s.id,
        content: Array.from(s.children).filter(c => c.tagName !== 'H2' && !c.classList.contains('intro'))
                      .filter(c => c.getBoundingClientRect().height > 0
                                   && (c.innerText.trim() || c.querySelector('img')))
                      .length}))""")
    return images, sections


def test_markdown_tables_and_text_become_html():
    out = report.markdown_html("# Title\n\nIntro with `code` and **bold** <b>.\n\n## Sub\n\n- one `x`\n- two\n\n"
                               "| a | b | c | d |\n|---|---:|:---:|:---|\n| x | 1 | y | **z** |\n")
    assert out.startswith("<h4>Title</h4>\n")  # headings nest under the section's h2
    assert "<h5>Sub</h5>" in out and "<h1>" not in out and "<h2>" not in out
    assert "<p>Intro with <code>code</code> and <strong>bold</strong> &lt;b&gt;.</p>" in out
    assert "<ul>\n<li>one <code>x</code></li>\n<li>two</li>\n</ul>" in out
    # the separator row's alignment: the classes the page styles (as report.table's), left is the default
    assert '<th>a</th>\n<th class="num">b</th>\n<th class="center">c</th>\n<th>d</th>' in out
    assert '<td>x</td>\n<td class="num">1</td>\n<td class="center">y</td>\n<td><strong>z</strong></td>' in out
    assert "style=" not in out and report.markdown_html("") == ""


def test_html_in_markdown_is_escaped():
    out = report.markdown_html('<script>alert(1)</script>\n\nsee <img src=x onerror="alert(1)">\n\n'
                               "| a |\n|---|\n| <b>x</b> |\n\n[link](javascript:alert(1))\n")
    assert "<script" not in out and "<img" not in out and "<b>" not in out and "href=" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out and "<td>&lt;b&gt;x&lt;/b&gt;</td>" in out


def test_page_escapes_what_it_is_given_and_has_every_section_and_the_overview(tmp_path, monkeypatch):
    sections = [dataclasses.replace(s, intro=f"{s.intro} <b>&") for s in report.SECTIONS]
    monkeypatch.setattr(report, "SECTIONS", sections)
    page, statuses = report.build(compose_cfg(), root=tmp_path)
    assert page.count("<b>&") == 0 and page.count(" &lt;b&gt;&amp;</p>") == len(sections)
    assert statuses == {s.title: "ran" if not s.inputs else "not run" for s in sections}
    assert '<table class="overview">' in page and page.count("<section ") == len(sections)
    assert page.count('<tr class="not-run">') == sum(bool(s.inputs) for s in sections)
    for s in sections:
        assert f'<section id="{s.slug}" class="{statuses[s.title].replace(" ", "-")}">' in page
        assert f'<td><a href="#{s.slug}">{escape(s.title)}</a></td>' in page


def test_fixtures_cover_every_input_and_dvc_yaml_declares_the_pipelines():
    cfg = compose_cfg()
    assert {str(p) for p in report.input_paths(cfg, studies=True)} == set(FIXTURES)
    inputs = {str(p) for p in report.input_paths(cfg)}
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    deps = {d.replace("${data.name}", cfg.data.name) for d in stage["deps"]}
    assert inputs | {"src/aelab/stages/report.py", "src/aelab/stages/report_template.py",
                     "src/aelab/templates/report.html.j2"} <= deps
    # a study's outputs are shown, never deps: a dep would pull the study into `dvc repro`
    studies = yaml.safe_load((REPO / "studies/dvc.yaml").read_text())["stages"]
    assert {s.stage for s in report.SECTIONS if s.study} == {f"studies/dvc.yaml:{name}" for name in studies}
    assert not deps & (set(FIXTURES) - inputs)
    assert stage["outs"] == [{report.OUT: {"cache": False}}, {str(results.OUT): {"cache": False}}]
    assert {"reports/spread.json", "src/aelab/results.py", "src/aelab/check_metrics.py"} <= deps


def test_report_from_every_stage_has_every_section(workdir):
    write_fixtures(workdir)
    statuses = report.main(compose_cfg())
    assert set(statuses.values()) == {"ran"} and len(statuses) == len(report.SECTIONS)
    html = (workdir / report.OUT).read_text()
    for section in report.SECTIONS:
        assert section.title in unescape(html)
    assert "Not run" not in html and 'class="missing"' not in html
    assert html.count("<img ") == sum(p.endswith((".png", ".csv")) for p in FIXTURES)  # figures + drawn curves
    assert 'src="data:image/png;base64,' in html and "http://" not in html and "https://" not in html
    assert "ROC-AUC: raw 0.9926, codes 0.9946" in html and "mean ROC-AUC: AE 0.900" in html  # overview headlines
    assert "8d36" * 16 in html  # the manifest's checksums
    assert "<td>coffee</td>" in html and "1.25" in html  # colorize's held-out photographs, one by one
    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    assert [r.data.tags["stage"] for r in runs] == ["report"]
    assert "index.html" in {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}


def test_report_with_missing_outputs_says_not_run_and_the_command(workdir):
    missing = tuple(p for p in FIXTURES if "anomaly" in p or "segment" in p) + ("reports/figures/pretrain_recon.png",)
    write_fixtures(workdir, skip=missing)
    statuses = report.main(compose_cfg())
    assert statuses["Anomaly detection"] == statuses["Segmentation"] == "not run"
    assert statuses["Autoencoder pretraining"] == "incomplete"
    assert statuses["Data"] == statuses["Configuration"] == "ran"
    html = (workdir / report.OUT).read_text()
    assert "<code>dvc repro anomaly</code> produces them" in html
    assert "<code>dvc repro segment</code> produces them" in html
    assert "missing <code>reports/figures/pretrain_recon.png</code>: <code>dvc repro pretrain</code>" in html


def test_a_section_that_cannot_be_read_shows_the_error_and_the_rest_still_builds(workdir):
    write_fixtures(workdir)
    (workdir / "reports/metrics/segment.json").write_text('{"test_iou": 5}')  # not the shape segment writes
    statuses = report.main(compose_cfg())
    assert statuses.pop("Segmentation") == "error" and set(statuses.values()) == {"ran"}
    assert "could not render this section: AttributeError" in (workdir / report.OUT).read_text()


def test_report_without_any_output_still_builds(workdir):
    statuses = report.main(compose_cfg())
    assert statuses.pop("Configuration") == statuses.pop("All results with their seed spread") == "ran"
    assert set(statuses.values()) == {"not run"}
    assert "No numbers yet: `reports/metrics/features.json`, `reports/metrics/downstream.json` missing." in \
        (workdir / results.OUT).read_text()


@pytest.mark.parametrize("skip", [(), ("reports/metrics/anomaly.json", "reports/anomaly.md",
                                       "reports/figures/anomaly_roc.png", "reports/figures/latent_map.png",
                                       "reports/metrics/pretrain.json")], ids=["complete", "some-missing"])
def test_report_renders_in_chromium_without_broken_images_or_empty_sections(workdir, browser, skip):  # noqa: F811
    write_fixtures(workdir, skip=skip)
    report.main(compose_cfg())
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto((workdir / report.OUT).resolve().as_uri())
    images, sections = page_checks(page)
    shot = artifact_path(f"report_{'some_missing' if skip else 'complete'}.png")
    page.screenshot(path=shot, full_page=True)
    page.close()
    print(f"report screenshot: {shot}")
    assert images and [i for i in images if not i["ok"]] == []
    assert len(sections) == len(report.SECTIONS)
    assert [s["id"] for s in sections if not s["content"]] == []
