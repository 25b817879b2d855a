"""The lecture's hyper-parameter recipe: one very short training per candidate value, best by validation loss.

Every candidate starts from the same initial weights and sees the same mini-batches, so only the searched value
differs. ``search.subject`` picks the network: the autoencoder (loss and penalties of the pretrain stage) or the
classifier (the classify stage's cross-entropy and L1, on its label budget); each module's ``search_loss`` is what
is scored. There are two ways to train the candidates, chosen by ``search.vectorize``, on the trainer's device
(``train_device``):

- sequentially (``short_training_loss``): a plain loop per candidate over the module's own
  ``configure_optimizers``, the reference;
- vectorised (``ensemble_training_losses``): all candidates as one ensemble, their weights stacked
  (``torch.func.stack_module_state``), the loss of each under ``torch.vmap`` + ``functional_call``, and
  ``EnsembleOptimizer``, torch.optim's Adam / SGD written over the stacked tensors with per-candidate values.

Both give the same validation losses up to float rounding (tests/test_search.py checks them against each other), which
a candidate near divergence, or Adam on a batch-normalised net, can amplify as any change of summation order does
(the loop's own results move as much with the number of CPU threads). A Trainer's start-up would cost more than
these trainings, hence the plain loops.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, stack_module_state  # noqa: E402
from tqdm import tqdm  # noqa: E402

from aelab.data.images import load_split, split_indices, to_tensor  # noqa: E402
from aelab.figures import save_figure  # noqa: E402
from aelab.lit.autoencoder import AutoencoderModule  # noqa: E402
from aelab.lit.classifier import ClassifierModule  # noqa: E402
from aelab.lit.fast import DEFAULT_OPTIM  # noqa: E402
from aelab.lit.trainer import train_device  # noqa: E402
from aelab.models.classifier import apply_max_norm, max_norm_  # noqa: E402
from aelab.paths import write_csv  # noqa: E402

ADAM_EPS = 1e-8  # torch.optim.Adam's default, which AutoencoderModule keeps
VAL_CHUNK = 10  # candidates whose full validation-set outputs are held at once
CPU_CHUNK = 10  # candidates per ensemble on a CPU: the weights, gradients and moments of ~10 dense AEs stay in cache
CPU_MAX_PARAMS = 500_000  # weights per candidate above which the CPU loop beats the ensemble: the 784-1024-1024-10
# classifier (1.9M) trained 20 candidates x 10 mini-batches in 4.7 s by the loop, 6.0-7.4 s as ensembles of 10
VMAP_CHECKED = ("aelab.models.autoencoders.DenseAutoencoder", "aelab.models.autoencoders.ConvAutoencoder",
                "aelab.models.classifier.MLPClassifier")


def log_grid(low: float, high: float, n: int) -> np.ndarray:
    """``n`` values evenly spaced on a log scale from ``low`` to ``high``."""
    return np.logspace(math.log10(low), math.log10(high), n)


def as_batch(tensors: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A set of rows as a tuple of tensors: (images,) for the autoencoder, (images, labels) for the classifier."""
    return tensors if isinstance(tensors, tuple) else (tensors,)


