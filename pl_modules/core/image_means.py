"""Exact per-image means over ranks: each rank sums the metrics of its own images, then sums and
counts are all-reduced once. (Averaging per-rank means is biased whenever ranks hold different
numbers of images, and a padding sampler would count some images twice.)"""
from __future__ import annotations

import torch


class ImageMeans:
    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.counts = torch.zeros(len(self.names), dtype=torch.float64)

    def add(self, metrics: dict[str, float]) -> None:
        for index, name in enumerate(self.names):
            if name in metrics:
                self.sums[index] += metrics[name]
                self.counts[index] += 1

    def means(self, strategy) -> dict[str, float]:
        totals = strategy.reduce(torch.stack([self.sums, self.counts]).to(strategy.root_device), reduce_op="sum")
        sums, counts = totals.cpu()
        return {name: (sums[i] / counts[i]).item() for i, name in enumerate(self.names) if counts[i] > 0}
