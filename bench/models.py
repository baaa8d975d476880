"""Benchmark models in plain torch (no torchvision, nothing downloaded), with their inputs and loss.

* ``resnet50``: the standard bottleneck ResNet-50 for 224x224 ImageNet inputs (stride on the
  3x3 convolution, "v1.5"): 25,557,032 parameters in 161 tensors (53 conv weights, 53 batch
  norms with weight and bias, one FC weight and bias). Default batch 64.
* ``gpt2-medium`` (alias ``transformer``): a GPT-2-medium-sized decoder, 24 layers, width
  1024, 16 heads, vocabulary 50257, context 1024, input and output embeddings tied:
  354,823,168 parameters in 292 tensors (:func:`gpt2_param_count`). Default batch 8 x 1024.
* ``small``: a small CNN on 32x32 RGB inputs (conv, FC and norm/bias tensors, about 0.2 M
  parameters) for CPU runs. Default batch 32.
* ``mlp``: a 1024-2048-2048-10 perceptron, 6,316,042 parameters in 6 tensors, whose step is
  a few milliseconds of compute for 25 MB of gradients: the communication-bound case of
  ``bench.step_times``. Default batch 64.

:data:`MODELS` maps each name to a :class:`ModelSpec`: ``spec.build()`` makes the model (use
``with torch.device("meta"):`` to count parameters without memory), ``spec.batch(model_batch,
device)`` random inputs and targets, ``spec.loss(model, batch)`` the training loss.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


# ---- ResNet-50 ------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4; projection shortcut when the
    shape changes."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with bottleneck blocks: images [B, 3, H, W] -> logits [B, classes]."""

    def __init__(self, blocks=(3, 4, 6, 3), classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, in_ch = [], 64
        for i, n in enumerate(blocks):
            width = 64 * 2**i
            stage = []
            for j in range(n):
                stage.append(Bottleneck(in_ch, width, stride=2 if (j == 0 and i > 0) else 1))
                in_ch = width * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(in_ch, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet50(classes: int = 1000) -> ResNet:
    return ResNet((3, 4, 6, 3), classes)


# ---- GPT-2 medium -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    layers: int = 24
    width: int = 1024
    heads: int = 16
    vocab: int = 50257
    context: int = 1024


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.c_attn = nn.Linear(cfg.width, 3 * cfg.width)
        self.c_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.c_fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.c_proj = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Pre-norm decoder with learned positions and tied embeddings: ids [B, T] -> logits [B, T, V]."""

    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.width)
        self.wpe = nn.Embedding(cfg.context, cfg.width)
        self.h = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt2_medium() -> GPT:
    return GPT(GPTConfig())


def gpt2_param_count(cfg: GPTConfig = GPTConfig()) -> int:
    """Parameters of :class:`GPT` by formula: embeddings ``(V + C) d``, per layer ``12 d^2 + 13 d``
    (qkv 3d^2+3d, projection d^2+d, MLP 8d^2+5d, two norms 4d), final norm ``2 d``."""
    d = cfg.width
    return (cfg.vocab + cfg.context) * d + cfg.layers * (12 * d * d + 13 * d) + 2 * d


# ---- small CNN --------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Three conv+BN layers and two FC layers: [B, 3, 32, 32] -> [B, classes] (~0.2 M params)."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


# ---- MLP --------------------------------------------------------------------------------------


class MLP(nn.Module):
    """``[B, inputs] -> [B, classes]`` through ReLU hidden layers of ``hidden`` widths."""

    def __init__(self, inputs: int = 1024, hidden: tuple = (2048, 2048), classes: int = 10):
        super().__init__()
        widths = (inputs, *hidden)
        layers = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Linear(widths[-1], classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _vector_batch(inputs: int, classes: int):
    def make(n: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, inputs, generator=g).to(device), torch.randint(0, classes, (n,), generator=g).to(device)

    return make


# ---- registry -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it, its default batch, random inputs and its loss."""

    name: str
    build: Callable[[], nn.Module]
    default_batch: int
    describe: Callable[[int], str]
    make_batch: Callable[[int, torch.device], tuple]
    loss_fn: Callable[[nn.Module, tuple], Tensor]

    def batch(self, size: int, device) -> tuple:
        return self.make_batch(size, torch.device(device))

    def loss(self, model: nn.Module, batch: tuple) -> Tensor:
        return self.loss_fn(model, batch)


def _image_batch(hw: int, classes: int):
    def make(n: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, hw, hw, generator=g).to(device)
        y = torch.randint(0, classes, (n,), generator=g).to(device)
        return x, y

    return make


def _classify(model: nn.Module, batch: tuple) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _token_batch(n: int, device: torch.device):
    cfg = GPTConfig()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab, (n, cfg.context + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def _lm_loss(model: nn.Module, batch: tuple) -> Tensor:
    ids, targets = batch
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec("resnet50", resnet50, 64, lambda b: f"batch {b}, 3x224x224, 1000 classes",
                          _image_batch(224, 1000), _classify),
    "gpt2-medium": ModelSpec("gpt2-medium", gpt2_medium, 8, lambda b: f"batch {b} x 1024 tokens, vocab 50257",
                             _token_batch, _lm_loss),
    "small": ModelSpec("small", SmallCNN, 32, lambda b: f"batch {b}, 3x32x32, 10 classes",
                       _image_batch(32, 10), _classify),
    "mlp": ModelSpec("mlp", MLP, 64, lambda b: f"batch {b}, 1024 inputs, 10 classes", _vector_batch(1024, 10),
                     _classify),
}
ALIASES = {"transformer": "gpt2-medium", "gpt2": "gpt2-medium", "resnet-50": "resnet50", "cnn": "small"}


def get_model(name: str) -> ModelSpec:
    """The :class:`ModelSpec` called ``name`` (ValueError listing the valid names otherwise)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS) + sorted(ALIASES))}")
    return MODELS[key]


def param_stats(model: nn.Module) -> tuple[int, int]:
    """(parameters, parameter tensors), shared tensors counted once (works on meta tensors)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)


def _check() -> None:  # pragma: no cover - convenience: python -m bench.models
    for name in MODELS:
        with torch.device("meta"):
            n, t = param_stats(MODELS[name].build())
        print(f"{name:<12} {n:>13,} parameters in {t} tensors")
    print(f"{'formula':<12} {gpt2_param_count():>13,} (gpt2-medium), {math.ceil(gpt2_param_count() / 1e6)} M")


if __name__ == "__main__":  # pragma: no cover
    _check()
