"""Save / load: identical logits after the round trip; referenced adapters are checked; damaged artifacts."""

import json

import pytest
import torch

from lorasoup.errors import AdapterError, LorasoupError
from lorasoup.moe.io import MOE_CONFIG, load_moe, save_moe
from tests.moe.test_inject import perturb_routers

IDS = torch.tensor([[1, 5, 9, 14, 20, 7], [1, 3, 3, 8, 2, 11]])


@pytest.mark.parametrize(("granularity", "top_k", "copy"), [("module", None, True), ("layer", 1, False)])
def test_round_trip_gives_identical_logits(compose, llama_dir, tmp_path, granularity, top_k, copy):
    composition = compose(granularity=granularity, top_k=top_k)
    perturb_routers(composition, seed=5)
    out = save_moe(composition, tmp_path / "moe", base_model=str(llama_dir), copy_adapters=copy)
    config = json.loads((out / MOE_CONFIG).read_text())
    assert config["router"] == {"granularity": granularity, "top_k": top_k, "renormalize": False}
    assert [a["copied"] for a in config["adapters"]] == [copy, copy]
    assert (out / "adapters").is_dir() == copy
    loaded = load_moe(out)
    assert loaded.group_names == composition.group_names and loaded.adapter_names == ["math", "code"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(IDS).logits, composition.model.eval()(IDS).logits, atol=0, rtol=0
        )


def test_a_referenced_adapter_that_changed_is_refused(compose, llama_dir, tmp_path, adapter_dirs):
    out = save_moe(compose(), tmp_path / "moe", base_model=str(llama_dir), copy_adapters=False)
    weights = adapter_dirs["code"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(AdapterError, match="changed since the MoE was trained"):
        load_moe(out)


def test_damaged_artifacts_fail_in_one_line(compose, llama_dir, tmp_path):
    with pytest.raises(LorasoupError, match=r"no moe_config\.json"):
        load_moe(tmp_path)
    out = save_moe(compose(), tmp_path / "moe", base_model=str(llama_dir))
    config = json.loads((out / MOE_CONFIG).read_text())
    (out / MOE_CONFIG).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(LorasoupError, match="format_version 99 is not supported"):
        load_moe(out)
    (out / MOE_CONFIG).write_text(json.dumps(config))
    (out / "router.safetensors").unlink()
    with pytest.raises(LorasoupError, match=r"no router\.safetensors"):
        load_moe(out)
