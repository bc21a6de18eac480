"""The data and models of the diagnosis zoo (:mod:`experiments.diagnosis_zoo`): synthetic data made here (nothing is
downloaded), and MLPs, conv nets, residual conv nets with BatchNorm, decoder-only transformers and recurrent language
models, each built from a :class:`RunConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

CLASSES = 10
FEATURES = 32
IMAGE_SHAPE = (3, 12, 12)
VOCAB = 32
SEQ_LEN = 32
HEADS = 4
BATCH = 64
LM_BATCH = 16
#: The scale of the cosine-similarity head of the ``bad_op="log"`` MLP: logits up to +-300, so the softmax of an
#: example whose target logit is 104 below the largest underflows to 0 (exp(-104) is below float32's smallest
#: subnormal); at this scale some example of the first batch already does, and the mislabelled ones keep doing so.
COSINE_SCALE = 300.0
LANGUAGE_MODELS = ("gpt", "mha_gpt", "rnn", "lstm", "gru")
RECURRENT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
KAIMING = "kaiming_normal(nonlinearity='relu')"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run varies; ``replace(config, **fix)`` applies a fix.

    Attributes:
        model: ``"mlp"``, ``"conv"`` (plain deep conv net), ``"resnet"`` (residual conv net with BatchNorm),
            ``"gpt"`` (decoder-only transformer, hand-written attention), ``"mha_gpt"`` (decoder using
            ``nn.MultiheadAttention``), ``"rnn"`` (``nn.RNN`` tanh LM), ``"lstm"`` or ``"gru"``.
        activation: the hidden activation of MLPs and conv nets, the MLP activation of the transformers.
        depth: hidden layers (mlp, conv), residual blocks (resnet), transformer blocks, recurrent layers.
        width: hidden units, channels, model dimension or hidden size.
        norm: ``None``, ``"layernorm"`` or ``"batchnorm"`` after each hidden Linear / Conv (mlp, conv).
        post_ln: transformers: post-LN (``x = LN(x + f(x))``) instead of pre-LN.
        tied: transformers: tie the token embedding and the output head.
        init: a ``gradmon.WeightInit`` scheme for the weight layers (Linear, Conv, attention; the transformers'
            embeddings too; the recurrent layers' ``weight_ih``); ``None``: PyTorch's default.
        init_recurrent: a scheme for the recurrent layers' ``weight_hh``.
        bias: a constant for the biases of the initialised layers; ``None``: zeros under ``init``, else PyTorch's.
        optimizer: ``"sgd"``, ``"sgd_momentum"`` (0.9), ``"adam"`` or ``"adamw"`` (weight decay 0.01).
        lr: the learning rate (the peak one under warm-up).
        warmup_steps: linear warm-up steps (``LambdaLR``, stepped every step); 0: none.
        clip: the Trainer's ``gradient_clip_val``.
        precision: the Trainer's precision, ``"32-true"`` or ``"bf16-mixed"``.
        steps: ``max_steps``.
        guard: ``False`` plants the bad op ``bad_op`` names; ``True`` uses its safe form.
        bad_op: ``"log"``: the loss is ``nll(log(softmax(z)))`` (``log(0) = -inf``, then NaN) instead of
            ``cross_entropy``; the MLP then has a cosine head whose logits reach +-300, so the softmax underflows.
            ``"div"``: the MLP L2-normalises its input as ``x / x.norm()`` without eps, and the data holds
            zero-padded rows. Both only for ``model="mlp"``.
        seed: seeds the model, the init and the batch order (the data itself is fixed).
    """

    model: str
    activation: str = "relu"
    depth: int = 8
    width: int = 64
    norm: str | None = None
    post_ln: bool = False
    tied: bool = False
    init: str | None = None
    init_recurrent: str | None = None
    bias: float | None = None
    optimizer: str = "sgd"
    lr: float = 0.05
    warmup_steps: int = 0
    clip: float | None = None
    precision: str = "32-true"
    steps: int = 60
    guard: bool = True
    bad_op: str | None = None
    seed: int = 0


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def classification_data(n: int = 2048, padded: bool = False, noisy: bool = False) -> TensorDataset:
    """A Gaussian mixture: 2 clusters per class (so a linear model is not enough) in ``FEATURES`` dimensions.

    Args:
        n: samples.
        padded: make one sample in 8 an all-zero row (zero padding), labelled class 0.
        noisy: give one sample in 10 a random label (label noise: the net grows confidently wrong on them).
    """
    g = seeded_generator(1234)
    centres = torch.randn(2 * CLASSES, FEATURES, generator=g) * 0.6
    cluster = torch.randint(2 * CLASSES, (n,), generator=g)
    x = centres[cluster] + torch.randn(n, FEATURES, generator=g) * 0.6
    y = cluster % CLASSES
    if padded:
        pad = torch.arange(n) % 8 == 0
        x[pad] = 0.0
        y[pad] = 0
    if noisy:
        flip = torch.arange(n) % 10 == 0
        y[flip] = torch.randint(CLASSES, (int(flip.sum()),), generator=g)
    return TensorDataset(x, y)


