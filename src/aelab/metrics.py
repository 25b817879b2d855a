"""Image-quality scores the image-to-image stages report: PSNR and SSIM (torchmetrics) and colorfulness."""

from __future__ import annotations

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure


class ImageQuality:
    """Mean per-image PSNR (dB) and SSIM of several named candidates against the same targets, over batches."""

    def __init__(self, names, data_range: float = 1.0, device: torch.device | str = "cpu"):
        self.meters = {name: (PeakSignalNoiseRatio(data_range=data_range, dim=(1, 2, 3)).to(device),
                              StructuralSimilarityIndexMeasure(data_range=data_range).to(device)) for name in names}

    def update(self, target: torch.Tensor, candidates: dict[str, torch.Tensor]) -> None:
        """Score one batch: ``target`` and every candidate are (N, C, H, W) images on the meters' device."""
        for name, pred in candidates.items():
            for meter in self.meters[name]:
                meter.update(pred.float(), target.float())

    def compute(self) -> dict[str, dict[str, float]]:
        """{"psnr": {name: dB}, "ssim": {name: value}}."""
        return {"psnr": {name: float(psnr.compute()) for name, (psnr, _) in self.meters.items()},
                "ssim": {name: float(ssim.compute()) for name, (_, ssim) in self.meters.items()}}


def colorfulness(rgb: torch.Tensor) -> torch.Tensor:
    """Hasler & Suesstrunk's (2003) colorfulness of each (3, H, W) image in [0, 1], on their 0-255 scale.

    0 for a gray image; about 15 "slightly", 33 "moderately", 59 "quite" and 82+ "highly" colorful.
    """
    r, g, b = (rgb.float() * 255).flatten(2).unbind(1)
    rg, yb = r - g, 0.5 * (r + g) - b
    spread = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    offset = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return spread + 0.3 * offset
