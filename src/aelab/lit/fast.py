"""The fast training step: what small models need to keep a GPU busy, as switches under ``trainer.fast``.

A step of the deep dense autoencoder is some sixty kernels of a few microseconds each; launched one at a time from
Python, and from Lightning's loop, the GPU mostly waits for the host. So, on CUDA (``auto``):

- ``cuda_graph``: the forward, loss and backward of a training batch are captured once in a CUDA graph and replayed
  for every batch of that shape (one launch instead of dozens); a batch of another shape (the ragged last one) runs
  eagerly. The optimizer step stays Lightning's, on the gradients the graph writes in place.
- ``fused_optimizer``: Adam/AdamW/SGD as one fused kernel over all parameters.
- ``channels_last``: the memory layout cuDNN's convolutions prefer (modules with convolutions only).

Whatever the switches, the training losses are summed on the device and logged once per epoch (their mean over
the epoch's samples, as Lightning's ``on_epoch`` logging gives), so no step waits for the GPU to report a number;
every ``FINITE_CHECK_EVERY`` steps the sums are checked, and a NaN or infinite loss stops training with
:class:`TrainingDiverged`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

log = logging.getLogger(__name__)
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
DEFAULT_OPTIM = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "betas": [0.9, 0.999],
                 "schedule": "none", "step_size": 10, "gamma": 0.5}
WARMUP_STEPS = 3  # eager runs on a side stream before capture (cuBLAS/cuDNN handles, autograd's buffers)
FINITE_CHECK_EVERY = 20  # training steps between checks that the loss is finite (a check waits for the GPU)


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite: training stops, and the stage fails, keeping no checkpoint."""


@dataclass(frozen=True)
class FastSettings:
    """The resolved switches (all off: the plain eager step)."""

    cuda_graph: bool = False
    fused_optimizer: bool = False
    channels_last: bool = False


def resolve_fast(fast_cfg, device: torch.device, precision: str, module: nn.Module) -> FastSettings:
    """``trainer.fast`` for a module on ``device``: ``auto`` is on for CUDA; channels_last is on for conv nets on
    any device (on the 2-core CPU box it trains SegNet 1.3x and the denoiser 2x as fast)."""
    on_cuda = device.type == "cuda"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())

    def pick(key: str, possible: bool) -> bool:
        value = fast_cfg[key]
        if value == "auto":
            return possible
        if value and not possible:
            raise ValueError(f"trainer.fast.{key}=true is not possible here ({device.type}, precision {precision})")
        return bool(value)

    return FastSettings(cuda_graph=pick("cuda_graph", on_cuda and precision != "16-mixed"),  # no GradScaler in a graph
                        fused_optimizer=pick("fused_optimizer", on_cuda or fast_cfg.fused_optimizer is True),
                        channels_last=pick("channels_last", has_conv))


class FastPath(Callback):
    """Hands ``trainer.fast`` to a :class:`FastModule` before Lightning builds its optimizer."""

    def __init__(self, fast_cfg):
        self.fast_cfg = fast_cfg

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, FastModule):
            pl_module.fast = resolve_fast(self.fast_cfg, trainer.strategy.root_device, str(trainer.precision),
                                          pl_module)
            if pl_module.fast.channels_last:
                pl_module.to(memory_format=torch.channels_last)


class GraphedStep:
    """``fn(*batch)`` (forward, loss, backward; returns a dict of detached tensors) captured in one CUDA graph.

    Calling it copies a batch of the captured shapes into the graph's static inputs and replays it: the outputs and
    the gradients are written into the tensors the capture allocated, and those gradients are attached to the
    parameters again (Lightning releases ``.grad`` before every validation loop; without this the optimizer would
    step on gradients no replay writes any more).
    """

    def __init__(self, fn, batch: tuple[torch.Tensor, ...], module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.inputs = tuple(t.clone() for t in batch)
        self.outputs = self._capture(fn, module)
        self.grads = [p.grad for p in self.params]

    def _capture(self, fn, module: nn.Module) -> dict[str, torch.Tensor]:
        buffers = [b.clone() for b in module.buffers()]  # warm-up must not move BatchNorm's running statistics
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _uncached_autocast():
            for _ in range(WARMUP_STEPS):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        for buffer, saved in zip(module.buffers(), buffers):
            buffer.copy_(saved)
        for p in self.params:
            p.grad = None  # the captured backward allocates the gradients and then writes them on every replay
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), _uncached_autocast():
            return fn(*self.inputs)

    def _replay(self) -> None:
        self.graph.replay()

    def shapes_match(self, batch: tuple[torch.Tensor, ...]) -> bool:
        return all(a.shape == b.shape for a, b in zip(self.inputs, batch))

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        for static, t in zip(self.inputs, batch):
            static.copy_(t)
        self._replay()
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        return self.outputs


def _uncached_autocast():
    """Lightning's autocast as it is, but with its weight cache off, as CUDA graph capture requires."""
    enabled = torch.is_autocast_enabled("cuda")
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=enabled, cache_enabled=False)


