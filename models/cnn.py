"""The small Fashion-MNIST classifier from the PyTorch TensorBoard tutorial."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FashionCNN(nn.Module):
    """LeNet-style CNN for 1x28x28 images: two 5x5 convolutions with max-pooling, three
    fully connected layers, ReLU. Returns logits of shape (N, 10); 44,426 parameters.

    Layer names follow the tutorial (conv1, pool, conv2, fc1, fc2, fc3) so model graphs
    show the same blocks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a (N, 1, 28, 28) batch to (N, 10) logits."""
        # Skipped while tracing (model graphs): traced sizes are tensors, not ints.
        if not torch.jit.is_tracing() and (x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28)):
            raise ValueError(f"FashionCNN expects input of shape (N, 1, 28, 28), got {tuple(x.shape)}")
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        # flatten (not view): the activations may be channels-last, hence non-contiguous.
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


CNN = FashionCNN
