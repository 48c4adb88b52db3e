"""The seed pneumonia CNN: deliberately tiny, so the demo trains it on CPU in seconds."""

from __future__ import annotations

from torch import nn

INPUT_SIZE = 64
CONV_CHANNELS = 32
HIDDEN = 128


class SeedCNN(nn.Sequential):
    """Conv(1→32, 3×3) → ReLU → MaxPool 2×2 → Linear(→128) → ReLU → Linear(→outputs).

    Returns logits; :class:`trainer.architectures.Scorer` adds the sigmoid/softmax so the
    exported graph outputs probabilities, as manifests promise. Its dense head sees positions,
    so it has no class-activation map (the MONAI networks have one).
    Input (N, 1, size, size) float32; output (N, outputs).
    """

    def __init__(self, outputs: int = 1, size: int = INPUT_SIZE, channels: int = 1) -> None:
        pooled = (size - 2) // 2  # 3×3 valid conv, then 2×2 pool: 64 → 62 → 31
        super().__init__(
            nn.Conv2d(channels, CONV_CHANNELS, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(CONV_CHANNELS * pooled * pooled, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, outputs),
        )
