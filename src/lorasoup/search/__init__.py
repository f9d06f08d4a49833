"""Gradient-free search of per-adapter weights (LoraHub-style, https://arxiv.org/abs/2307.13269).

A whole population of candidate weightings is scored in one batched forward through the CAT layers
(``scoring``), CMA-ES proposes the next (``optimise``), and the best weights become a plain PEFT
adapter that can also warm-start CAT training (``run``). ``layer_swap`` scores a small family of
layer-swap rules the same way and ``layer_swap_run`` exports the best (``lorasoup search --layer-swap``).
"""
