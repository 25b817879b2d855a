"""Benchmark of the training step, in one process: (a) a minimal plain loop over resident data, (b) the whole step
(forward, backward, capturable Adam) in one CUDA graph (CUDA only), (c) the project's own path exactly as the
stages run it (``fit_best``: Lightning, resident DataModule, ``trainer.fast``, checkpointing, validation, MLflow logging: one
``bench_<model>`` run with a child run per precision).

    python -m aelab.bench [--models deep conv segnet] [--epochs N] [--precision auto,bf16-mixed] [override ...]

Overrides are Hydra overrides of ``conf/`` (e.g. ``data.train_limit=5000``). Every epoch of every path is a full
pass over the training split plus a forward pass over the validation split; the reported time is the median epoch
after the first (capture, autotuning). Prints a table and writes ``reports/bench/<model>.json``: device, versions,
s/epoch, samples/s, peak GPU memory, final test loss of each path, and the ratios c/a and c/b.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import mlflow
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aelab.data.images import ImageDataModule
from aelab.data.segmentation import SegmentationDataModule
from aelab.lit.autoencoder import autoencoder_module
from aelab.lit.fast import FastModule
from aelab.lit.segmentation import SegmentationModule
from aelab.lit.trainer import fit_best, resolve_precision, train_device
from aelab.paths import write_json
from aelab.stages import CONF_DIR
from aelab.tracking import lightning_logger, start_run

MODELS = {"deep": ["model=deep"], "conv": ["model=conv"], "segnet": []}  # name -> overrides


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def setup(name: str, cfg) -> tuple:
    """(module factory, set-up DataModule, trainer config, checkpoint monitor and mode) for a benchmarked model."""
    if name == "segnet":
        p = cfg.segment
        data = SegmentationDataModule(p.data, p.batch_size, cfg.seed)
        model = OmegaConf.to_container(p.model, resolve=True)

        def make() -> FastModule:
            return SegmentationModule(model, data.info["channels"], data.info["classes"], data.info["ignore_index"],
                                      None, p.lr, p.weight_decay)
        return make, data, OmegaConf.merge(cfg.trainer, {"max_epochs": p.max_epochs}), "val_miou", "max"
    data = ImageDataModule(cfg.data, cfg.pretrain.batch_size, cfg.seed)
    data.setup()
    return (lambda: autoencoder_module(cfg)), data, cfg.trainer, "val_loss", "min"


def plain_optimizer(module: FastModule, **extra) -> torch.optim.Optimizer:
    """The module's optimizer kind and learning rate, without schedule (AdamW for segmentation, else Adam)."""
    if isinstance(module, SegmentationModule):
        return torch.optim.AdamW(module.parameters(), lr=module.hparams.lr,
                                 weight_decay=module.hparams.weight_decay, **extra)
    return torch.optim.Adam(module.parameters(), lr=module.optim["lr"], **extra)


