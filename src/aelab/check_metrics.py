"""Is a change in the pipeline's numbers real or noise? Compare the workspace's metrics with a baseline.

``python -m aelab.check_metrics`` reads ``reports/metrics/*.json`` (what ``dvc repro`` wrote) and the same files
of the baseline: the committed ones (``--rev HEAD``, the default) or a folder (``--baseline DIR``). Each metric may
move by ``--sigmas`` (3) times its seed spread, the standard deviation over seeds that ``python -m aelab.spread``
measured (``--spread``, default ``reports/spread.json``), and at least by ``--rtol`` of its value (float noise
between machines), and at least by the stage's rounding floor (``ROUNDING``) where one was measured. Metrics without
a measured spread must agree to ``--rtol``. Wall times (keys with ``seconds``)
are ignored. It prints, per stage, how many of its numbers moved beyond tolerance (on another machine, which stages
moved is the first thing to know); exit status 1 names every metric beyond its tolerance, and every metric that
appeared or vanished.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from aelab.errors import UserError, reported
from aelab.tracking import flatten

METRICS_DIR = "reports/metrics"
IGNORED = ("seconds",)  # wall times: they measure the machine, not the result

# Rounding floors: how far a number moved with the order of float sums alone, whatever its seed spread. The same
# seeds of colorize (42-44) in fp32 with contiguous tensors, in fp32 with channels_last (a change that only reorders
# sums) and in bf16 moved its mean test PSNR by up to 0.5 dB, one seed's gain over gray by 0.5 dB and its SSIM by
# 0.039 (docs/results.md, Colorization), and its per-photo gains flip sign between two EPYC machines. A stage's
# number whose key has a part starting with the word may move by the floor.
ROUNDING = {"colorize": {"psnr": 1.0, "ssim": 0.04}}


def flat_metrics(files: dict[str, dict]) -> dict[str, float]:
    """{"pretrain": {"test_mse": 0.01, "x": {"y": 2}}} -> {"pretrain.test_mse": 0.01, "pretrain.x.y": 2.0}: numbers
    only (no flags, strings or wall times)."""
    return {key: float(value) for key, value in flatten(files).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not any(i in key for i in IGNORED)}


def read_folder(folder: Path | str) -> dict[str, dict]:
    """The metrics files of ``folder``, by stage name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}


def read_revision(rev: str, folder: str = METRICS_DIR) -> dict[str, dict]:
    """The metrics files of ``folder`` as committed at git revision ``rev`` (a commit, branch or experiment ref)."""
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{folder}"], capture_output=True, text=True)
    if listing.returncode:
        raise UserError(f"git revision {rev!r} has no {folder} ({listing.stderr.strip().splitlines()[-1]}): give a "
                        "commit that has committed metrics (--rev), or a folder of them (--baseline)")
    names = listing.stdout.split()
    return {Path(name).stem: json.loads(subprocess.run(["git", "show", f"{rev}:{folder}/{name}"], capture_output=True,
                                                       text=True, check=True).stdout)
            for name in names if name.endswith(".json")}


def rounding_floor(key: str) -> float:
    """The rounding floor of metric ``key`` (``colorize.per_photo.coffee.psnr.model`` -> 1.0), 0 where none."""
    stage, _, rest = key.partition(".")
    parts = rest.split(".")
    return max((floor for word, floor in ROUNDING.get(stage, {}).items() if any(p.startswith(word) for p in parts)),
               default=0.0)


def compare(current: dict[str, float], baseline: dict[str, float], spread: dict[str, float], sigmas: float = 3.0,
            rtol: float = 1e-4) -> list[dict]:
    """One row per metric in either set: baseline, current, tolerance and whether the change is within it."""
    rows = []
    for key in sorted(current.keys() | baseline.keys()):
        old, new = baseline.get(key), current.get(key)
        if old is None or new is None:
            rows.append({"metric": key, "baseline": old, "current": new, "tolerance": None,
                         "ok": False, "why": "only in the baseline" if new is None else "new metric"})
            continue
        tolerance = max(sigmas * spread.get(key, 0.0), rtol * max(abs(old), abs(new)), rounding_floor(key), 1e-12)
        diff = new - old
        ok = (math.isnan(old) and math.isnan(new)) or abs(diff) <= tolerance
        why = "" if ok else (f"moved {diff:+.4g}, beyond {sigmas:g} x its seed spread and its rounding floor"
                             if key in spread
                             else f"moved {diff:+.4g} and has no measured spread")
        rows.append({"metric": key, "baseline": old, "current": new, "tolerance": tolerance, "ok": ok, "why": why})
    return rows


def per_stage(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """{stage: (metrics beyond tolerance, metrics compared)} from ``compare``'s rows (a metric's stage is its first
    key)."""
    counts: dict[str, tuple[int, int]] = {}
    for r in rows:
        stage = r["metric"].split(".", 1)[0]
        beyond, total = counts.get(stage, (0, 0))
        counts[stage] = (beyond + (not r["ok"]), total + 1)
    return counts


def load_spread(path: Path | str) -> dict[str, float]:
    """The per-metric standard deviations over seeds from ``python -m aelab.spread`` (empty when there is none)."""
    path = Path(path)
    return {k: v["std"] for k, v in json.loads(path.read_text())["metrics"].items()} if path.exists() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--rev", default="HEAD", help="git revision whose committed metrics are the baseline")
    source.add_argument("--baseline", type=Path, help="a folder of metrics files as the baseline instead")
    parser.add_argument("--metrics", type=Path, default=Path(METRICS_DIR), help="the workspace's metrics folder")
    parser.add_argument("--spread", type=Path, default=Path("reports/spread.json"))
    parser.add_argument("--sigmas", type=float, default=3.0)
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args(argv)

    for folder in (args.baseline, args.metrics):
        if folder is not None and not folder.is_dir():
            raise UserError(f"no metrics folder {folder}: give the folder of a run's reports/metrics")
    baseline = read_folder(args.baseline) if args.baseline else read_revision(args.rev, str(args.metrics))
    spread = load_spread(args.spread)
    rows = compare(flat_metrics(read_folder(args.metrics)), flat_metrics(baseline), spread, args.sigmas, args.rtol)
    failed = [r for r in rows if not r["ok"]]
    where = args.baseline or f"git {args.rev}"
    print(f"{len(rows)} metrics against {where}; {len(spread)} with a seed spread ({args.spread}); "
          f"{len(failed)} beyond tolerance")
    for stage, (beyond, total) in per_stage(rows).items():
        print(f"  {stage:<18} {beyond:>4} of {total:>4} beyond tolerance")
    for r in failed:
        print(f"  {r['metric']}: {r['baseline']} -> {r['current']}: {r['why']}")
    return 1 if failed else 0


if __name__ == "__main__":
    with reported("aelab.check_metrics"):
        sys.exit(main())
