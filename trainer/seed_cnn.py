"""The seed pneumonia CNN: deliberately tiny, so the demo trains it on CPU in seconds."""

from __future__ import annotations

from torch import nn

INPUT_SIZE = 64
CONV_CHANNELS = 32
HIDDEN = 128


class SeedCNN(nn.Sequential):
    """Conv(1→32, 3×3) → ReLU → MaxPool 2×2 → Linear(→128) → ReLU → Linear(→1) → Sigmoid.

    The sigmoid is inside the graph because manifests promise probabilities, not logits.
    Input (N, 1, 64, 64) float32; output (N, 1) probabilities.
    """

    def __init__(self) -> None:
        pooled = (INPUT_SIZE - 2) // 2  # 3×3 valid conv, then 2×2 pool: 64 → 62 → 31
        super().__init__(
            nn.Conv2d(1, CONV_CHANNELS, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(CONV_CHANNELS * pooled * pooled, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, 1),
            nn.Sigmoid(),
        )
