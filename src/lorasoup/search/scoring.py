"""Score candidate weightings of a CAT composition on a few target examples.

A candidate is an effective weight table ``w (G, K)``. Its loss is the mean cross-entropy over the
response tokens of the k target examples (labels ``-100`` elsewhere), exactly what a causal LM's
``model(**batch).loss`` gives for those k examples in one batch. The search minimises
``loss + l1 · mean |w|`` (LoraHub's regulariser, https://arxiv.org/abs/2307.13269).

:func:`score_population` scores P candidates in one forward of ``P·k`` rows through the population
override of the CAT layers (``CatComposition.population``: rows ``b`` use candidate ``b // k``).
:func:`score_one_at_a_time` is LoraHub's way, one forward of k rows per candidate through the normal
CAT path: the reference for tests and the benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lorasoup.cat.inject import CatComposition
from lorasoup.training.data import IGNORE_INDEX, collate


@dataclass(frozen=True)
class TargetBatch:
    """``k`` tokenised target examples, right-padded: ``input_ids``, ``attention_mask``, ``labels (k, T)``."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def target_batches(
    examples: Sequence[Mapping[str, list[int]]],
    *,
    pad_token_id: int,
    device: torch.device | str,
    examples_per_batch: int | None = None,
) -> list[TargetBatch]:
    """Collate the examples once (all in one batch unless ``examples_per_batch`` is set) on ``device``."""
    size = examples_per_batch or len(examples)
    batches = []
    for start in range(0, len(examples), size):
        columns = collate(list(examples[start : start + size]), pad_token_id=pad_token_id)
        batches.append(TargetBatch(**{key: value.to(device) for key, value in columns.items()}))
    return batches


def forward_split(examples: int, candidates: int, rows_per_forward: int | None) -> tuple[int, int]:
    """``(examples per batch, candidates per forward)`` for scoring ``examples`` target examples.

    By default one forward holds ``candidates`` candidates × all the examples; ``rows_per_forward``
    caps the rows (candidates × examples) of one forward: fewer candidates at a time, and when even
    one candidate's examples are too many, the examples split over several batches too.
    """
    per_batch = min(examples, rows_per_forward or examples)
    return per_batch, max(1, (rows_per_forward or per_batch * candidates) // per_batch)


def token_loss_sums(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the summed next-token cross-entropy over supervised positions, and their count.

    ``logits (N, T, V)``, ``labels (N, T)`` (unshifted, ``-100`` = ignored) → ``(N,)``, ``(N,)``. The
    loss is computed in float32 whatever the logits' dtype, as transformers' causal-LM loss does.
    """
    targets = labels[:, 1:]  # (N, T-1)
    per_token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)  # (N, T-1); 0 where ignored
    return per_token.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def l1_penalty(weights: Tensor, l1: float) -> Tensor:
    """``l1 · mean |w|`` per candidate: ``weights (P, G, K)`` → ``(P,)`` (LoraHub's L1 term)."""
    return l1 * weights.abs().flatten(1).mean(-1)


@torch.no_grad()
def score_population(
    composition: CatComposition,
    batches: Sequence[TargetBatch],
    weights: Tensor,
    *,
    candidates_per_forward: int | None = None,
) -> Tensor:
    """Mean response-token loss of each candidate ``weights (P, G, K)`` → ``(P,)`` float32 on the CPU.

    Each forward holds ``m`` candidates × one batch of examples (``m = candidates_per_forward``,
    default all P): the batch is repeated candidate-major, ``(m·k, T)``, and the CAT layers give
    row block ``j`` candidate ``j``'s weights.
    """
    population = weights.shape[0]
    chunk = candidates_per_forward or population
    loss_sum = torch.zeros(population, dtype=torch.float64)
    tokens = torch.zeros(population, dtype=torch.float64)
    for batch in batches:
        for start in range(0, population, chunk):
            group = weights[start : start + chunk]  # (m, G, K)
            m = group.shape[0]
            with composition.population(group):
                logits = composition.model(
                    input_ids=batch.input_ids.repeat(m, 1),  # (m·k, T): rows b use candidate b // k
                    attention_mask=batch.attention_mask.repeat(m, 1),
                    use_cache=False,
                ).logits  # (m·k, T, V)
            sums, counts = token_loss_sums(logits, batch.labels.repeat(m, 1))  # (m·k,)
            loss_sum[start : start + m] += sums.double().view(m, batch.size).sum(-1).cpu()
            tokens[start : start + m] += counts.double().view(m, batch.size).sum(-1).cpu()
    return (loss_sum / tokens).float()


@torch.no_grad()
def score_one_at_a_time(
    composition: CatComposition, batches: Sequence[TargetBatch], weights: Tensor
) -> Tensor:
    """The same losses as :func:`score_population`, one candidate per forward through θ (``free`` only).

    θ is restored afterwards.
    """
    if composition.weights.parameterisation != "free":
        raise ValueError("one-at-a-time scoring sets θ = w, which needs parameterisation='free'")
    theta = composition.weights.theta
    saved = theta.detach().clone()
    losses = []
    try:
        for w in weights:  # (G, K)
            theta.copy_(w)
            loss_sum, tokens = 0.0, 0
            for batch in batches:
                logits = composition.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits  # (k, T, V)
                sums, counts = token_loss_sums(logits, batch.labels)
                loss_sum += float(sums.double().sum())
                tokens += int(counts.sum())
            losses.append(loss_sum / tokens)
    finally:
        theta.copy_(saved)
    return torch.tensor(losses, dtype=torch.float32)
