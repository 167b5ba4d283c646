"""Two-alternative forced-choice judges behind one interface, ``prefer(reference, a, b)`` → the
probability that ``a`` is closer to ``reference`` than ``b`` (batched: B×3×H×W in [0, 1] each, B
probabilities out). Stage 3 trains on their judgments and ``evaluate-judge`` measures them against
people. Users pick judges by name in YAML: ``psnr``, ``ms-ssim``, … (full-reference metrics) or
``clip:<hub id or folder>``, ``vlm:<hub id or folder>`` or ``served:<model>@<base url>``
(pl_modules/scoring/vlm_judges.py); a judge is built only when asked for, and one whose weights are absent
raises :class:`Unavailable` with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from pl_modules.scoring.features import ClipFidelity
from pl_modules.scoring.metrics import METRICS, Unavailable
from pl_modules.scoring.vlm_judges import LocalVLMJudge, ServedVLMJudge


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
    """1 when a scores better, 0 when b does, ½ for a tie, NaN (no vote) when a score is undefined
    (MS-SSIM below its minimum size, say)."""
    if math.isnan(score_a) or math.isnan(score_b):
        return float("nan")
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
        reference, a, b = reference.cpu().float(), a.cpu().float(), b.cpu().float()  # the metric's models live on the CPU
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
        ref, ea, eb = (self.clip.embed(x.cpu().float()) for x in (reference, a, b))  # CLIP lives on the CPU
        return torch.tensor([decide(sa, sb, lower_is_better=False)
                             for sa, sb in zip((ref * ea).sum(-1).tolist(), (ref * eb).sum(-1).tolist())])


COMBINATIONS = ("agree", "ensemble")


class CombinedJudge:
    """Judges as one, to cut reward noise: ``agree`` keeps a pair only where every judge picks the
    same side (otherwise NaN: no vote), ``ensemble`` takes the weighted mean of their probabilities;
    then a pair within ``margin`` of ½ is no vote either. ``agreement`` is the fraction of the last
    batch on which the judges agreed."""

    def __init__(self, judges: list[Judge], combine: str = "agree", weights: list[float] | None = None,
                 margin: float = 0.0):
        if combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {COMBINATIONS}, got '{combine}'")
        if weights and len(weights) != len(judges):
            raise ValueError(f"{len(weights)} weights for {len(judges)} judges")
        self.judges, self.combine, self.margin = judges, combine, margin
        self.weights = torch.tensor(weights or [1.0] * len(judges))
        self.name = f"{combine}({', '.join(j.name for j in judges)})"
        self.agreement = float("nan")

    @property
    def failures(self) -> int:
        """Failed judgments of the judges that count them (served VLMs)."""
        return sum(getattr(judge, "failures", 0) for judge in self.judges)

    def prefer(self, reference: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        votes = torch.stack([judge.prefer(reference, a, b).float() for judge in self.judges])  # judges × batch
        sides = torch.sign(votes - 0.5)
        agree = (sides == sides[:1]).all(0) & torch.isfinite(votes).all(0)
        self.agreement = agree.float().mean().item()
        if self.combine == "agree":
            out = torch.where(agree, votes[0], torch.full_like(votes[0], float("nan")))
        else:
            out = (self.weights[:, None] * votes).sum(0) / self.weights.sum()
        return torch.where((out - 0.5).abs() < self.margin, torch.full_like(out, float("nan")), out)


@dataclass
class JudgingConfig:
    judge: str = "psnr"
    """The judge whose 2AFC choices count: a VLM (vlm:<folder>, served:<model>@<url>) where one is
    available, or an offline full-reference metric standing in for one."""
    also_judges: list[str] = field(default_factory=list)
    """More judges combined with it (e.g. lpips beside a VLM, as the VLIC paper ensembles them)."""
    combine: str = "agree"
    """agree (a pair counts only where every judge picks the same side) or ensemble (weighted mean)."""
    weights: list[float] = field(default_factory=list)
    """Ensemble weights, one per judge (empty: equal)."""
    margin: float = 0.0
    """Drop a pair whose combined probability is within this of ½ (an unsure judgment)."""

    def __post_init__(self) -> None:
        if self.combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {COMBINATIONS}, got '{self.combine}'")


def build_combined(cfg: JudgingConfig) -> Judge:
    """One judge from the config; a single judge with no margin is that judge itself."""
    judges = [build_judge(spec) for spec in [cfg.judge, *cfg.also_judges]]
    if len(judges) == 1 and not cfg.margin:
        return judges[0]
    return CombinedJudge(judges, cfg.combine, list(cfg.weights) or None, cfg.margin)


def _register_builtin() -> None:
    for name, metric in METRICS.items():
        if metric.reference:
            register_judge(name, JudgeKind(lambda _, name=name: MetricJudge(name)))
    register_judge("clip", JudgeKind(ClipJudge, takes_argument=True))
    register_judge("vlm", JudgeKind(LocalVLMJudge, takes_argument=True))
    register_judge("served", JudgeKind(ServedVLMJudge, takes_argument=True))


_register_builtin()
