"""Which layout and precision each net should train in on this CPU: the median time of one plain training step
(forward, loss, backward, Adam) of the default denoiser, colorizer, SegNet, conv AE and MLP classifier at their stages'
batch shapes,
in fp32 or bf16 autocast, with contiguous or channels_last tensors. What ``cpu_precision`` and
``trainer.fast.channels_last=auto`` are set from (README: CPU).

    python benchmarks/cpu_precision.py [--steps 14] [--out reports/bench/cpu_precision.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aelab.data.catalog import get_spec
from aelab.lit.autoencoder import autoencoder_module
from aelab.lit.segmentation import build_model
from aelab.lit.trainer import cpu_computes_bf16
from aelab.paths import write_json
from aelab.stages import CONF_DIR
from aelab.tracking import cpu_model


def default_nets() -> dict[str, tuple]:
    """name -> (network factory, input batch shape, segmentation output?), as the default config builds them."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg, conv = compose(config_name="config"), compose(config_name="config", overrides=["model=conv"])
    seg, gen, patch = cfg.segment, cfg.segment.generate, cfg.colorize.data.fallback.patch_size
    classes = len(get_spec(cfg.data.name).classes) + 1  # and the background
    return {
        "segnet": (lambda: build_model(OmegaConf.to_container(seg.model), 1, classes),
                   (seg.batch_size, 1, gen.height, gen.width), True),
        "denoise": (lambda: hydra.utils.instantiate(cfg.denoise.model), (cfg.denoise.batch_size, 1, 28, 28), False),
        "colorize": (lambda: hydra.utils.instantiate(cfg.colorize.model), (cfg.colorize.batch_size, 1, patch, patch),
                     False),
        "conv_ae": (lambda: autoencoder_module(conv).model, (conv.pretrain.batch_size, 1, 28, 28), False),
        "classifier": (lambda: hydra.utils.instantiate(cfg.classify.model), (cfg.classify.batch_size, 1, 28, 28), False),
    }


def step_seconds(net: tuple, channels_last: bool, bf16: bool, steps: int) -> float:
    """Median seconds of a training step of ``net`` (a ``default_nets`` entry) after three warm-up steps."""
    make, shape, segmentation = net
    torch.manual_seed(0)
    net, x = make(), torch.rand(shape)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        out = (out[0] if isinstance(out, tuple) else out).float()
        loss = (F.cross_entropy(out, torch.zeros(len(out), *out.shape[2:], dtype=torch.long)) if segmentation
                else out.square().mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--out", type=Path, default=Path("reports/bench/cpu_precision.json"))
    args = parser.parse_args(argv)
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "bf16_arithmetic": cpu_computes_bf16(),
              "torch": torch.__version__, "nets": {}}
    print(f"{result['cpu']}, {result['threads']} threads, bf16 arithmetic: {result['bf16_arithmetic']}")
    for name, net in default_nets().items():
        row = {f"{'channels_last' if cl else 'contiguous'}_{'bf16' if bf16 else 'fp32'}_ms":
               round(1000 * step_seconds(net, cl, bf16, args.steps), 1) for cl in (False, True) for bf16 in (False, True)}
        base = row["contiguous_fp32_ms"]
        print(f"{name:<11}" + "  ".join(f"{k[:-3]} {v:7.1f} ms ({base / v:.2f}x)" for k, v in row.items()), flush=True)
        result["nets"][name] = row
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
