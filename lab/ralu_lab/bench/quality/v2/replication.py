"""The replication check of ``ralu-bench quality``: does a verdict made on all seeds hold on
each half of them?

Every verdict is recomputed on the two halves of the seeds
(:func:`ralu_lab.bench.quality.v2.stats.split_halves`: sorted, alternating), with the same
pairs cluster bootstrap.  A verdict that names a winner on all seeds (a *claim*) *replicates*
when in each half the winner is better by the point estimate and the half does not name the
other row better at 95 %; it replicates *strictly* when both halves name the winner at 95 %.
The share is replicated claims over claims.
"""

from __future__ import annotations

from collections.abc import Iterable

from ralu_lab.bench.quality.v2.schema import Half, ReplicatedVerdict, Replication, ReplicationGroup, Verdict
from ralu_lab.bench.quality.v2.stats import DIRECTION
from ralu_lab.testbed.v2.metrics import NOT_SEPARABLE

DEFINITION = ("a verdict that names a winner on all seeds replicates when, on each half of the seeds (sorted, alternating), the winner is "
              "better by the point estimate and the half does not name the other row better at 95 %; strictly when both halves name "
              "the winner at 95 %")


def winner(v: Verdict) -> str | None:
    """The row a verdict names better, None when not separable."""
    if v.verdict == NOT_SEPARABLE:
        return None
    name = v.verdict.removesuffix(" better")
    if name not in (v.a, v.b):
        raise ValueError(f"verdict {v.verdict!r} names neither {v.a!r} nor {v.b!r}")
    return name


def points_to(half: Half, v: Verdict, name: str) -> bool:
    """Whether ``name`` (row a or b of ``v``) is better by the half's point estimate (a tie points nowhere)."""
    if half.difference == 0.0:
        return False
    a_better = (half.difference > 0.0) == DIRECTION[v.metric]
    return a_better == (name == v.a)


def judge(v: Verdict) -> tuple[bool, bool]:
    """(replicated, strict) for a claim with its halves (ValueError for a verdict that claims nothing or has no halves)."""
    name = winner(v)
    if name is None:
        raise ValueError(f"{v.a} vs {v.b} on {v.metric} names no winner: there is nothing to replicate")
    if len(v.halves) != 2:
        raise ValueError(f"{v.a} vs {v.b} on {v.metric} has {len(v.halves)} halves, not 2")
    other = v.b if name == v.a else v.a
    replicated = all(points_to(h, v, name) and h.verdict != f"{other} better" for h in v.halves)
    strict = all(h.verdict == f"{name} better" for h in v.halves)
    return replicated, strict


def share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def replication(verdicts: Iterable[Verdict], halves: tuple[list[int], list[int]], unit: str) -> Replication:
    """The replication entry of the report from every verdict made (each with its halves)."""
    made = list(verdicts)
    claims = []
    for v in made:
        if winner(v) is None:
            continue
        replicated, strict = judge(v)
        claims.append(ReplicatedVerdict(arch=v.arch, budget=v.budget, question=v.question, metric=v.metric, a=v.a, b=v.b, verdict=v.verdict,
                                        difference=v.difference, low=v.low, high=v.high, halves=v.halves, replicated=replicated, strict=strict))
    groups = []
    # question by question (in the order they were asked), metrics in the order they came
    questions, metric_order = list(dict.fromkeys(v.question for v in made)), list(dict.fromkeys(v.metric for v in made))
    for question, metric in sorted({(v.question, v.metric) for v in made}, key=lambda pair: (questions.index(pair[0]), metric_order.index(pair[1]))):
        mine = [c for c in claims if (c.question, c.metric) == (question, metric)]
        replicated = sum(c.replicated for c in mine)
        groups.append(ReplicationGroup(question=question, metric=metric, verdicts=sum((v.question, v.metric) == (question, metric) for v in made),
                                       claimed=len(mine), replicated=replicated, strict=sum(c.strict for c in mine), share=share(replicated, len(mine))))
    replicated, strict = sum(c.replicated for c in claims), sum(c.strict for c in claims)
    return Replication(definition=DEFINITION, halves=[list(h) for h in halves], unit=unit, verdicts=len(made), claimed=len(claims), replicated=replicated,
                       strict=strict, share=share(replicated, len(claims)), strict_share=share(strict, len(claims)), groups=groups, claims=claims)
