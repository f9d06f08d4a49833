"""export/peft.py: the written adapter names its base by the canonical name stock PEFT can load."""

import json

import torch

from lorasoup.adapters import LoraFactors
from lorasoup.export.peft import save_peft_adapter


def test_an_alias_is_recorded_as_its_hub_id(tmp_path):
    factors = {"model.layers.0.self_attn.q_proj": LoraFactors(torch.ones(2, 8), torch.ones(8, 2), 1.0)}
    save_peft_adapter(factors, tmp_path, base_model="smollm2-135m")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
