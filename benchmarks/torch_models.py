"""The seeds' networks in PyTorch, for the BackPACK comparisons (the ``compare`` extra)."""

from __future__ import annotations


def backpack_cnn():
    """BackPACK's example CNN (``zoo.make_model("backpack-cnn")`` in flax), PyTorch's default
    initialisation: Conv 20 - pool - Conv 50 - pool - Dense 500 - Dense 10, ReLU."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 20, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2, 2),
        torch.nn.Conv2d(20, 50, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2, 2),
        torch.nn.Flatten(),
        torch.nn.Linear(800, 500),
        torch.nn.ReLU(),
        torch.nn.Linear(500, 10),
    )
