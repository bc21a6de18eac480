"""The models the peers benchmark trains (:mod:`experiments.peers`): a GPT-2-small-shaped decoder and a
ResNet-50-shaped conv net, full size on a GPU and scaled down on the CPU, with synthetic batches made on the device
(no data loading in the timed steps)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTShape:
    layers: int
    width: int
    heads: int
    sequence: int
    vocab: int
    batch: int


@dataclass(frozen=True)
class ResNetShape:
    widths: tuple[int, int, int, int]
    blocks: tuple[int, int, int, int]
    image: int
    batch: int
    classes: int = 1000


#: GPT-2 small (12 layers, d=768, 12 heads, sequence 1024, GPT-2's vocabulary padded to 50304) on a GPU; a
#: 4-layer, d=128 one with sequence 128 on the CPU.
GPT_SHAPES = {
    "cuda": GPTShape(layers=12, width=768, heads=12, sequence=1024, vocab=50304, batch=16),
    "cpu": GPTShape(layers=4, width=128, heads=4, sequence=128, vocab=512, batch=8),
}
#: ResNet-50's bottleneck stages (3, 4, 6, 3 blocks; 64 to 512 channels, 4x expansion) at 224x224 on a GPU; the same
#: depth at an eighth of the channels and 32x32 images on the CPU.
RESNET_SHAPES = {
    "cuda": ResNetShape(widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), image=224, batch=128),
    "cpu": ResNetShape(widths=(8, 16, 32, 64), blocks=(3, 4, 6, 3), image=32, batch=8, classes=10),
}


class Block(nn.Module):
    """A pre-LN transformer block (GPT-2's): causal self-attention and a 4x GELU MLP, each on a residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU(approximate="tanh")
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(self.act(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """A decoder-only transformer shaped like GPT-2, with tied embeddings and its N(0, 0.02) init."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.tok = nn.Embedding(shape.vocab, shape.width)
        self.pos = nn.Embedding(shape.sequence, shape.width)
        self.blocks = nn.ModuleList(Block(shape.width, shape.heads) for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(shape.width)
        self.head = nn.Linear(shape.width, shape.vocab, bias=False)
        self.head.weight = self.tok.weight
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1, 3x3 (strided), 1x1 convolutions with BatchNorm and ReLU, 4x expansion."""

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inputs, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(inputs, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width))
            if stride != 1 or inputs != 4 * width else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


def resnet(shape: ResNetShape) -> nn.Sequential:
    """A ResNet-50-shaped net: stem, four bottleneck stages, pooling and a linear head."""
    stem = shape.widths[0]
    layers: list[nn.Module] = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    inputs = stem
    for stage, (width, count) in enumerate(zip(shape.widths, shape.blocks)):
        for i in range(count):
            layers.append(Bottleneck(inputs, width, 2 if i == 0 and stage > 0 else 1))
            inputs = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, shape.classes)]
    return nn.Sequential(*layers)


class Synthetic(pl.LightningModule):
    """Trains ``net`` on one fixed random batch made on the device: the timed step is forward, backward and update."""

    def __init__(self, net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], lr: float, channels_last: bool,
                 language: bool) -> None:
        super().__init__()
        self.net = net
        self.batch = batch
        self.lr = lr
        self.channels_last = channels_last
        self.language = language

    def on_fit_start(self) -> None:
        self.batch = tuple(t.to(self.device) for t in self.batch)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.batch = (self.batch[0].contiguous(memory_format=torch.channels_last), self.batch[1])

    def training_step(self, _: object, batch_idx: int) -> torch.Tensor:
        x, y = self.batch
        logits = self.net(x)
        if self.language:
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return F.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def build(model: str, device: str, seed: int = 0) -> Synthetic:
    """The LightningModule for ``model`` (``"gpt"``, ``"resnet"`` or ``"mlp"``) at its ``device``'s shape."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if model == "gpt":
        shape = GPT_SHAPES[device]
        x = torch.randint(shape.vocab, (shape.batch, shape.sequence), generator=generator)
        return Synthetic(GPT(shape), (x, x.roll(-1, 1)), 3e-4, channels_last=False, language=True)
    if model == "resnet":
        shape = RESNET_SHAPES[device]
        x = torch.randn(shape.batch, 3, shape.image, shape.image, generator=generator)
        y = torch.randint(shape.classes, (shape.batch,), generator=generator)
        return Synthetic(resnet(shape), (x, y), 1e-3, channels_last=True, language=False)
    if model == "mlp":
        from experiments.models import kaiming_mlp

        depth, width = (8, 4096) if device == "cuda" else (20, 64)
        x = torch.randn(128, 64, generator=generator)
        y = torch.randint(10, (128,), generator=generator)
        return Synthetic(kaiming_mlp(64, 10, depth, width), (x, y), 1e-3, channels_last=False, language=False)
    raise ValueError(f"`model={model!r}` is not valid: expected 'gpt', 'resnet' or 'mlp'.")


def parameters_millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
