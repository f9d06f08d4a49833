"""Training: supervised data (templates, loss masking, mixing) and LoRA / CAT-weight training.

The built-in prompt formats (fmt1, fmt2, ...) register themselves in ``templates.TEMPLATES``; importing
them with the package makes every template name valid wherever templates are looked up (training,
CAT, eval tasks), without ``templates`` importing ``formats`` back.
"""

from lorasoup.training import formats as _formats  # noqa: F401
