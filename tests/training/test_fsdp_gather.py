"""Under FSDP2 the adapter is gathered from the trainable parameters alone, and equals the unsharded one.

Two processes (torchrun, gloo, CPU) shard a tiny PEFT Llama per decoder layer with ``fully_shard``, as
accelerate does, and call ``gathered_state_dict`` with an accelerator that reports FSDP2.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import FSDP_WORKER, FSDP_WORKER_END, torchrun

WORKER = (
    FSDP_WORKER
    + """
import types
from peft import LoraConfig, get_peft_model
from lorasoup.training.skill import adapter_weights, gathered_state_dict

model = LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
reference = {k: v.clone() for k, v in adapter_weights(model.state_dict()).items()}
for layer in model.base_model.model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
state = gathered_state_dict(types.SimpleNamespace(is_fsdp2=True), model)
if dist.get_rank() == 0:
    ours = adapter_weights(state)
    result = {
        "keys": len(state),
        "same_names": sorted(ours) == sorted(reference),
        "equal": all(torch.equal(ours[k], reference[k]) for k in reference),
    }
    open(sys.argv[1], "w").write(json.dumps(result))
"""
    + FSDP_WORKER_END
)


def test_fsdp2_gathers_only_the_lora_factors(tmp_path: Path) -> None:
    script, out = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(WORKER)
    torchrun(str(script), str(out))
    # 2 layers x (q, v) x (A, B): the trainable parameters only, none of the frozen base's.
    assert json.loads(out.read_text()) == {"keys": 8, "same_names": True, "equal": True}