class WholeStepGraph:
    """Forward, backward and the (capturable) optimizer step of one batch shape in one CUDA graph (PyTorch's
    whole-network capture recipe; its three warm-up steps train on the first batch)."""

    def __init__(self, module: FastModule, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]):
        self.inputs = tuple(t.clone() for t in batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(module, opt)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step(module, opt)

    def _step(self, module, opt) -> None:
        opt.zero_grad(set_to_none=True)
        module.train_losses(self.inputs)["loss"].backward()
        opt.step()

    def __call__(self, batch) -> bool:
        """Replay on ``batch``; False (nothing done) for a batch of another shape."""
        if any(a.shape != b.shape for a, b in zip(self.inputs, batch)):
            return False
        for static, t in zip(self.inputs, batch):
            static.copy_(t)
        self.graph.replay()
        return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(module: FastModule, data, device: torch.device, epochs: int, graph: bool) -> list[float]:
    """Epoch seconds of a minimal loop (optionally replaying a whole-step CUDA graph) on resident batches."""
    module.to(device)
    train, val = data.batches("train", device), data.batches("val", device)
    opt = plain_optimizer(module, capturable=True) if graph else plain_optimizer(module)
    step = WholeStepGraph(module.train(), opt, next(iter(data.batches("train", device)))) if graph else None
    seconds = []
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        module.train()
        for batch in train:
            if step is None or not step(batch):
                opt.zero_grad(set_to_none=step is None)
                module.train_losses(batch)["loss"].backward()
                opt.step()
        module.eval()
        with torch.no_grad():
            for batch in val:
                module.train_losses(batch)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def test_loss(module: FastModule, data, device: torch.device) -> float:
    """The training loss (``train_loss``) over the test split, in eval mode."""
    module.to(device).eval()
    total, n = 0.0, 0
    for batch in data.batches("test", device):
        total += float(module.train_losses(batch)["train_loss"]) * len(batch[0])
        n += len(batch[0])
    return total / n


def peak_memory_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


def measure(label: str, run, device: torch.device, samples: int) -> dict:
    """Run ``run() -> (epoch seconds, trained module)``; its median epoch after the first, throughput, memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, module, loss = run()
    median = statistics.median(seconds[1:] if len(seconds) > 1 else seconds)
    result = {"median_epoch_s": round(median, 4), "samples_per_s": round(samples / median),
              "peak_memory_mb": peak_memory_mb(device), "test_loss": round(loss, 5), "epochs": len(seconds),
              "epoch_s": [round(s, 4) for s in seconds]}
    print(f"  {label:<28} {median:8.4f} s/epoch  {samples / median:10.0f} samples/s  test loss {loss:.5f}",
          flush=True)
    return result


def bench_model(name: str, overrides: list[str], epochs: int | None, precisions: list[str]) -> dict:
    """All paths for one model; the project's path once per precision (``auto``: what the stages use)."""
    cfg = compose_config(MODELS[name] + overrides)
    make, data, trainer_cfg, monitor, mode = setup(name, cfg)
    device = train_device(trainer_cfg)
    epochs = epochs or trainer_cfg.max_epochs
    samples = len(data.batches("train", "cpu").tensors[0])
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    print(f"{name}: {samples} training samples, batch {data.batch_size}, {epochs} epochs on {device_name(device)}")

    def plain(graph: bool):
        def run():
            L.seed_everything(cfg.seed, verbose=False)
            module = make()
            seconds = plain_loop(module, data, device, epochs, graph)
            return seconds, module, test_loss(module, data, device)
        return run

    def project(precision: str):
        def run():
            L.seed_everything(cfg.seed, verbose=False)
            tcfg = OmegaConf.merge(trainer_cfg, {"max_epochs": epochs, "precision": precision})
            with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=precision, nested=True) as run:
                module, history, _ = fit_best(make(), data, tcfg, lightning_logger(cfg, run), f"{tmp}/best.ckpt",
                                              monitor=monitor, mode=mode)
            return [row["epoch_seconds"] for row in history.rows], module, test_loss(module, data, device)
        return run

    result = {"model": name, "device": device_name(device), "versions": versions(), "batch_size": data.batch_size,
              "train_samples": samples, "overrides": MODELS[name] + overrides,
              "a_plain_loop": measure("(a) plain loop", plain(False), device, samples)}
    if device.type == "cuda":
        result["b_cuda_graph_step"] = measure("(b) CUDA-graph step", plain(True), device, samples)
    result["c_project"] = {}
    probe = make()
    resolved = dict.fromkeys(resolve_precision(OmegaConf.merge(trainer_cfg, {"precision": p}), probe)
                             for p in precisions)
    with start_run(cfg, f"bench_{name}"):
        for precision in resolved:
            result["c_project"][precision] = measure(f"(c) project, {precision}", project(precision), device,
                                                     samples)
    default = resolve_precision(trainer_cfg, probe)
    c = result["c_project"].get(default) or next(iter(result["c_project"].values()))
    result["ratio_c_over_a"] = round(c["median_epoch_s"] / result["a_plain_loop"]["median_epoch_s"], 3)
    if "b_cuda_graph_step" in result:
        result["ratio_c_over_b"] = round(c["median_epoch_s"] / result["b_cuda_graph_step"]["median_epoch_s"], 3)
    print(f"  c/a = {result['ratio_c_over_a']}" + (f", c/b = {result['ratio_c_over_b']}"
                                                  if "ratio_c_over_b" in result else ""))
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__,
            "cuda": torch.version.cuda or "none"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["deep", "conv"])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per path (default: the config's)")
    parser.add_argument("--precision", default="auto", help="comma-separated precisions of the project's path")
    parser.add_argument("--out", default="reports/bench")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after options
    results = []
    for name in args.models:
        result = bench_model(name, args.overrides, args.epochs, args.precision.split(","))
        write_json(Path(args.out) / f"{name}.json", result)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