def search_data(cfg: DictConfig) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The search's training and validation rows, on the trainer's device: the first ``search.train_limit`` (the
    classifier: its label budget, ``classify.train_labels``) and ``search.val_limit`` images of the seeded train /
    val split; the classifier's with their labels."""
    images, labels = load_split(cfg.data, "train")
    train_idx, val_idx = split_indices(len(images), cfg.data.val_fraction, cfg.seed)
    device = train_device(cfg.trainer)
    classifier = cfg.search.subject == "classifier"
    n_train = cfg.classify.train_labels if classifier else cfg.search.train_limit

    def rows(idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        x = to_tensor(images[idx]).to(device)
        return (x, torch.from_numpy(labels[idx]).long().to(device)) if classifier else (x,)

    return rows(train_idx[:n_train]), rows(val_idx[:cfg.search.val_limit])


def subject_optim(cfg: DictConfig) -> dict:
    """The optim config of the network the search tunes (``search.subject``)."""
    section = cfg.classify if cfg.search.subject == "classifier" else cfg.pretrain
    return OmegaConf.to_container(section.optim, resolve=True)


class SearchObjective(nn.Module):
    """The search's loss of ``module`` (its ``search_loss``): training loss + penalties of a batch in train mode,
    the evaluation loss of the whole validation set in eval mode. A ``forward`` so that ``functional_call`` can run
    it with one candidate's weights: the penalties then read that candidate's weights too."""

    def __init__(self, module: AutoencoderModule | ClassifierModule):
        super().__init__()
        self.module = module

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.module.search_loss(*batch)

    def max_norm(self) -> float | None:
        """The classifier's max-norm bound on its hidden units' incoming weights (None: no constraint)."""
        return getattr(self.module.model, "max_norm", None)


def search_objective(cfg: DictConfig, optim: dict, device: torch.device) -> SearchObjective:
    """The seeded initial module of ``search.subject`` (the same for every candidate), with ``optim`` and no LR
    schedule, on ``device``."""
    torch.manual_seed(cfg.seed)
    plain = OmegaConf.to_container(cfg, resolve=True)
    optim = {**optim, "schedule": "none"}
    if cfg.search.subject == "classifier":
        module = ClassifierModule(plain["classify"]["model"], optim, plain["classify"]["l1_weight"])
    else:
        module = AutoencoderModule(plain["model"], plain["pretrain"]["loss"], optim, plain["pretrain"]["penalty"])
    return SearchObjective(module).to(device)


def mini_batches(cfg: DictConfig, train: tuple[torch.Tensor, ...], n_batches: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """``n_batches`` mini-batches of ``search.batch_size`` rows in one seeded order, wrapping around the data."""
    n = len(train[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).to(train[0].device)
    size = cfg.search.batch_size
    for step in range(n_batches):
        start = (step * size) % n
        yield tuple(t[order[start:start + size]] for t in train)


def short_training_loss(cfg: DictConfig, optim: dict, train, val, n_batches: int) -> float:
    """Validation loss after ``n_batches`` mini-batches with ``optim``; ``inf`` when training diverged. ``train``
    and ``val``: a tensor of images or a tuple (images, labels), as ``search_data`` gives."""
    train, val = as_batch(train), as_batch(val)
    objective = search_objective(cfg, optim, train[0].device)
    opt = objective.module.configure_optimizers()
    objective.train()
    for batch in mini_batches(cfg, train, n_batches):
        loss = objective(*batch)
        if not torch.isfinite(loss):
            return math.inf
        opt.zero_grad()
        loss.backward()
        opt.step()
        apply_max_norm(objective.module.model)
    objective.eval()
    with torch.no_grad():
        val_loss = float(objective(*val))
    return val_loss if math.isfinite(val_loss) else math.inf


def per_candidate(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per candidate, shaped to broadcast over the stacked tensor ``like`` (floats in its dtype)."""
    shaped = values.view(-1, *[1] * (like.ndim - 1))
    return shaped.to(like.dtype) if shaped.is_floating_point() else shaped


class EnsembleOptimizer:
    """torch.optim.Adam / SGD (no dampening, no Nesterov, L2 ``weight_decay`` added to the gradient) on stacked
    parameters, each candidate (first dimension) with its own ``lr``, ``weight_decay`` and Adam ``betas`` / SGD
    ``momentum``; a candidate not ``alive`` keeps its weights. Per-candidate factors are computed in float64, as
    torch.optim computes its Python-float ones."""

    def __init__(self, params: dict[str, torch.Tensor], optims: list[dict]):
        optims = [{**DEFAULT_OPTIM, **o} for o in optims]
        names = {o["name"] for o in optims}
        if len(names) != 1:
            raise ValueError(f"one ensemble needs one optimizer, got {sorted(names)}")
        self.adam = names.pop() == "adam"
        self.params = list(params.values())
        device = self.params[0].device

        def column(key: str, index: int | None = None) -> torch.Tensor:
            values = [o[key] if index is None else o[key][index] for o in optims]
            return torch.tensor(values, dtype=torch.float64, device=device)

        self.lr, self.weight_decay = column("lr"), column("weight_decay")
        self.decay = any(o["weight_decay"] for o in optims)
        if self.adam:
            self.beta1, self.beta2 = column("betas", 0), column("betas", 1)
        else:
            self.momentum = column("momentum")
        self.state = [[torch.zeros_like(p) for _ in range(2 if self.adam else 1)] for p in self.params]
        self.steps = 0

    def adam_step(self, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
        """The parameter change by torch.optim.Adam's single-tensor formula; updates the moments."""
        t = self.steps
        exp_avg.lerp_(grad, per_candidate(1 - self.beta1, grad))
        exp_avg_sq.mul_(per_candidate(self.beta2, grad)).addcmul_(grad, grad * per_candidate(1 - self.beta2, grad))
        step_size = per_candidate(self.lr / (1 - self.beta1 ** t), grad)
        denom = exp_avg_sq.sqrt().div_(per_candidate((1 - self.beta2 ** t) ** 0.5, grad)).add_(ADAM_EPS)
        return (exp_avg * -step_size).div_(denom)

    def sgd_step(self, grad: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """The parameter change by torch.optim.SGD; the buffer starts at zero, so after the first step it is the
        gradient, as SGD's clone makes it."""
        buf.mul_(per_candidate(self.momentum, grad)).add_(grad)
        return buf * -per_candidate(self.lr, grad)

    @torch.no_grad()
    def step(self, alive: torch.Tensor) -> None:
        """One update from the parameters' ``.grad`` (then cleared), for the candidates where ``alive``."""
        self.steps += 1
        for p, state in zip(self.params, self.state):
            grad = p.grad + per_candidate(self.weight_decay, p) * p if self.decay else p.grad
            change = self.adam_step(grad, *state) if self.adam else self.sgd_step(grad, *state)
            p.add_(change.masked_fill_(~per_candidate(alive, p), 0))
            p.grad = None


def ensemble_training_losses(cfg: DictConfig, optims: list[dict], train, val, n_batches: int) -> list[float]:
    """``short_training_loss`` of every candidate in ``optims`` at once, as one vectorised ensemble.

    The weights of the candidates are stacked; each step computes every candidate's loss on the same mini-batch
    (``vmap`` over ``functional_call``), backpropagates their sum (the candidates share nothing, so each gets its
    own gradient) and updates them with ``EnsembleOptimizer`` (then the classifier's max-norm, per candidate). A
    candidate whose loss is not finite is frozen and scores ``inf``; the others are unaffected. Batch-norm running
    statistics are stacked buffers, updated per candidate. Dropout draws one mask for all candidates
    (``randomness="same"``) from the same seeded generator in the same order as the loop, so each candidate sees the
    masks the loop gives it (checked on the CPU); ``randomness="different"`` would give each its own masks and
    results no longer comparable with the loop's.
    """
    train, val = as_batch(train), as_batch(val)
    device = train[0].device
    objective = search_objective(cfg, optims[0], device)
    params, buffers = stack_module_state([objective] * len(optims))
    opt = EnsembleOptimizer(params, optims)
    max_norm = objective.max_norm()
    constrained = [params[name] for name in hidden_weight_names(objective)] if max_norm is not None else []

    def loss(p: dict, b: dict, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return functional_call(objective, (p, b), batch)

    alive = torch.ones(len(optims), dtype=torch.bool, device=device)
    objective.train()
    train_losses = torch.vmap(loss, in_dims=(0, 0, None), randomness="same")
    for batch in tqdm(mini_batches(cfg, train, n_batches), total=n_batches, unit="batch",
                      desc=f"{len(optims)} candidates"):
        losses = train_losses(params, buffers, batch)
        alive &= torch.isfinite(losses.detach())
        losses.sum().backward()
        opt.step(alive)
        for weight in constrained:  # (candidates, units, inputs): each unit's row of each candidate
            max_norm_(weight, max_norm)
    objective.eval()
    with torch.no_grad():
        val_losses = torch.vmap(loss, in_dims=(0, 0, None), chunk_size=VAL_CHUNK)(params, buffers, val)
    return [v if ok and math.isfinite(v) else math.inf for v, ok in zip(val_losses.tolist(), alive.tolist())]


def hidden_weight_names(objective: SearchObjective) -> list[str]:
    """The names (in ``objective``'s parameters) of the classifier's hidden-layer weights, which max-norm bounds."""
    hidden = {id(layer.weight) for layer in objective.module.model.hidden_layers()}
    return [name for name, p in objective.named_parameters() if id(p) in hidden]


def vectorizes(cfg: DictConfig, device: torch.device | None = None, n_params: int = 0) -> bool:
    """Whether the search trains its candidates as ensembles: ``search.vectorize`` true, or ``auto`` and a model
    whose ensemble is checked against the sequential loop (tests/test_search.py), batch norm and dropout
    included, unless it is on the CPU with more than ``CPU_MAX_PARAMS`` weights (``n_params``) per candidate."""
    if cfg.search.vectorize == "auto":
        if device is not None and device.type == "cpu" and n_params > CPU_MAX_PARAMS:
            return False
        model = cfg.classify.model if cfg.search.subject == "classifier" else cfg.model
        return model._target_ in VMAP_CHECKED
    return cfg.search.vectorize


def chunk_size(cfg: DictConfig, n_candidates: int, device: torch.device) -> int:
    """Candidates per ensemble: ``search.chunk``, where ``auto`` is all of them on a GPU and ``CPU_CHUNK`` on the
    CPU (one ensemble of 100 outgrows the cache and runs slower than the plain loop there)."""
    if cfg.search.chunk == "auto":
        return n_candidates if device.type == "cuda" else CPU_CHUNK
    return cfg.search.chunk


def search_losses(cfg: DictConfig, optims: list[dict], train, val, n_batches: int) -> tuple[list[float], dict]:
    """The validation loss of each candidate ``optims`` after ``n_batches`` mini-batches (``inf``: diverged), by
    ensembles (``chunk_size``) or one after the other (``search.vectorize``), and how: ``vectorized`` and
    ``device``. ``train``/``val`` as ``search_data`` gives them (or a tensor of images)."""
    device = as_batch(train)[0].device
    n_params = sum(p.numel() for p in search_objective(cfg, optims[0], device).parameters())
    vectorized = vectorizes(cfg, device, n_params)
    if vectorized:
        chunk = chunk_size(cfg, len(optims), device)
        losses = [loss for start in range(0, len(optims), chunk)
                  for loss in ensemble_training_losses(cfg, optims[start:start + chunk], train, val, n_batches)]
    else:
        losses = [short_training_loss(cfg, optim, train, val, n_batches)
                  for optim in tqdm(optims, desc="candidates", unit="run")]
    return losses, {"vectorized": vectorized, "device": device.type}


def run_search(name: str, losses: list[float], plot_x: np.ndarray | list[str], xlabel: str, ylabel: str, root,
               **info) -> dict:
    """Log each candidate's loss as ``val_loss`` (step = its index) and ``info`` (how the losses were computed) as
    tags to the active MLflow run, write ``reports/plots/<name>.csv`` and ``reports/figures/<name>.png`` (loss vs
    ``plot_x`` on a log scale, or vs the candidates' names when ``plot_x`` holds strings) and log the figure; return
    the best candidate's index and loss (diverged runs count as ``inf``) and ``info``."""
    mlflow.set_tags(info)
    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, [  # one write, not one per candidate
        Metric("val_loss", min(loss, 1e6), now, step) for step, loss in enumerate(losses)])
    best = int(np.argmin(losses))
    finite = np.isfinite(losses)
    named = isinstance(plot_x[0], str)
    write_csv(root / f"reports/plots/{name}.csv",
              [{**({"x": x} if named else {"x": float(x), "log10_x": math.log10(x)}),
                "val_loss": loss if math.isfinite(loss) else ""} for x, loss in zip(plot_x, losses)])
    x = np.arange(len(losses)) if named else np.asarray(plot_x)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x[finite], np.asarray(losses)[finite], marker=".")
    best_x = plot_x[best] if named else f"{plot_x[best]:.3g}"
    ax.axvline(x[best], color="tab:red", linestyle="--", label=f"best: {xlabel} = {best_x}")
    if named:
        ax.set_xticks(x, plot_x, rotation=45, ha="right", fontsize=8)
    else:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    mlflow.log_artifact(str(save_figure(fig, root / f"reports/figures/{name}.png")))
    return {"best_index": best, "best_loss": losses[best], "n_candidates": len(losses),
            "n_diverged": int((~finite).sum()), **info}
