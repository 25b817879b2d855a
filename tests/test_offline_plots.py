"""``make plots`` (aelab.offline_plots): ``dvc plots show`` of a tiny generated DVC project, opened in headless
Chromium with every request off the page's own file refused; and the errors when the Vega bundles cannot be had."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from aelab import offline_plots
from test_mlflow_ui import artifact_path, browser  # noqa: F401  (the shared headless Chromium fixture)

DVC_YAML = """\
stages:
  train:
    cmd: python -c "pass"
    plots:
      - accuracy.json:
          template: linear
          x: epoch
          y: accuracy
      - loss.csv:
          x: epoch
          y: train_loss
plots:
  - Loss per epoch:
      template: linear
      x: epoch
      y:
        loss.csv: [train_loss, val_loss]
  - Confusion (actual vs predicted):
      template: confusion
      x: actual
      y:
        confusion.csv: predicted
"""
N_PLOTS = 4


def tiny_dvc_project(root):
    """A git + DVC project with a stage's line plots (JSON, CSV) and top-level ones (two lines, a confusion)."""
    root.mkdir()
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "loss.csv").write_text("epoch,train_loss,val_loss\n" + "".join(
        f"{e},{1 / (e + 1):.3f},{1.2 / (e + 1):.3f}\n" for e in range(5)))
    (root / "accuracy.json").write_text(json.dumps([{"epoch": e, "accuracy": 0.5 + 0.1 * e} for e in range(5)]))
    (root / "confusion.csv").write_text("actual,predicted\n" + "".join(
        f"{a},{p}\n" for a, p in [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 0), (2, 2), (2, 2)]))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True)
    return root


def test_dvc_plots_render_with_no_network(tmp_path, monkeypatch, browser):  # noqa: F811
    if not offline_plots.fetched() and shutil.which("npm") is None:
        pytest.skip(f"no Vega bundles in {offline_plots.CACHE} and no npm to fetch them (`make setup` does, with "
                    "npm and the npm registry)")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    index = offline_plots.render(tiny_dvc_project(tmp_path / "project"))
    assert index == tmp_path / "project/dvc_plots/index.html"
    assert "cdn.jsdelivr.net" not in index.read_text()

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    refused, errors = [], []

    def refuse_off_page(route):
        url = route.request.url
        if url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    page.route("**/*", refuse_off_page)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(index.as_uri())
    plots = "Array.from(document.querySelectorAll('body > div[id]'))"
    page.wait_for_function(f"{plots}.every(d => d.querySelector('svg, canvas'))", timeout=15_000)
    sizes = page.evaluate(f"""{plots}.map(d => {{
        const r = d.querySelector('svg, canvas').getBoundingClientRect();
        return [d.id, r.width, r.height];
    }})""")
    page.screenshot(path=artifact_path("offline_plots.png"), full_page=True)
    page.close()
    assert refused == [] and errors == []
    assert len(sizes) == N_PLOTS
    assert all(width > 50 and height > 50 for _, width, height in sizes), sizes


def npm_running(tmp_path, monkeypatch, script: str) -> None:
    """Put an ``npm`` that runs ``script`` (bash) first on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "npm").write_text(f"#!/bin/bash\n{script}\n")
    (folder / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def tarballs_without_vega_embed(folder) -> None:
    """npm-pack-like tarballs of the pinned versions in which vega-embed lacks its bundle."""
    folder.mkdir()
    for name, version in offline_plots.PACKAGES.items():
        with tarfile.open(folder / f"{name}-{version}.tgz", "w:gz") as tgz:
            info = tarfile.TarInfo(f"package/build/{name}.min.js" if name != "vega-embed" else "package/README.md")
            info.size = 2
            tgz.addfile(info, io.BytesIO(b"//"))


@pytest.mark.parametrize("case", ["no npm", "npm fails", "bundle missing"])
def test_without_the_bundles_the_error_names_the_package_and_the_command(case, tmp_path, monkeypatch):
    monkeypatch.setattr(offline_plots, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(offline_plots, "MANIFEST", tmp_path / "cache/versions.json")
    if case == "no npm":
        monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
        expected = ["npm not found", "vega@5.33.1", "npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0"]
    elif case == "npm fails":
        npm_running(tmp_path, monkeypatch, "echo 'npm error code E404 vega-lite' >&2; exit 1")
        expected = ["could not fetch", "vega-embed@6.29.0", "npm pack vega@5.33.1", "E404 vega-lite"]
    else:
        tarballs_without_vega_embed(tmp_path / "tarballs")
        npm_running(tmp_path, monkeypatch, f'cp {tmp_path}/tarballs/*.tgz "${{@: -1}}"')
        expected = ["gave no package/build/vega-embed.min.js of vega-embed@6.29.0", "npm pack vega@5.33.1"]
    with pytest.raises(offline_plots.OfflinePlotsError) as raised:
        offline_plots.write_template(tmp_path / "template.html")
    for text in expected:
        assert text in str(raised.value)
    assert not offline_plots.fetched()
    assert not (tmp_path / "template.html").exists()
    assert not (tmp_path / "cache").exists()  # nothing half-written
