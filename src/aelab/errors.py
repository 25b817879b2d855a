"""Failures a person can act on: one message naming the file, key or store and the command that fixes it, printed
without a traceback by every entry point; everything else keeps its traceback.

The expected failures are :class:`UserError` and the project's own error classes listed in :func:`expected`
(a bad config value, a missing or unreadable input, a corrupt checkpoint or data file, an unreadable tracking store,
a data source that fails, a diverged fit). :func:`reported` turns one of them into ``error: <message>`` on stderr and
exit status 1; ``AELAB_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) re-raises it with its traceback instead.
"""

from __future__ import annotations

import os
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

DEBUG_ENV = ("AELAB_DEBUG", "HYDRA_FULL_ERROR")


class UserError(Exception):
    """An expected failure; the message says what failed, where (path, key, URI) and what to do."""


class CorruptInputError(UserError):
    """An input file exists but cannot be read (truncated, damaged)."""


class TrackingStoreError(UserError):
    """The MLflow tracking store cannot be opened or reached."""


def expected() -> tuple[type[BaseException], ...]:
    """The error classes that are expected failures: UserError and the project's own, whose messages already name
    what is at fault."""
    from aelab.config import ConfigError
    from aelab.data.catalog import ChannelError, UnknownDatasetError
    from aelab.data.color import FallbackError
    from aelab.data.download import ArchiveFormatError, ChecksumError, DownloadError
    from aelab.data.idx import IdxFormatError
    from aelab.data.noise_kinds import NoiseLevelError
    from aelab.data.segmentation import SegmentationDataError
    from aelab.data.tabular import TableError
    from aelab.lit.fast import TrainingDiverged
    from aelab.paths import MissingUpstreamError

    return (UserError, ConfigError, MissingUpstreamError, ChannelError, UnknownDatasetError, FallbackError,
            ArchiveFormatError, ChecksumError, DownloadError, IdxFormatError, NoiseLevelError, SegmentationDataError,
            TableError, TrainingDiverged)


def debugging() -> bool:
    """Whether the user asked for tracebacks (``AELAB_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in DEBUG_ENV)


@contextmanager
def reported(program: str):
    """Run the block; an expected failure in it is printed as ``<program>: error: <message>`` (and a line on how to
    see the traceback) and exits with status 1, unless :func:`debugging`."""
    try:
        yield
    except Exception as err:
        if debugging() or not isinstance(err, expected()):
            raise
        print(f"{program}: error: {err}", file=sys.stderr)
        print("(AELAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def check_checkpoint(path: Path, stage: str) -> Path:
    """``path`` if it looks like a readable checkpoint (a complete zip archive, as ``torch.save`` writes), else
    CorruptInputError naming it and the commands that restore it."""
    if zipfile.is_zipfile(path):
        return path
    raise CorruptInputError(f"{path} is not a readable checkpoint (truncated or damaged, {path.stat().st_size} "
                            f"bytes): restore it with `dvc checkout {path.parent}`, or train it again with "
                            f"`dvc repro -f -s {stage}`")
