"""The seed spread of every pipeline metric: the pipeline rerun for several seeds, mean ± std per metric.

``python -m aelab.spread --seeds 42 43 44 [-S KEY=VALUE ...]`` runs the pipeline once per seed as a DVC experiment
in a temporary copy (``dvc exp run --temp -n spread-seed-<seed> -S seed=<seed>``, with your ``-S`` overrides, e.g.
``-S profile=smoke``; the workspace is left as it is, and DVC's cache skips what a seed does not change), reads
each experiment's committed ``reports/metrics/*.json`` from its git ref, and writes the mean, standard deviation
and values of every metric to ``reports/spread.json`` and ``reports/spread.md`` and to an MLflow run (stage
``spread``), with the machine each stage's runs were made on (``machines``, from the metrics' provenance).
``python -m aelab.check_metrics`` takes its tolerances from that file.

``--stages colorize ...`` reruns only those stages (and what they need) per seed, and replaces only their metrics
(``reports/metrics/<stage>.json``) in the existing spread file: for a change that moves one stage's numbers. A study
outside the default pipeline is named with its file, ``--stages studies/dvc.yaml:codes``. A whole-pipeline spread
keeps the studies' entries of an existing spread file of the same seeds and overrides (their committed metrics do not
change with the pipeline's seed, so they are never summarized from its experiments).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

import mlflow
import yaml
from omegaconf import OmegaConf

from aelab.check_metrics import METRICS_DIR, flat_metrics, read_revision
from aelab.errors import reported
from aelab.paths import atomic_path, write_json
from aelab.tracking import start_run

PREFIX = "spread-seed-"


def summarize(runs: dict[int, dict[str, float]]) -> dict[str, dict]:
    """Per metric present in every run: mean, sample std, n and the value of each seed."""
    keys = set.intersection(*(set(r) for r in runs.values()))
    return {k: {"mean": statistics.fmean(r[k] for r in runs.values()),
                "std": statistics.stdev(r[k] for r in runs.values()) if len(runs) > 1 else 0.0,
                "n": len(runs), "values": {str(seed): r[k] for seed, r in runs.items()}}
            for k in sorted(keys)}


def markdown(spread: dict[str, dict], seeds: list[int], overrides: list[str]) -> str:
    """The spread as a table: metric, mean ± std, each seed's value."""
    lines = [f"Seed spread over seeds {', '.join(map(str, seeds))}" + (f" ({' '.join(overrides)})" if overrides else "")
             + ": mean ± sample standard deviation.", "",
             "| metric | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|" + "---:|" * len(seeds)]
    for key, m in spread.items():
        lines.append(f"| {key} | {m['mean']:.4g} ± {m['std']:.2g} | "
                     + " | ".join(f"{m['values'][str(s)]:.4g}" for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def experiment_ref(name: str) -> str:
    """The git ref of the DVC experiment called ``name``."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], capture_output=True, text=True,
                          check=True).stdout.split()
    matches = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    if len(matches) != 1:
        raise RuntimeError(f"expected one DVC experiment named {name}, found {len(matches)}: {matches}")
    return matches[0]


def run_seed(seed: int, overrides: list[str], stages: list[str] | None = None) -> dict[str, dict]:
    """The pipeline (or ``stages``) for ``seed`` as a DVC experiment in a temporary copy; its metrics files (those
    of ``stages``) by stage."""
    name = f"{PREFIX}{seed}"
    subprocess.run(["dvc", "exp", "remove", name], capture_output=True)  # a previous spread's experiment
    cmd = ["dvc", "exp", "run", "--temp", "-n", name, "-S", f"seed={seed}"]
    for override in overrides:
        cmd += ["-S", override]
    cmd += stages or []
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    files = read_revision(experiment_ref(name), METRICS_DIR)
    names = stage_names(stages) if stages else pipeline_stages()
    return {stage: m for stage, m in files.items() if stage in names}


def pipeline_stages(dvc_yaml: Path | str = "dvc.yaml") -> list[str]:
    """The stages of the default pipeline (``dvc repro`` without targets runs them; not the studies)."""
    return list(yaml.safe_load(Path(dvc_yaml).read_text())["stages"])


def machines(runs: dict[int, dict[str, dict]]) -> dict[str, str]:
    """Per stage, the machine its metrics files were made on (their provenance; " / " between several)."""
    found: dict[str, set[str]] = {}
    for files in runs.values():
        for stage, m in files.items():
            if "machine" in m.get("provenance", {}):
                found.setdefault(stage, set()).add(m["provenance"]["machine"])
    return {stage: " / ".join(sorted(names)) for stage, names in sorted(found.items())}


def stage_names(targets: list[str]) -> list[str]:
    """The stage names of DVC targets (``studies/dvc.yaml:codes`` -> ``codes``), which name their metrics files."""
    return [target.rsplit(":", 1)[-1] for target in targets]


def merge_into(path: Path, new: dict, stages: list[str]) -> dict:
    """The spread file at ``path`` with the metrics and machines of ``stages`` replaced by those of ``new`` (a
    spread file's content)."""
    old = json.loads(path.read_text())
    if old["seeds"] != new["seeds"] or old["overrides"] != new["overrides"]:
        raise ValueError(f"{path} has seeds {old['seeds']} and overrides {old['overrides']}, not {new['seeds']} and "
                         f"{new['overrides']}: rerun the whole spread, without --stages")
    kept = {k: v for k, v in old["metrics"].items() if k.split(".", 1)[0] not in stages}
    kept_machines = {k: v for k, v in old.get("machines", {}).items() if k not in stages}
    return {**new, "metrics": dict(sorted({**kept, **new["metrics"]}.items())),
            "machines": dict(sorted({**kept_machines, **new["machines"]}.items()))}


def log_to_mlflow(spread: dict[str, dict], table: Path, seeds: list[int], overrides: list[str]) -> None:
    """The spread as a run of stage ``spread`` under the workspace's config (params.yaml)."""
    with start_run(OmegaConf.load("params.yaml"), "spread"):
        mlflow.set_tags({"seeds": " ".join(map(str, seeds)), "overrides": " ".join(overrides)})
        mlflow.log_metrics({f"{k}.{s}": v[s] for k, v in spread.items() for s in ("mean", "std")})
        mlflow.log_artifact(str(table))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        help="a Hydra override for every seed's run, as dvc exp run -S takes it")
    parser.add_argument("--stages", nargs="+",
                        help="only these stages: their metrics replace theirs in the spread file")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds: a spread needs at least two seeds")
    runs = {seed: run_seed(seed, args.overrides, args.stages) for seed in args.seeds}
    result = {"seeds": args.seeds, "overrides": args.overrides,
              "metrics": summarize({seed: flat_metrics(files) for seed, files in runs.items()}),
              "machines": machines(runs)}
    replaced = stage_names(args.stages) if args.stages else pipeline_stages()
    existing = args.out / "spread.json"
    old = json.loads(existing.read_text()) if existing.exists() else {}
    if args.stages or (old.get("seeds"), old.get("overrides")) == (args.seeds, args.overrides):
        result = merge_into(existing, result, replaced)
    spread = result["metrics"]
    write_json(args.out / "spread.json", result)
    table = args.out / "spread.md"
    with atomic_path(table) as tmp:
        tmp.write_text(markdown(spread, args.seeds, args.overrides))
    log_to_mlflow(spread, table, args.seeds, args.overrides)
    print(f"{len(spread)} metrics over {len(runs)} seeds: {args.out / 'spread.json'}, {table}")
    return spread


if __name__ == "__main__":
    with reported("aelab.spread"):
        main()
