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
