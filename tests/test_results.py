"""The generated results: cells and comparison sentences decided from the numbers, the provenance header, and the
committed reports/results.md and README headline block matching the committed metrics."""

from __future__ import annotations

from pathlib import Path

from aelab import results
from aelab.results import Numbers

REPO = Path(__file__).resolve().parents[1]
HERE = {"machine": "box A", "torch": "2", "commit": "abc", "date": "2026-12-07"}


def spread_of(values: dict[str, list[float]], machine: str = "box A") -> dict:
    """A spread file over seeds 42-44 from each metric's three values."""
    import statistics

    metrics = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v), "n": 3,
                   "values": dict(zip(("42", "43", "44"), v))} for k, v in values.items()}
    return {"seeds": [42, 43, 44], "overrides": [], "metrics": metrics,
            "machines": {k.split(".")[0]: machine for k in values}}


def downstream(ae: float, pca: float) -> dict:
    return {"raw": {"accuracy": 0.90}, "pca": {"accuracy": pca}, "ae": {"accuracy": ae}, "provenance": HERE}


FEATURES = {"ae_test_mse": 0.0106, "pca_test_mse": 0.0151, "provenance": HERE}


SPREAD = spread_of({"downstream.ae.accuracy": [0.874, 0.875, 0.873], "downstream.pca.accuracy": [0.869, 0.870, 0.868],
                    "downstream.raw.accuracy": [0.90, 0.90, 0.90], "features.ae_test_mse": [0.0106, 0.0107, 0.0105],
                    "features.pca_test_mse": [0.0151, 0.0151, 0.0151]})


def test_a_covered_stage_shows_seed_means_and_a_difference_beyond_three_stds_counts():
    n = Numbers({"downstream": downstream(0.874, 0.869), "features": FEATURES}, SPREAD, seed=42)
    assert n.covered("downstream")
    assert n.cell("downstream.ae.accuracy", 4) == "0.8740 ± 0.0010"
    assert n.versus("downstream.ae.accuracy", "downstream.pca.accuracy", 4) == \
        "+0.0050 (5.0× the larger seed std): **better**"
    assert n.versus("downstream.pca.accuracy", "downstream.ae.accuracy", 4).endswith("**worse**")
    doc = results.document(n)
    assert "Every stage's numbers are the spread's run for seed 42." in doc
    assert "Metrics of downstream, features: made on box A at commit `abc` on 2026-12-07." in doc
    assert "| autoencoder codes (32) | 0.8740 ± 0.0010 |" in doc


def test_within_three_stds_is_noise_and_the_rounding_floor_widens_colorize():
    close = spread_of({"downstream.ae.accuracy": [0.871, 0.875, 0.873],
                       "downstream.pca.accuracy": [0.869, 0.870, 0.871]})
    n = Numbers({"downstream": downstream(0.871, 0.869)}, close, seed=42)
    assert n.versus("downstream.ae.accuracy", "downstream.pca.accuracy", 4).endswith("**within the noise**")
    colour = spread_of({"colorize.psnr.model": [21.0, 21.1, 20.9], "colorize.psnr.gray": [20.2, 20.2, 20.2]})
    n = Numbers({"colorize": {"psnr": {"model": 21.0, "gray": 20.2}}}, colour, seed=42)
    # 0.8 dB is eight seed stds, but below colorize's 1 dB rounding floor (check_metrics.ROUNDING)
    assert n.versus("colorize.psnr.model", "colorize.psnr.gray", 2) == \
        "+0.80 (8.0× the larger seed std; rounding floor 1): **within the noise**"


def test_numbers_from_another_run_or_machine_are_called_so():
    moved = {"downstream": {**downstream(0.880, 0.869), "provenance": {**HERE, "machine": "box B"}},
             "features": FEATURES}
    n = Numbers(moved, SPREAD, seed=42)
    assert not n.covered("downstream")
    assert n.cell("downstream.ae.accuracy", 4) == "0.8800 ± 0.0010"  # this run's value, the spread's std
    doc = results.document(n)
    assert "**Not the spread's run**: downstream." in doc
    assert "**Another machine than the spread**: downstream were" in doc
    bare = results.document(Numbers({"downstream": downstream(0.874, 0.869), "features": FEATURES}, {}, 42))
    assert "| autoencoder codes (32) | 0.8740 |" in bare  # no spread: no ±
    assert "(no seed spread measured: not a claim)" in bare


def test_a_section_with_missing_or_odd_metrics_says_so_and_the_rest_is_written():
    doc = results.document(Numbers({"downstream": downstream(0.874, 0.869), "segment": {"test_iou": 5}}, SPREAD, 42))
    assert "No numbers yet: `reports/metrics/codes.json` missing." in doc
    assert "Could not read the metrics of segment: TypeError" in doc
    assert "## Anomaly detection (`anomaly`)\n\nNo numbers yet" in doc


def test_the_headline_block_is_replaced_between_its_markers_only():
    readme = f"intro 0.5\n{results.BEGIN}\nold 0.1\n{results.END}\nafter 0.9\n"
    assert results.with_headline(readme, "new\n") == f"intro 0.5\n{results.BEGIN}\nnew\n{results.END}\nafter 0.9\n"
    assert results.with_headline("no markers\n", "new\n") == "no markers\n"


def test_the_committed_results_and_readme_block_are_those_of_the_committed_metrics():
    n = results.load(REPO)
    assert (REPO / results.OUT).read_text(encoding="utf-8") == results.document(n), \
        "reports/results.md is stale: python -m aelab.results rewrites it"
    readme = (REPO / results.README).read_text(encoding="utf-8")
    assert results.BEGIN in readme and results.with_headline(readme, results.headline(n)) == readme, \
        "README's headline block is stale: python -m aelab.results rewrites it"
