"""Writing standard artifacts: plain PEFT adapters and merged full weights."""
