"""Mixture of LoRA experts: per-token routers gate frozen skill LoRAs (a baseline to CAT).

``layer`` (router, fused gated layer, balancing loss) · ``inject`` (compose onto a model) · ``train``
(train the routers) · ``io`` (save / load) · ``distill`` (mean gates → CAT weights) · ``run`` (CLI runs).
"""
