"""Small models, data, Trainer runs and readers shared by the tests."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from gradmon import GradientHealthWarning, GradNormMonitor
from gradmon.naming import layer_name

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class MLP(pl.LightningModule):
    """``depth`` hidden Linear layers of ``width`` then a 10-way head, under ``net`` (layers net.0, net.2, ...)."""

    def __init__(self, depth: int = 3, width: int = 16, in_features: int = 8, activation: str = "relu",
                 init: str | None = None, optimizer: str = "sgd", lr: float = 0.05) -> None:
        super().__init__()
        self.in_features = in_features
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), ACTIVATIONS[activation]()]
            d = width
        layers.append(nn.Linear(d, 10))
        self.net = nn.Sequential(*layers)
        self.optimizer_name, self.lr = optimizer, lr
        for m in self.net:
            if isinstance(m, nn.Linear) and init is not None:
                if init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                elif init == "normal1":
                    nn.init.normal_(m.weight, std=1.0)
                else:
                    raise ValueError(init)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)



class GAN(pl.LightningModule):
    """A generator and a discriminator, each with its own Adam, stepped in turn under manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        fake = self.generator(torch.randn(real.shape[0], 8))
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        g_loss = nn.functional.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss, inputs=list(self.generator.parameters()))
        opt_g.step()
        d_loss = (nn.functional.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + nn.functional.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros)) / 2
        opt_d.zero_grad()
        self.manual_backward(d_loss, inputs=list(self.discriminator.parameters()))
        opt_d.step()

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=2e-4),
                torch.optim.Adam(self.discriminator.parameters(), lr=2e-4))


def gan_loader(batches: int) -> torch.utils.data.DataLoader:
    data = torch.randn(16 * batches, 2, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=16)


class ShardedMLP(MLP):
    """The same MLP, sharded with FSDP2 (``fully_shard``) over the data-parallel mesh in ``configure_model`` (as
    ModelParallelStrategy requires)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def mlp_layers(depth: int = 3) -> list[str]:
    """The layers of ``MLP(depth)``, as gradmon names them: ``net.0``, ``net.2``, ... and the head."""
    return [f"net.{2 * i}" for i in range(depth + 1)]


class PlantNaN(pl.Callback):
    """Turns the weight gradient of ``layer`` into NaN after the backward of the given optimizer steps: the whole
    gradient, or only the one ``element``; under sharding, this rank's piece of it, on ``rank`` only or on all."""

    def __init__(self, *steps: int, layer: str = "net.2", element: tuple[int, ...] | None = None,
                 rank: int | None = None) -> None:
        self.steps, self.layer, self.element, self.rank = set(steps), layer, element, rank

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step in self.steps and self.rank in (None, trainer.global_rank):
            grad = pl_module.get_submodule(self.layer).weight.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            if self.element is None:
                local.fill_(math.nan)
            else:
                local[self.element] = math.nan


