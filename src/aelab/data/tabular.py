"""A binary-classification table for the tabular stage: scikit-learn's breast-cancer set or any CSV, checked up front.

Every check runs before any training and names what is wrong: the file, the column, the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer


class TableError(ValueError):
    """A table the tabular stage cannot use; the message names the file and the column at fault."""


@dataclass(frozen=True)
class Table:
    x: np.ndarray  # (rows, features) float32
    y: np.ndarray  # (rows,) int64 in {0, 1}
    features: list[str]
    classes: list[str]  # classes[1] is the positive class (label 1)
    name: str  # "breast_cancer" or the CSV's file name
    source_file: Path  # the file the rows were read from (hashed into the MLflow run's tags)


def load_table(tabular_cfg) -> Table:
    """The table ``tabular.source`` names: ``breast_cancer`` (ships inside scikit-learn) or ``csv``."""
    if tabular_cfg.source == "breast_cancer":
        return breast_cancer()
    return read_csv(tabular_cfg.csv_path, tabular_cfg.target)


def breast_cancer() -> Table:
    """scikit-learn's Wisconsin diagnostic breast-cancer table: 569 rows, 30 features, malignant/benign."""
    data = load_breast_cancer()
    return Table(data.data.astype(np.float32), data.target.astype(np.int64), list(data.feature_names),
                 [str(c) for c in data.target_names], "breast_cancer",
                 Path(str(resources.files(data.data_module) / data.filename)))


def read_csv(path: Path | str, target: str) -> Table:
    """A CSV with a header row, finite numeric feature columns, no empty cells and a two-valued ``target`` column."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"tabular.csv_path: no such file {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise TableError(f"{path}: not a readable CSV table ({err})") from None
    if target not in frame.columns:
        raise TableError(f"{path}: no target column {target!r} (tabular.target); "
                         f"columns present: {', '.join(map(str, frame.columns))}")
    with_nan = frame.columns[frame.isna().any()].tolist()
    if with_nan:
        raise TableError(f"{path}: empty or NaN cells in column(s) {', '.join(map(str, with_nan))}")
    classes = np.unique(frame[target].to_numpy())
    if len(classes) != 2:
        raise TableError(f"{path}: target column {target!r} must have exactly 2 distinct values for a binary "
                         f"classification, has {len(classes)}")
    features = frame.drop(columns=target)
    non_numeric = features.columns[[not pd.api.types.is_numeric_dtype(t) for t in features.dtypes]].tolist()
    if non_numeric:
        raise TableError(f"{path}: non-numeric feature column(s) {', '.join(map(str, non_numeric))}: "
                         "encode them as numbers or drop them")
    if features.shape[1] == 0:
        raise TableError(f"{path}: no feature columns besides the target {target!r}")
    x = features.to_numpy(np.float64)
    infinite = features.columns[np.isinf(x).any(axis=0)].tolist()
    if infinite:
        raise TableError(f"{path}: infinite values in column(s) {', '.join(map(str, infinite))}")
    y = (frame[target].to_numpy() == classes[1]).astype(np.int64)
    return Table(x.astype(np.float32), y, list(map(str, features.columns)), [str(c) for c in classes],
                 path.name, path)


def check_folds(table: Table, folds: int) -> None:
    """Stratified k-fold needs at least ``folds`` rows of each class."""
    counts = np.bincount(table.y, minlength=2)
    if counts.min() < folds:
        rare = table.classes[int(counts.argmin())]
        raise TableError(f"tabular.folds={folds}: class {rare!r} of {table.name} has only {counts.min()} row(s); "
                         f"stratified {folds}-fold CV needs at least {folds} per class")
