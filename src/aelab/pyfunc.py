"""The trained networks as MLflow models a person can use: one pyfunc per kind, plain arrays in and out, with the
preprocessing a user would otherwise repeat (padding to the network's stride, the Lab conversion, chunking) inside.

Each stage that trains one saves it beside its checkpoint (``models/<stage>/model/``, what ``aelab.predict`` loads
by default) and logs it from its run with a signature, an input example and the run's test metrics attached, and
registers it (``aelab.tracking.publish``: ``models:/aelab-denoiser@pipeline`` and so on).

Loading needs this package installed (``pip install -e .``): the pyfunc classes live here.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import Schema, TensorSpec

from aelab.tracking import file_hash, publish

MODEL_DIR = "model"  # the MLflow model's folder beside a stage's checkpoint
CHUNK = 256  # images per forward pass
REQUIREMENTS = ("torch", "lightning", "torchmetrics", "hydra-core", "numpy", "mlflow")


class InputError(ValueError):
    """An array a model cannot take; the message says what it expected."""


def requirements() -> list[str]:
    """The pinned packages a pyfunc here needs (besides this project itself), read from the installed ones: given,
    so that MLflow does not infer them by loading the model in a subprocess (seconds per stage)."""
    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


def uses_channels_last(module: torch.nn.Module) -> bool:
    """Whether ``module``'s convolution kernels are in channels-last layout (as ``fit_best`` leaves a model whose
    fast path trained in it): inference then runs in that layout too, as the stage's own scoring did."""
    kernels = [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    # a kernel with one input channel (O, 1, k, k) is contiguous in both layouts: only the others tell
    return (bool(kernels) and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
            and any(not p.is_contiguous() for p in kernels))


def bf16_here() -> bool:
    """Whether this machine computes bf16 natively (a GPU, or a CPU with bf16 arithmetic)."""
    from aelab.lit.trainer import cpu_computes_bf16

    return torch.cuda.is_available() or cpu_computes_bf16()


def pad_to_multiple(x: torch.Tensor, multiple: int, minimum: int = 1) -> torch.Tensor:
    """``x`` (N, C, H, W) padded at the bottom and right, by repeating the edge, to H and W divisible by
    ``multiple`` and at least ``minimum``."""
    h, w = x.shape[-2:]
    pad_h, pad_w = max(-h % multiple, minimum - h), max(-w % multiple, minimum - w)
    return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


class NetworkModel(mlflow.pyfunc.PythonModel):
    """A stage's Lightning checkpoint (the artifact ``checkpoint``) in eval mode, on the GPU when there is one.

    ``precision`` is the one the stage scored its test split with: ``bf16-mixed`` runs the forward pass under bf16
    autocast where the machine computes bf16 natively (elsewhere in fp32, as the trainer decides), so that the
    model's predictions on the test split give the stage's own test metric. Subclasses say which module class the
    checkpoint holds, check the input, and turn one chunk of it into the output.
    """

    module_class: ClassVar[str]

    def __init__(self, precision: str = "32-true", channels_last: bool = False):
        self.precision, self.channels_last = precision, channels_last
        self.module = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "module"}  # the weights travel as the checkpoint

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, module=None)

    def load_context(self, context) -> None:
        self.load(context.artifacts["checkpoint"])

    def load(self, checkpoint: Path | str) -> NetworkModel:
        """Load the weights from ``checkpoint`` (a stage's ``.ckpt``); returns self."""
        module_name, _, class_name = self.module_class.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.module = cls.load_from_checkpoint(checkpoint, map_location=device).eval()
        if self.channels_last:
            self.module.to(memory_format=torch.channels_last)
        return self

    @property
    def device(self) -> torch.device:
        return self.module.device

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """The output for ``model_input`` (an array of images, see the subclass), computed in chunks."""
        x = self.check(np.asarray(model_input, dtype=np.float32))
        autocast = self.precision == "bf16-mixed" and bf16_here()
        outputs = []
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=autocast):
            for start in range(0, len(x), CHUNK):
                chunk = torch.from_numpy(x[start:start + CHUNK]).to(self.device)
                if self.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                out = self.forward(chunk, params or {})
                outputs.append((out.float() if out.is_floating_point() else out).cpu().numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    def check(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4:
            raise InputError(f"expected images as an array (N, C, H, W), got shape {x.shape}")
        return x

    def input_shape(self) -> tuple[int, ...]:
        """The signature's input shape, -1 where any size goes."""
        return (-1, -1, -1, -1)

    def forward(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        raise NotImplementedError

    def stride(self) -> int:
        """What the network's height and width must be a multiple of: 2 per pooling level."""
        return 2 ** len(self.module.hparams.model_cfg["channels"])

    def min_side(self) -> int:
        """The smallest height and width the network takes."""
        return self.stride()

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output for images ``x`` of any size: padded by their edge pixels to :meth:`stride` (and
        :meth:`min_side`) where they need it, run, and cropped back."""
        h, w = x.shape[-2:]
        return self.module(pad_to_multiple(x, self.stride(), self.min_side()))[..., :h, :w]


class DenoiserModel(NetworkModel):
    """Noisy grayscale images (N, 1, H, W) in [0, 1], any size -> denoised images of the same shape. The network is
    fully convolutional: each image is processed whole, padded by its edge pixels to the network's stride (4 for
    two pooling levels) and cropped back."""

    module_class = "aelab.lit.image2image.ImageToImageModule"

    def check(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != 1:
            raise InputError(f"the denoiser takes grayscale images (N, 1, H, W), got shape {x.shape}")
        return x

    def input_shape(self) -> tuple[int, ...]:
        return (-1, 1, -1, -1)

    def forward(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        return self.whole(x)


class ColorizerModel(NetworkModel):
    """Images (N, 1, H, W) gray or (N, 3, H, W) RGB, in [0, 1], any size -> the colorized RGB images (N, 3, H, W).
    The network sees the CIE Lab luminance L (of the gray value, or of the RGB image) and predicts the chroma ab;
    the output keeps L exactly. Padded to the U-Net's stride and cropped back."""

    module_class = "aelab.lit.image2image.ImageToImageModule"

    def check(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise InputError(f"the colorizer takes gray (N, 1, H, W) or RGB (N, 3, H, W) images, got shape {x.shape}")
        return x

    def forward(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        from aelab.data.color import rgb_to_lab, to_rgb

        l_in = rgb_to_lab(x.float().expand(-1, 3, -1, -1))[:, :1] / 100
        return to_rgb(l_in, self.whole(l_in).float())

    def stride(self) -> int:
        return 2 ** (len(self.module.hparams.model_cfg["channels"]) - 1)  # the U-Net's last level does not pool


class SegmenterModel(NetworkModel):
    """Images (N, C, H, W) in [0, 1] with the channels the segmenter trained on, any size -> each pixel's class index
    (N, H, W); the class names are ``classes`` (index 0 is the background of the generated set). SegNet takes any
    size from 2 per pooling level up (smaller images are padded); smp's models are padded to a multiple of 32."""

    module_class = "aelab.lit.segmentation.SegmentationModule"

    def load(self, checkpoint: Path | str) -> SegmenterModel:
        super().load(checkpoint)
        self.classes = list(self.module.hparams.class_names)
        return self

    def check(self, x: np.ndarray) -> np.ndarray:
        channels = self.module.hparams.in_channels
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"the segmenter takes images with {channels} channel(s) (N, {channels}, H, W), "
                             f"got shape {x.shape}")
        return x

    def input_shape(self) -> tuple[int, ...]:
        return (-1, self.module.hparams.in_channels, -1, -1)

    def forward(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        return self.whole(x).argmax(1)

    def stride(self) -> int:
        return 1 if self.segnet() else 32  # SegNet unpools to any size; smp's encoders pool five times

    def min_side(self) -> int:
        return 2 ** len(self.module.hparams.model_cfg["channels"]) if self.segnet() else 32

    def segnet(self) -> bool:
        return "channels" in self.module.hparams.model_cfg


class AutoencoderModel(NetworkModel):
    """Grayscale 28x28 images (N, 1, 28, 28) in [0, 1] -> by ``params["output"]``: ``code`` (N, code_dim), the
    encoder's code (the default); ``reconstruction`` (N, 1, 28, 28); ``error`` (N,), the per-pixel mean squared
    reconstruction error, the anomaly score; ``percentile`` (N,), where that error falls among the test split's
    errors (``reference``: their percentiles 0..100, kept with the model)."""

    module_class = "aelab.lit.autoencoder.AutoencoderModule"
    OUTPUTS = ("code", "reconstruction", "error", "percentile")

    def __init__(self, precision: str = "32-true", channels_last: bool = False,
                 reference: np.ndarray | None = None):
        super().__init__(precision, channels_last)
        self.reference = reference

    def check(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:
            x = x[:, None]
        if x.shape[1:] != (1, 28, 28):
            raise InputError(f"the autoencoder takes 28x28 grayscale images (N, 1, 28, 28), got shape {x.shape}")
        return x

    def input_shape(self) -> tuple[int, ...]:
        return (-1, 1, 28, 28)

    def forward(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        output = params.get("output", "code")
        if output not in self.OUTPUTS:
            raise InputError(f"params output={output!r} is not one of {', '.join(self.OUTPUTS)}")
        if output == "code":
            return self.module.encode(x)
        reconstruction = self.module(x)
        if output == "reconstruction":
            return reconstruction
        error = ((reconstruction.float() - x.float()) ** 2).flatten(1).mean(1)
        if output == "error":
            return error
        if self.reference is None:
            raise InputError("this model was logged without reference errors: ask for output=error")
        reference = torch.as_tensor(self.reference, dtype=torch.float32, device=error.device)
        return torch.searchsorted(reference, error.contiguous()).float().clamp(max=100)


def save_network(model: NetworkModel, checkpoint: Path | str, example: np.ndarray,
                 params: dict | None = None) -> dict:
    """Save ``model`` (its weights: ``checkpoint``) as an MLflow model in ``model/`` beside the checkpoint (a DVC
    output: ``python -m aelab.predict`` loads it from there), with the signature of ``example`` and its output.
    Returns the arguments it was saved with (for ``log_model``)."""
    if model.module is None:
        model.load(checkpoint)
    output = model.predict(None, example, params)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), model.input_shape())]),
                               outputs=Schema([TensorSpec(output.dtype, (-1,) * output.ndim)]),
                               params=infer_signature(example, output, params=params).params if params else None)
    args = {"python_model": model, "artifacts": {"checkpoint": str(checkpoint)}, "signature": signature,
            "input_example": example, "pip_requirements": requirements()}
    mlflow.pyfunc.save_model(Path(checkpoint).parent / MODEL_DIR, **args)
    return args


def log_network(kind: str, model: NetworkModel, checkpoint: Path | str, example: np.ndarray,
                metrics: dict[str, float], params: dict | None = None):
    """:func:`save_network`, then log the model from the active run as the MLflow model ``kind`` with the run's test
    ``metrics`` attached, and register it (see the module). Returns MLflow's ModelInfo."""
    args = save_network(model, checkpoint, example, params)
    return publish(kind, mlflow.pyfunc.log_model, args, metrics, file_hash(checkpoint))
