"""The noise kinds and their level check, without torch: config validation imports this before any work."""

from __future__ import annotations

NOISE_KINDS = ("zero_mask", "gaussian", "salt_pepper")


class NoiseLevelError(ValueError):
    """Unknown noise kind or a level outside (0, 1)."""


def check_noise(kind: str, level: float) -> None:
    """Raise NoiseLevelError unless ``kind`` is known and 0 < ``level`` < 1."""
    if kind not in NOISE_KINDS:
        raise NoiseLevelError(f"unknown noise kind {kind!r}; known kinds: {', '.join(NOISE_KINDS)}")
    if not 0 < level < 1:
        raise NoiseLevelError(f"{kind} noise level {level} is outside its range (0, 1)")
