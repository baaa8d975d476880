"""Models for the launchers: the layer kinds the papers compress (conv, FC, LSTM)."""
from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    """Fully-connected classifier: [B, in_dim] -> [B, classes]."""

    def __init__(self, in_dim: int, classes: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv classifier for 8x8 digits: [B, 1, 8, 8] -> [B, classes]."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class CharLSTM(nn.Module):
    """Character-level language model: ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, vocab: int, embed: int = 64, hidden: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids))
        return self.head(out)


class TinyTransformerLM(nn.Module):
    """Decoder-only (causal) character transformer: ids [B, T] (T <= context) -> logits
    [B, T, vocab].

    Token and learned position embeddings of ``width``, ``layers`` pre-norm blocks (causal
    self-attention with ``heads`` heads, GELU MLP of ``4 * width``), a final LayerNorm and
    an untied output projection: the GPT-2 layout, scaled down. Its tensors are the kinds a
    compressor meets in today's language models: 2-D attention and MLP weights (compressed),
    LayerNorm weights (below ``min_compress_numel``: sent uncompressed). ``bias=False`` (the
    default) drops every bias, as PaLM does (Chowdhery et al., "PaLM: Scaling Language
    Modeling with Pathways", JMLR 2023): half as many tensors, so a simulated step costs
    about half as much in per-tensor exchange overhead, with the same weight matrices.
    """

    def __init__(self, vocab: int, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64,
                 bias: bool = False):
        super().__init__()
        import torch

        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        nn.init.normal_(self.pos, std=0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True, bias=bias)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width, bias=bias)
        self.head = nn.Linear(width, vocab, bias=bias)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.embed(ids) + self.pos[:t]
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))
