"""Small file helpers shared by the stages: upstream checks and crash-safe writes."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


class MissingUpstreamError(FileNotFoundError):
    """A stage input is missing: the message names the file and the stage that makes it."""


def require(path: Path | str, stage: str) -> Path:
    """Return ``path`` if it exists (and, a checkpoint, is readable), else fail saying which DVC stage produces it
    (or how to restore it)."""
    path = Path(path)
    if not path.exists():
        raise MissingUpstreamError(f"missing input {path}: run the '{stage}' stage first (`dvc repro {stage}`)")
    if path.suffix == ".ckpt":
        from aelab.errors import check_checkpoint

        check_checkpoint(path, stage)
    return path


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path | str, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path | str, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the same keys, in column order) as a CSV with a header, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
