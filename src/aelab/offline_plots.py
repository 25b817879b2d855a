"""``dvc plots show`` rendered with no network.

DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN (jsdelivr), so offline it is blank. This fetches the three
minified bundles once from the npm registry (``npm pack``) into ``.cache/vega/``, inlines them into an HTML template
(``dvc plots show --html-template``: DVC fills its ``{plot_divs}``; without a ``{scripts}`` placeholder it adds no CDN
tags) and renders the plots with it: a self-contained page that works from ``file://``.
``python -m aelab.offline_plots`` (``make plots``); ``--fetch-only`` just fills the cache (``make setup``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from aelab.errors import UserError, reported
from aelab.paths import atomic_path, write_json

# the majors of the CDN tags in dvc_render 1.0.2 (dvc 3.67): vega@5.20.2, vega-lite@5.2.0, vega-embed@6.18.2
PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "vega"
MANIFEST = CACHE / "versions.json"  # written last: the cache is complete when it names PACKAGES
NPM_TIMEOUT_S = 300

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>DVC Plot</title>
{bundles}
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


class OfflinePlotsError(UserError):
    """The bundles could not be fetched, or DVC did not render the page: the message says what to run."""


def specs() -> list[str]:
    """The pinned npm specs, e.g. ``vega@5.33.1``."""
    return [f"{name}@{version}" for name, version in PACKAGES.items()]


def bundle(name: str) -> Path:
    """Where the cache keeps package ``name``'s minified bundle."""
    return CACHE / f"{name}.min.js"


def fetched() -> bool:
    """Whether the cache holds the bundles of the pinned versions."""
    return MANIFEST.is_file() and json.loads(MANIFEST.read_text()) == PACKAGES and all(
        bundle(name).is_file() for name in PACKAGES)


def fetch() -> None:
    """Fill the cache from the npm registry (``npm pack``), unless it already holds the pinned versions."""
    if fetched():
        return
    command = ["npm", "pack", *specs(), "--pack-destination"]
    if shutil.which("npm") is None:
        raise OfflinePlotsError(f"npm not found: it fetches {', '.join(specs())} once from the npm registry into "
                                f"{CACHE} (`{' '.join(command)} <dir>`); install it (`apt-get install npm`)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([*command, tmp], cwd=tmp, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
            error = done.stderr.strip()[-2000:] if done.returncode else ""
        except subprocess.TimeoutExpired:
            error = f"no answer in {NPM_TIMEOUT_S} s"
        if error:
            raise OfflinePlotsError(f"could not fetch {', '.join(specs())} from the npm registry "
                                    f"(`{' '.join(command)} {tmp}`): {error}")
        scripts = {}
        for name, version in PACKAGES.items():
            member = f"package/build/{name}.min.js"
            try:
                with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tgz:
                    scripts[name] = tgz.extractfile(member).read()
            except (OSError, KeyError, tarfile.TarError) as e:
                raise OfflinePlotsError(f"`{' '.join(command)} {tmp}` gave no {member} of {name}@{version}: {e}")
    for name, script in scripts.items():
        with atomic_path(bundle(name)) as out:
            out.write_bytes(script)
    write_json(MANIFEST, PACKAGES)


def write_template(path: Path) -> Path:
    """Write the HTML template with the three bundles inlined (fetching them first if need be)."""
    fetch()
    # "</script" inside a bundle would end its tag early; in JavaScript strings "<\/script" is the same text
    scripts = [bundle(name).read_text(encoding="utf8").replace("</script", "<\\/script") for name in PACKAGES]
    with atomic_path(path) as tmp:
        tmp.write_text(PAGE.format(bundles="\n".join(f"<script>{s}</script>" for s in scripts)), encoding="utf8")
    return path


def render(project: Path | str = ".", out: Path | str = "dvc_plots") -> Path:
    """``dvc plots show`` of the DVC project ``project`` into ``out`` (relative to it) with the offline template;
    returns the page's index.html. A failed render leaves an earlier ``out`` as it was."""
    project = Path(project).resolve()
    out = project / out
    template = write_template(CACHE / "template.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        command = [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(template), "-o", str(staging)]
        done = subprocess.run(command, cwd=project, capture_output=True, text=True)
        if done.returncode or not (staging / "index.html").is_file():
            raise OfflinePlotsError(f"`dvc plots show` in {project} made no page (exit {done.returncode}): "
                                    f"{(done.stderr or done.stdout).strip()[-2000:]}")
        sys.stderr.write(done.stderr)  # DVC's warnings, e.g. a plot file it could not read
        staging.chmod(0o755)  # mkdtemp makes it owner-only
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "index.html"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aelab.offline_plots",
                                     description="dvc plots show, rendered with no network (Vega inlined)")
    parser.add_argument("--out", default="dvc_plots", help="output folder (default: dvc_plots)")
    parser.add_argument("--fetch-only", action="store_true", help=f"only fetch the bundles into {CACHE}")
    args = parser.parse_args(argv)
    if args.fetch_only:
        fetch()
        print(CACHE)
    else:
        print(render(out=args.out))


if __name__ == "__main__":
    with reported("aelab.offline_plots"):
        main()
