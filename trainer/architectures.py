"""The networks the trainer can build, and the scoring head that goes into the ONNX graph.

* ``seed_cnn``: the seeds' pneumonia CNN (baseline, no class-activation map);
* ``densenet121`` and ``resnet18``: MONAI networks with a one-channel input. Both end in
  global average pooling and one linear layer, so the class-activation map (CAM) is that
  linear layer applied at every position of the last feature map: ``cam[k] = W[k]·F + b[k]``.
  Its spatial mean is exactly the class logit, so the map explains the score it came from.

Heads: ``binary`` and ``multilabel`` end in a sigmoid per label, ``multiclass`` in a softmax
(as in the seeds' MNIST example). Training uses the logits; :class:`Scorer` is what is
exported: probabilities first, the CAM (logit units, shape (N, labels, h, w)) second.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.seed_cnn import SeedCNN

ARCHITECTURES = ("seed_cnn", "densenet121", "resnet18", "tabular_mlp")
TASKS = ("binary", "multilabel", "multiclass")


class GapClassifier(nn.Module):
    """``features`` (N, C, h, w) → global average pool → ``classifier`` → logits."""

    def __init__(self, features: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))

    def cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, class-activation maps) from one pass over the features."""
        features = self.features(x)
        cam = torch.einsum("kc,nchw->nkhw", self.classifier.weight, features)
        cam = cam + self.classifier.bias[None, :, None, None]
        return cam.mean(dim=(2, 3)), cam


def _densenet121(outputs: int, channels: int) -> GapClassifier:
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=2, in_channels=channels, out_channels=outputs)
    # class_layers = relu → pool → flatten → out; keep the ReLU with the features.
    return GapClassifier(nn.Sequential(net.features, nn.ReLU()),
                         net.class_layers.out)  # type: ignore[arg-type]


def _resnet18(outputs: int, channels: int) -> GapClassifier:
    from monai.networks.nets import resnet18

    net = resnet18(spatial_dims=2, n_input_channels=channels, num_classes=outputs)
    stem = [net.conv1, net.bn1, net.act] + ([] if net.no_max_pool else [net.maxpool])
    return GapClassifier(
        nn.Sequential(*stem, net.layer1, net.layer2, net.layer3, net.layer4),
        net.fc)  # type: ignore[arg-type]


def build_network(architecture: str, outputs: int, size: int, channels: int = 1) -> nn.Module:
    """A freshly initialised network returning logits (N, outputs)."""
    if architecture == "seed_cnn":
        return SeedCNN(outputs=outputs, size=size, channels=channels)
    if architecture == "densenet121":
        return _densenet121(outputs, channels)
    if architecture == "resnet18":
        return _resnet18(outputs, channels)
    if architecture == "tabular_mlp":  # metadata models: ``channels`` encoded header values
        from trainer.tabular import tabular_mlp

        return tabular_mlp(channels, outputs)
    raise ValueError(f"unknown architecture {architecture!r}; choose from {ARCHITECTURES}")


def has_cam(network: nn.Module) -> bool:
    return isinstance(network, GapClassifier)


class Scorer(nn.Module):
    """The exported graph: logits → probabilities (sigmoid, or softmax for multiclass), and
    the CAM as a second output for global-pooling networks when ``with_cam``."""

    def __init__(self, network: nn.Module, task: str, with_cam: bool = True) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        self.network, self.task = network, task
        self.with_cam = with_cam and has_cam(network)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1) if self.task == "multiclass" else torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.with_cam:
            assert isinstance(self.network, GapClassifier)
            logits, cam = self.network.cam(x)
            return self._probabilities(logits), cam
        return self._probabilities(self.network(x))
