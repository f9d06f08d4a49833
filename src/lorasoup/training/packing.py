"""Packing: concatenate tokenised examples end to end and cut the stream into fixed-length blocks.

Short examples (and long raw-text paragraphs) then fill every row of a batch, with no padding and no
truncation: continued pre-training on a manual or a textbook (the paper's "knowledge" skills) sees
every token once per epoch. This is the "concatenate and chunk" recipe of transformers' ``run_clm``
example: a block may start or end mid-example, and attention runs across example boundaries (each
example ends in EOS, which marks the boundary to the model). Loss masks travel with their tokens, so
prompt tokens stay unsupervised unless ``train_on_inputs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lorasoup.errors import ConfigError
from lorasoup.training.data import IGNORE_INDEX


def pack_examples(
    examples: Sequence[Mapping[str, Sequence[int]]], block_size: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Concatenate ``input_ids``/``labels`` of all examples, in order, into blocks of ``block_size`` tokens.

    Every block has exactly ``block_size`` tokens except possibly the last (the remainder, kept so no
    token is lost; the collator pads it). A block none of whose labels is supervised teaches nothing
    and is dropped. Returns ``(blocks, dropped_blocks)``; ``attention_mask`` is all ones.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"packing block size must be an integer >= 2, got {block_size!r}")
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        ids.extend(example["input_ids"])
        labels.extend(example["labels"])
    blocks, dropped = [], 0
    for start in range(0, len(ids), block_size):
        block_labels = labels[start : start + block_size]
        # Position 0's label is never predicted (causal shift), so it alone does not count.
        if all(label == IGNORE_INDEX for label in block_labels[1:]):
            dropped += 1
            continue
        block_ids = ids[start : start + block_size]
        blocks.append(
            {"input_ids": block_ids, "attention_mask": [1] * len(block_ids), "labels": block_labels}
        )
    return blocks, dropped
