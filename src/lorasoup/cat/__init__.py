"""CAT: learnable concatenation of LoRA adapters (LoRA Soups, https://arxiv.org/abs/2410.13025)."""