class FastModule(L.LightningModule):
    """A LightningModule whose training step follows :class:`FastSettings`.

    Subclasses define ``train_losses(batch)``: a dict whose ``"loss"`` is minimised and whose other entries (named
    as logged, e.g. ``train_loss``) are logged as epoch means; they build optimizers with ``make_optimizer``.
    """

    fast = FastSettings()
    cuda_precision = "32-true"  # what ``trainer.precision=auto`` picks on CUDA (measured per model: aelab.bench)
    cpu_precision = "32-true"  # and on a CPU with bf16 arithmetic (aelab.lit.trainer.cpu_computes_bf16)

    def train_losses(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def make_optimizer(self, name: str, **kwargs) -> torch.optim.Optimizer:
        """``torch.optim`` ``name`` (adam, adamw, sgd) over all parameters, fused when the settings say so."""
        return OPTIMIZERS[name](self.parameters(), fused=self.fast.fused_optimizer or None, **kwargs)

    def optimizers_from(self, o: dict):
        """``configure_optimizers``'s answer for an optim config (``DEFAULT_OPTIM``'s keys): Adam or SGD (L2 as
        ``weight_decay``) and the LR schedule ``none``, ``step`` (×``gamma`` every ``step_size`` epochs),
        ``cosine`` (over the fit's epochs) or ``onecycle`` (over its steps)."""
        if o["name"] == "sgd":
            opt = self.make_optimizer("sgd", lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
        else:
            opt = self.make_optimizer("adam", lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
        if o["schedule"] == "none":
            return opt
        if o["schedule"] == "step":
            sched = {"scheduler": torch.optim.lr_scheduler.StepLR(opt, o["step_size"], o["gamma"]), "interval": "epoch"}
        elif o["schedule"] == "cosine":
            sched = {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.max_epochs),
                     "interval": "epoch"}
        else:
            steps = self.trainer.estimated_stepping_batches
            sched = {"scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, o["lr"], total_steps=steps), "interval": "step"}
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_train_epoch_start(self) -> None:
        self._sums, self._samples = None, 0

    def training_step(self, batch, batch_idx):
        batch = tuple(t.contiguous(memory_format=torch.channels_last) if self.fast.channels_last and t.ndim == 4
                      else t for t in batch)
        graph = getattr(self, "_graph", None)
        if self.fast.cuda_graph and graph is None:
            graph = self._graph = self._capture(batch)
        self._replayed = graph is not None and graph.shapes_match(batch)
        out = graph(batch) if self._replayed else self.train_losses(batch)
        self._keys = [k for k in out if k != "loss"]
        logged = torch.stack([out[k].detach().float() for k in self._keys]) * len(batch[0])
        self._sums = logged if self._sums is None else self._sums + logged
        self._samples += len(batch[0])
        return out["loss"]

    def _capture(self, batch: tuple[torch.Tensor, ...]) -> GraphedStep | None:
        """The graph of this module's step, or None (eager steps, with a warning) when the model cannot be captured."""
        try:
            return GraphedStep(self._forward_backward, batch, self)
        except RuntimeError as err:
            log.warning("CUDA graph capture of %s failed, training with eager steps: %s", type(self).__name__, err)
            self.fast = FastSettings(False, self.fast.fused_optimizer, self.fast.channels_last)
            for p in self.parameters():
                p.grad = None
            return None

    def _forward_backward(self, *batch) -> dict[str, torch.Tensor]:
        out = self.train_losses(batch)
        out["loss"].backward()
        return {k: v.detach() for k, v in out.items()}

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if getattr(self, "_graph", None) is None:
            optimizer.zero_grad()
        elif not self._replayed:  # an eager step must add into the tensors the graph writes, not replace them
            optimizer.zero_grad(set_to_none=False)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if not getattr(self, "_replayed", False):  # a replayed graph has run the backward already
            super().backward(loss, *args, **kwargs)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        last = batch_idx + 1 == self.trainer.num_training_batches
        if last or (batch_idx + 1) % FINITE_CHECK_EVERY == 0:
            self._check_finite(batch_idx)
        if last:
            for name, value in zip(self._keys, self._sums / self._samples):
                self.log(name, value, on_step=False, on_epoch=True, prog_bar=name == "train_loss",
                         sync_dist=True)  # DDP: the mean over all ranks

    def _check_finite(self, batch_idx: int) -> None:
        """Raise TrainingDiverged when a loss summed so far this epoch is not finite."""
        sums = self._sums.cpu()
        if not torch.isfinite(sums).all():
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            values = ", ".join(f"{k} = {v:g}" for k, v in zip(self._keys, sums.tolist()))
            raise TrainingDiverged(f"training diverged in epoch {self.current_epoch} by batch {batch_idx + 1} of "
                                   f"{self.trainer.num_training_batches} ({values}, learning rate {lr:g}): training "
                                   "stopped and no checkpoint kept; lower the learning rate or check the inputs")
