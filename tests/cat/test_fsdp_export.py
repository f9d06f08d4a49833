"""Under FSDP2 the CAT weights are a DTensor shard outside forward; after ``gather_`` every process
holds the whole table again, and the exported factors equal the unsharded model's.

Two processes (torchrun, gloo, CPU) shard a tiny CAT Llama per decoder layer and at the root with
``fully_shard``, as accelerate's FSDP2 plugin does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import FSDP_WORKER, FSDP_WORKER_END, torchrun

WORKER = (
    FSDP_WORKER
    + """
from lorasoup.adapters import LoraAdapter, LoraFactors
from lorasoup.options import ExportOptions
from lorasoup.cat.inject import compose_cat
from lorasoup.cat.run import export_factors

model = LlamaForCausalLM(config)
paths = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
g = torch.Generator().manual_seed(1)
adapters = [
    LoraAdapter(name=f"a{i}", source="random", base_model=None, modules={
        p: LoraFactors(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 2.0) for p in paths
    })
    for i in range(2)
]
composition = compose_cat(model, adapters, seed=3)
theta = composition.weights.theta.detach().clone()
reference = export_factors(composition, ExportOptions()).factors
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
sharded = hasattr(composition.weights.theta, "full_tensor")
composition.weights.gather_()
ours = export_factors(composition, ExportOptions()).factors
result = {
    "sharded": sharded,
    "whole": not hasattr(composition.weights.theta, "full_tensor"),
    "theta_equal": torch.equal(composition.weights.theta.detach(), theta),
    "factors_equal": sorted(ours) == sorted(reference) and all(
        torch.equal(ours[p].A, reference[p].A) and torch.equal(ours[p].B, reference[p].B) for p in reference
    ),
}
open(sys.argv[1] + str(dist.get_rank()), "w").write(json.dumps(result))
"""
    + FSDP_WORKER_END
)


def test_fsdp2_sharded_cat_weights_gather_and_export_exactly(tmp_path: Path) -> None:
    script, out = tmp_path / "worker.py", tmp_path / "result"
    script.write_text(WORKER)
    torchrun(str(script), str(out))
    expected = {"sharded": True, "whole": True, "theta_equal": True, "factors_equal": True}
    for rank in (0, 1):
        assert json.loads(Path(f"{out}{rank}").read_text()) == expected
