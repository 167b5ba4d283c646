"""Two-alternative forced-choice judges behind one interface, ``prefer(reference, a, b)`` → the
probability that ``a`` is closer to ``reference`` than ``b`` (batched: B×3×H×W in [0, 1] each, B
probabilities out). Stage 3 trains on their judgments and ``evaluate-judge`` measures them against
people. Users pick judges by name in YAML: ``psnr``, ``ms-ssim``, … (full-reference metrics) or
``clip:<hub id or folder>``; a judge is built only when asked for, and one whose weights are absent
raises :class:`Unavailable` with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from pl_modules.features import ClipFidelity
from pl_modules.metrics import METRICS, Unavailable


class Judge(Protocol):
    name: str

    def prefer(self, reference: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """P(a is closer to reference than b), one value in [0, 1] per batch item (ties: 0.5)."""


@dataclass(frozen=True)
class JudgeKind:
    build: Callable[[str], Judge]
    """Builds the judge from the text after ``kind:`` (empty for kinds that take none)."""
    takes_argument: bool = False


JUDGE_KINDS: dict[str, JudgeKind] = {}


def register_judge(name: str, kind: JudgeKind) -> None:
    if name in JUDGE_KINDS:
        raise KeyError(f"judge '{name}' is already registered")
    JUDGE_KINDS[name] = kind


def choices() -> list[str]:
    return sorted(f"{name}:<arg>" if kind.takes_argument else name for name, kind in JUDGE_KINDS.items())


def build_judge(spec: str) -> Judge:
    """The judge ``spec`` names (``name`` or ``name:argument``); Unavailable when it cannot run here."""
    name, _, argument = spec.partition(":")
    kind = JUDGE_KINDS.get(name)
    if kind is None or kind.takes_argument != bool(argument):
        raise ValueError(f"unknown judge '{spec}'; choose from {choices()}")
    return kind.build(argument)


def decide(score_a: float, score_b: float, lower_is_better: bool) -> float:
    if score_a == score_b:
        return 0.5
    return float((score_a < score_b) if lower_is_better else (score_a > score_b))


class MetricJudge:
    """The side a full-reference metric scores better wins."""

    def __init__(self, metric: str):
        self.metric = METRICS[metric]
        why = self.metric.unavailable()
        if why:
            raise Unavailable(why)
        self.name = metric

    def prefer(self, reference: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        votes = [decide(self.metric.compute(a[i: i + 1], reference[i: i + 1]),
                        self.metric.compute(b[i: i + 1], reference[i: i + 1]), self.metric.lower_is_better)
                 for i in range(len(reference))]
        return torch.tensor(votes)


class ClipJudge:
    """The side whose CLIP image embedding is closer (cosine) to the reference's wins."""

    def __init__(self, name_or_path: str):
        self.clip = ClipFidelity(name_or_path)
        self.name = f"clip:{name_or_path}"

    def prefer(self, reference: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ref, ea, eb = self.clip.embed(reference), self.clip.embed(a), self.clip.embed(b)
        return torch.tensor([decide(sa, sb, lower_is_better=False)
                             for sa, sb in zip((ref * ea).sum(-1).tolist(), (ref * eb).sum(-1).tolist())])


def _register_builtin() -> None:
    for name, metric in METRICS.items():
        if metric.reference:
            register_judge(name, JudgeKind(lambda _, name=name: MetricJudge(name)))
    register_judge("clip", JudgeKind(ClipJudge, takes_argument=True))


_register_builtin()
