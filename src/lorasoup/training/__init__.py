"""Training: supervised data (templates, loss masking, mixing) and LoRA / CAT-weight training."""