def image_data(n: int = 1024) -> TensorDataset:
    """``IMAGE_SHAPE`` images: a smooth random template per class (4x4 upsampled), shifted by up to 2 pixels, plus
    noise."""
    g = seeded_generator(4321)
    channels, size, _ = IMAGE_SHAPE
    templates = F.interpolate(torch.randn(CLASSES, channels, 4, 4, generator=g), size=(size, size), mode="bilinear")
    y = torch.randint(CLASSES, (n,), generator=g)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    x = torch.stack([torch.roll(templates[c], (int(s[0]), int(s[1])), dims=(1, 2)) for c, s in zip(y, shifts)])
    x = x + 0.7 * torch.randn(x.shape, generator=g)
    return TensorDataset(x, y)


def sequence_data(n: int = 512) -> TensorDataset:
    """Token sequences from a sparse random Markov chain over ``VOCAB`` tokens: each token is followed by one of 3
    tokens with probabilities 0.7, 0.2, 0.1 (entropy 0.8 nats against ln(32) = 3.47). Inputs and next-token
    targets, ``SEQ_LEN`` each."""
    g = seeded_generator(2468)
    successors = torch.stack([torch.randperm(VOCAB, generator=g)[:3] for _ in range(VOCAB)])
    probs = torch.tensor([0.7, 0.2, 0.1])
    tokens = torch.empty(n, SEQ_LEN + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (n,), generator=g)
    for t in range(SEQ_LEN):
        choice = torch.multinomial(probs, n, replacement=True, generator=g)
        tokens[:, t + 1] = successors[tokens[:, t], choice]
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


_DATA: dict[tuple[str, str | None], TensorDataset] = {}


def dataset(config: RunConfig) -> TensorDataset:
    """The (cached) data set a config trains on."""
    if config.model in LANGUAGE_MODELS:
        key = ("lm", None)
    elif config.model in ("conv", "resnet"):
        key = ("image", None)
    else:
        key = ("vector", config.bad_op)
    if key not in _DATA:
        kind, bad_op = key
        make = {"lm": sequence_data, "image": image_data}.get(
            kind, lambda: classification_data(padded=bad_op == "div", noisy=bad_op == "log"))
        _DATA[key] = make()
    return _DATA[key]


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class L2Normalize(nn.Module):
    """``x / ||x||`` over the last dimension; ``guard`` adds an eps to the norm, without it an all-zero row is 0/0."""

    def __init__(self, guard: bool) -> None:
        super().__init__()
        self.guard = guard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=-1, keepdim=True)
        return x / (norm + 1e-6) if self.guard else x / norm


class CosineHead(nn.Module):
    """Logits ``scale * cos(features, class vector)``: CLIP-like, +-``scale`` at the extremes."""

    def __init__(self, features: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, features) / math.sqrt(features))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


def _norm_layer(norm: str | None, width: int, conv: bool) -> list[nn.Module]:
    if norm is None:
        return []
    if norm == "batchnorm":
        return [nn.BatchNorm2d(width) if conv else nn.BatchNorm1d(width)]
    if norm == "layernorm" and not conv:
        return [nn.LayerNorm(width)]
    raise ValueError(f"norm={norm!r} is not supported for this model")


