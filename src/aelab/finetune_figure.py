"""The finetune study's figure with its seed spread: test accuracy against labelled images (log x), one line per
init, the mean over the seeds with a band of ± one standard deviation and each seed's value as a dot.

``python -m aelab.finetune_figure`` reads ``reports/spread.json`` (after ``python -m aelab.spread --stages
studies/dvc.yaml:finetune``) and writes ``reports/finetune_spread.png``; the study itself draws one seed's curves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aelab.figures import plt, save_figure


def spread_curves(metrics: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """Each init's test accuracy per label budget as the spread summarized it (mean, std, per-seed values), from its
    flat metrics (``finetune.<budget>.<init>.test_accuracy``)."""
    curves: dict[str, dict[int, dict]] = {}
    for key, m in metrics.items():
        stage, budget, init, name = (key.split(".") + [""] * 4)[:4]
        if stage == "finetune" and name == "test_accuracy":
            curves.setdefault(init, {})[int(budget)] = m
    if not curves:
        raise ValueError("no finetune.<budget>.<init>.test_accuracy in the spread: run python -m aelab.spread "
                         "--stages studies/dvc.yaml:finetune first")
    return curves


def spread_figure(path: Path | str, curves: dict[str, dict[int, dict]], seeds: list[int]) -> Path:
    """Mean line, ± std band and per-seed dots of each init's accuracy against the label budget."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for init, by_budget in curves.items():
        budgets = sorted(by_budget)
        mean, std = ([by_budget[b][k] for b in budgets] for k in ("mean", "std"))
        (line,) = ax.plot(budgets, mean, marker="o", label=init)
        ax.fill_between(budgets, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
        for b in budgets:
            values = list(by_budget[b]["values"].values())
            ax.scatter([b] * len(values), values, color=line.get_color(), s=8, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"classifier initialization, mean ± std over seeds {', '.join(map(str, seeds))}")
    ax.legend()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spread", type=Path, default=Path("reports/spread.json"))
    parser.add_argument("--out", type=Path, default=Path("reports/finetune_spread.png"))
    args = parser.parse_args(argv)
    if not args.spread.is_file():
        raise SystemExit(f"{args.spread}: no such file (python -m aelab.spread writes it)")
    spread = json.loads(args.spread.read_text())
    try:
        curves = spread_curves(spread["metrics"])
    except ValueError as err:
        raise SystemExit(f"{args.spread}: {err}") from None
    path = spread_figure(args.out, curves, spread["seeds"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
