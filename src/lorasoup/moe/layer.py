"""Per-token gating of frozen skill LoRAs: the router, the fused gated layer and the balancing loss.

For one adapted module with frozen base ``W0`` and adapters ``i = 1..K`` (``A_i (r_i×in)``,
``B_i (out×r_i)``, scale ``s_i``), a mixture of LoRA experts computes, for every token ``x``::

    y = W0 x + Σ_i g_i(h) · s_i · B_i A_i x

where ``g(h) (K,)`` are gates computed by a router from a hidden state ``h``: the module's own input
(``h = x``, one router per module, as mergoo's LoRA MoE) or the transformer block's input (one router
per block shared by its modules). The router is linear, ``l = W_r h + b_r`` (``W_r (K, in)``), and:

* **soft** gating: ``g = softmax(l)``, every adapter on every token (dense, as MoLE / X-LoRA);
* **top-k** gating: exactly k non-zero gates per token, on the adapters with the k largest logits.
  By default each keeps its full-softmax probability, ``g_i = softmax(l)_i`` for ``i ∈ TopK(l)``
  (Switch Transformer, eq. 2, for k = 1; k = K is soft gating). ``renormalize=True`` instead takes
  the softmax over the k chosen logits (Shazeer et al. 2017, https://arxiv.org/abs/1701.06538,
  KeepTopK then softmax; Mixtral), whose gates sum to 1 but which gives a top-1 router no gradient
  from the model's loss (the softmax of one logit is 1), so that combination is refused.

With the router's weight at zero, its bias alone gives token-independent gates ``softmax(b_r)``,
which is CAT's softmax parameterisation: the router strictly generalises CAT's static weights.

As in CAT (``lorasoup.cat.layer``) the adapters are never looped over: with ``A = [A_1; …; A_K] (R×in)``,
``B = [B_1 … B_K] (out×R)`` and the per-token, per-rank coefficients
``c (…, R) = (g ⊙ s)[owner]`` (each rank row takes its adapter's gate times scale)::

    y = W0 x + B (c ⊙ (A x))

two GEMMs whatever K is. A, B are frozen buffers; only the routers train.

**Load balancing** (Switch Transformer, Fedus et al. 2021, https://arxiv.org/abs/2101.03961, eqs. 4–6,
with top-k assignments counted as in GShard/Mixtral and normalised by k)::

    f_i = (1 / (k·T)) Σ_t 1[i ∈ TopK(l_t)]        fraction of the T tokens' k slots given to adapter i
    P_i = (1 / T)     Σ_t softmax(l_t)_i          mean router probability of adapter i
    L_balance = K · Σ_i f_i · P_i

Only real tokens count (``T`` = tokens with attention mask 1). ``L_balance = 1`` for perfectly
uniform routing; ``f`` is not differentiable, so the gradient flows through ``P`` (as in Switch).
Soft gating has no dispatch, so ``f`` counts each token's top-1 adapter (``k = 1``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorasoup.cat.layer import store_fused_factors
from lorasoup.errors import ModelError


class RouterRecord(NamedTuple):
    """What one router call saw, kept while recording (training loss, distillation).

    Shapes: ``logits (…, K)`` float32, ``gates (…, K)``, ``chosen (…, k)`` adapter indices.
    """

    group: int
    logits: Tensor
    gates: Tensor
    chosen: Tensor


def route(logits: Tensor, top_k: int | None, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """Gates from router logits: ``logits (…, K)`` → ``(gates (…, K), chosen (…, k))``.

    ``top_k=None``: soft gates ``softmax(logits)``; ``chosen`` is the argmax (k = 1), for the
    balancing statistics. ``top_k=k``: the k largest logits' full-softmax probabilities (or, with
    ``renormalize``, the softmax over those k logits), zeros elsewhere. Ties go to the lower index,
    as ``torch.topk`` breaks them.
    """
    if top_k is None:
        return torch.softmax(logits, dim=-1), logits.argmax(dim=-1, keepdim=True)
    values, chosen = logits.topk(top_k, dim=-1)  # (…, k)
    source = values if renormalize else logits
    kept = torch.softmax(source, dim=-1)
    kept = kept if renormalize else kept.gather(-1, chosen)  # (…, k)
    return torch.zeros_like(logits).scatter(-1, chosen, kept), chosen


def load_balancing_loss(
    logits: Tensor, chosen: Tensor, mask: Tensor | None = None, *, num_adapters: int | None = None
) -> Tensor:
    """Switch Transformer's auxiliary loss ``K · Σ_i f_i · P_i`` (module docstring) for one router.

    ``logits (T, K)``, ``chosen (T, k)`` long, ``mask (T,)`` (1 = real token, 0 = padding; None: all
    real). Returns a float32 scalar, differentiable through ``P``. With no real token it is 0.
    """
    K = num_adapters or logits.shape[-1]
    weight = torch.ones(logits.shape[0], device=logits.device) if mask is None else mask.float()
    tokens = weight.sum().clamp(min=1.0)
    probs = torch.softmax(logits.float(), dim=-1)  # (T, K)
    P = (weight[:, None] * probs).sum(0) / tokens  # (K,)
    counts = F.one_hot(chosen, K).float().sum(-2)  # (T, K): how many of its k slots each adapter got
    f = (weight[:, None] * counts).sum(0) / (tokens * chosen.shape[-1])  # (K,)
    return K * (f * P).sum()


class TokenRouter(nn.Module):
    """``l = W h + b`` in float32 (routers are precision-sensitive: Switch keeps them in float32), then
    :func:`route`. Shapes: ``weight (K, in)``, ``bias (K,)``; input ``(…, in)`` → gates ``(…, K)``.

    ``tape``: while it is a list, every call appends a :class:`RouterRecord` (set by
    ``MoeComposition.recording``). ``current``: the gates a block-level router computed for the block
    now running (``granularity="layer"``), read by that block's gated layers.
    """

    def __init__(
        self, weight: Tensor, bias: Tensor, top_k: int | None, group: int, renormalize: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float())
        self.top_k = top_k
        self.renormalize = renormalize
        self.group = group
        self.tape: list[RouterRecord] | None = None
        self.current: Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, hidden: Tensor) -> Tensor:
        # .float() is a no-op for the float32 router, and keeps it working if the model is cast later
        logits = F.linear(hidden.float(), self.weight.float(), self.bias.float())  # (…, K)
        gates, chosen = route(logits, self.top_k, self.renormalize)
        if self.tape is not None:
            self.tape.append(RouterRecord(self.group, logits, gates, chosen))
        return gates

    def extra_repr(self) -> str:
        adapters, in_features = self.weight.shape
        gating = "soft" if self.top_k is None else f"top-{self.top_k}"
        gating += ", renormalized" if self.renormalize and self.top_k is not None else ""
        return f"in_features={in_features}, adapters={adapters}, gating={gating}, group={self.group}"


def rank_coefficients(gates: Tensor, scales: Tensor, rank_owner: Tensor) -> Tensor:
    """``c (…, R) = (g ⊙ s)[owner]``: each rank row takes its adapter's gate times scale, per token.

    ``gates (…, K)``, ``scales (K,)``, ``rank_owner (R,)`` long.
    """
    return (gates * scales).index_select(-1, rank_owner)


class GatedLoraLinear(nn.Module):
    """A frozen linear module plus the per-token gated, fused LoRA update (module docstring).

    Shapes: ``A (R, in)``, ``B (out, R)``, ``rank_owner (R,)``, ``scales (K,)``. The router is shared
    with the model root (a plain attribute, so it is registered once): with ``shared=False`` it reads
    this module's input; with ``shared=True`` it is the block's router and this module takes the
    gates it left in ``router.current``. ``base`` may be ``nn.Linear`` or GPT-2's ``Conv1D``.
    """

    def __init__(
        self,
        base: nn.Module,
        A: Tensor,
        B: Tensor,
        rank_owner: Tensor,
        scales: Tensor,
        router: TokenRouter,
        *,
        shared: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base = base
        store_fused_factors(self, A, B, rank_owner, scales)
        object.__setattr__(self, "router", router)
        self.shared = shared
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def gates(self, x: Tensor) -> Tensor:
        """``(…, K)`` float32 gates for the tokens of ``x (…, in)``."""
        if not self.shared:
            return self.router(x)
        gates = self.router.current
        if gates is None or gates.shape[:-1] != x.shape[:-1]:
            got = "none" if gates is None else tuple(gates.shape[:-1])
            raise ModelError(
                f"a block-level router's gates ({got}) do not match this module's tokens "
                f"{tuple(x.shape[:-1])}; this model calls the module outside its block: "
                "use router.granularity=module"
            )
        return gates

    def forward(self, x: Tensor) -> Tensor:
        c = rank_coefficients(self.gates(x), self.scales, self.rank_owner).to(x.dtype)  # (…, R)
        z = F.linear(self.dropout(x), self.A) * c  # (…, R)
        return self.base(x) + F.linear(z, self.B)  # (…, out)

    def extra_repr(self) -> str:
        source = "block" if self.shared else "module"
        return f"rank={self.A.shape[0]}, router_group={self.router.group}, router_input={source}"