def build_mlp(config: RunConfig) -> nn.Sequential:
    """``depth`` hidden blocks (Linear, optional norm, activation), then the head; the ``bad_op`` variants put an
    L2 normalisation first ("div") or a cosine head last ("log")."""
    layers: list[nn.Module] = [L2Normalize(config.guard)] if config.bad_op == "div" else []
    features = FEATURES
    for _ in range(config.depth):
        layers += [nn.Linear(features, config.width), *_norm_layer(config.norm, config.width, False)]
        layers.append(ACTIVATIONS[config.activation]())
        features = config.width
    head = CosineHead(features, CLASSES, COSINE_SCALE) if config.bad_op == "log" else nn.Linear(features, CLASSES)
    layers.append(head)
    return nn.Sequential(*layers)


def build_conv(config: RunConfig) -> nn.Sequential:
    """A plain conv net: ``depth`` 3x3 convolutions of ``width`` channels (optional BatchNorm), each followed by the
    activation, then global average pooling and a Linear head."""
    layers: list[nn.Module] = []
    channels = IMAGE_SHAPE[0]
    for _ in range(config.depth):
        layers += [nn.Conv2d(channels, config.width, 3, padding=1), *_norm_layer(config.norm, config.width, True)]
        layers.append(ACTIVATIONS[config.activation]())
        channels = config.width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, CLASSES)]
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """conv-BN-act-conv-BN plus the identity, then the activation."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = ACTIVATIONS[activation]()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(x + self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


def build_resnet(config: RunConfig) -> nn.Sequential:
    """A stem conv with BatchNorm, ``depth`` residual blocks, global average pooling and a Linear head."""
    return nn.Sequential(
        nn.Conv2d(IMAGE_SHAPE[0], config.width, 3, padding=1, bias=False),
        nn.BatchNorm2d(config.width),
        ACTIVATIONS[config.activation](),
        *[ResidualBlock(config.width, config.activation) for _ in range(config.depth)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(config.width, CLASSES),
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written out: one qkv projection, scaled dot products, a mask, a softmax."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.register_buffer("mask", torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~self.mask[:t, :t], float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class TorchAttention(nn.Module):
    """``nn.MultiheadAttention`` with a causal mask."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.register_buffer("mask", torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        return self.attn(x, x, x, attn_mask=self.mask[:t, :t], need_weights=False)[0]


class Block(nn.Module):
    """A transformer block: attention and an MLP (4x wide), each as a residual branch, pre-LN or post-LN."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        d = config.width
        self.post_ln = config.post_ln
        self.ln1 = nn.LayerNorm(d)
        self.attn = TorchAttention(d, HEADS) if config.model == "mha_gpt" else CausalSelfAttention(d, HEADS)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), ACTIVATIONS[config.activation](), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A decoder-only transformer over ``VOCAB`` tokens: token and position embeddings, ``depth`` blocks, a final
    LayerNorm (pre-LN only) and a head, optionally tied to the token embedding."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        d = config.width
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(SEQ_LEN, d)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.ln_f = nn.Identity() if config.post_ln else nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.tied = config.tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return x @ self.tok.weight.T if self.tied else self.head(x)


class RecurrentLM(nn.Module):
    """An embedding, an ``nn.RNN`` (tanh) / ``nn.LSTM`` / ``nn.GRU`` of ``depth`` layers, and a Linear head."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, config.width)
        self.rnn = RECURRENT[config.model](config.width, config.width, num_layers=config.depth, batch_first=True)
        self.head = nn.Linear(config.width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def build_model(config: RunConfig) -> nn.Module:
    """The model a config names, with PyTorch's default init (the WeightInit callbacks apply ``init`` later)."""
    if config.bad_op is not None and config.model != "mlp":
        raise ValueError(f"bad_op={config.bad_op!r} is only planted in the mlp, not in {config.model!r}")
    builders = {"mlp": build_mlp, "conv": build_conv, "resnet": build_resnet, "gpt": GPT, "mha_gpt": GPT}
    if config.model in RECURRENT:
        return RecurrentLM(config)
    return builders[config.model](config)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