class ScaleGrad(torch.autograd.Function):
    """Identity forward, backward scaled by ``scale``: a wrong gradient autograd cannot see."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class WrongLinear(nn.Linear):
    """A Linear whose weight and bias gradients are ``scale`` times the true ones (a planted backward bug)."""

    def __init__(self, *args, scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x):
        weight, bias = ScaleGrad.apply(self.weight, self.scale), ScaleGrad.apply(self.bias, self.scale)
        return nn.functional.linear(x, weight, bias)


def norm_monitor(**kwargs) -> GradNormMonitor:
    """A GradNormMonitor that draws no TensorBoard images (unless asked): for the tests of what it logs as scalars
    and histograms, which need no figures (drawing them is most of a short test run's time); the images have tests of
    their own."""
    return GradNormMonitor(**{"images_every_n_logs": None, **kwargs})


def make_data(n: int, in_features: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = (x @ torch.randn(in_features, 10, generator=g)).argmax(1)
    return x, y


def make_loader(batch_size: int = 16, steps: int = 8, in_features: int = 8, seed: int = 0):
    x, y = make_data(batch_size * steps, in_features, seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path | None = None, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer; TensorBoard logs under ``tmp_path/tb/version_0`` when a path is given."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0) if tmp_path is not None else False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def logdir(tmp_path: Path) -> Path:
    """Where :func:`trainer` given ``tmp_path`` writes its TensorBoard run."""
    return tmp_path / "tb" / "version_0"


def fit(
    model: pl.LightningModule,
    callbacks: Sequence[pl.Callback] = (),
    *,
    steps: int,
    tmp_path: Path | None = None,
    loader: torch.utils.data.DataLoader | None = None,
    batch_size: int = 16,
    batches: int | None = None,
    ckpt_path: Path | None = None,
    **trainer_kwargs,
) -> pl.Trainer:
    """Train ``model`` for ``steps`` optimizer steps on a :func:`trainer` with ``callbacks``; on ``loader``, or else on
    ``batches`` (default: ``steps``) batches of :func:`make_loader` data, as wide as the :class:`MLP`'s input."""
    t = trainer(tmp_path, max_steps=steps, callbacks=list(callbacks), **trainer_kwargs)
    if loader is None:
        loader = make_loader(batch_size, batches or steps, in_features=model.in_features)
    t.fit(model, loader, ckpt_path=ckpt_path)
    return t


def rank_loader(rank: int, per_device_batch: int, steps: int, world: int = 2) -> torch.utils.data.DataLoader:
    """This rank's share of ``make_loader(world * per_device_batch, steps)``: every ``world``-th sample, so that the
    ranks' step-k batches together are the single-process step-k batch."""
    dataset = make_loader(batch_size=world * per_device_batch, steps=steps).dataset
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    return torch.utils.data.DataLoader(shard, batch_size=per_device_batch, shuffle=False)


@contextlib.contextmanager
def health_warnings() -> Iterator[list[str]]:
    """The messages of every GradientHealthWarning raised in the block (none hidden as a repeat), filled on exit."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield messages
    messages.extend(str(w.message) for w in record if issubclass(w.category, GradientHealthWarning))


def hand_norms(tensors: dict[str, torch.Tensor], p: float, group_by: str = "layer") -> dict[str, float]:
    """p-norm per layer of named tensors, in float64 with torch.linalg.vector_norm."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name, t in tensors.items():
        parts.setdefault(layer_name(name, group_by), []).append(t.detach().double().reshape(-1))
    return {layer: torch.linalg.vector_norm(torch.cat(ts), p).item() for layer, ts in parts.items()}


def hand_total(tensors: dict[str, torch.Tensor], p: float) -> float:
    """p-norm of all named tensors together, in float64."""
    return torch.linalg.vector_norm(torch.cat([t.detach().double().reshape(-1) for t in tensors.values()]), p).item()


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of the event files under ``logdir``, as {tag: {step: value}}."""
    acc = accumulator(logdir)
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def accumulator(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_layouts(logdir: Path) -> list[layout_pb2.Layout]:
    """Every custom-scalars layout written to the run at ``logdir``."""
    return [
        layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
        for event in accumulator(logdir).Tensors("custom_scalars__config__")
    ]


#: The training-step hooks a callback may define, for :func:`no_sync`.
STEP_HOOKS = ("on_before_optimizer_step", "on_train_batch_end", "on_train_batch_start", "on_after_backward")


def no_sync(callback: pl.Callback, hooks: Sequence[str] = STEP_HOOKS) -> pl.Callback:
    """Run the callback's own ``hooks`` with CUDA's sync debug mode set to error: any implicit device sync raises
    (Lightning's own code, outside them, may sync as it likes)."""
    for name in hooks:
        if getattr(type(callback), name) is getattr(pl.Callback, name):
            continue
        hook = getattr(callback, name)

        def wrapped(*args, _hook=hook, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _hook(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        setattr(callback, name, wrapped)
    return callback
