"""``cat.init_from``: CAT starts from saved weights (a search's or another CAT run's), spread over groups."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasoup.adapters import load_adapter
from lorasoup.cat.config import CatOptions, CatRunConfig
from lorasoup.cat.inject import compose_cat, start_from_file, weights_from_file
from lorasoup.cat.run import run_cat
from lorasoup.errors import ConfigError
from lorasoup.options import AdapterRef, DataConfig, FitOptions


@pytest.fixture
def adapters(make_lora):
    return [load_adapter(make_lora("a", r=4, seed=1)), load_adapter(make_lora("b", r=2, seed=2))]


def compose(llama_dir, adapters, granularity, parameterisation="free"):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    return compose_cat(model, adapters, granularity=granularity, parameterisation=parameterisation)


def write_table(path, composition, w):
    payload = {
        "adapters": composition.adapter_names,
        "granularity": composition.granularity,
        "weights": composition.weights_table(w),
        "modules": {site.path: composition.group_names[site.group] for site in composition.sites},
    }
    path.write_text(json.dumps(payload))
    return path


def test_coarse_weights_spread_over_finer_groups(tmp_path, llama_dir, adapters):
    layer = compose(llama_dir, adapters, "layer")
    w = torch.tensor([[0.5, -1.0], [1.25, 0.25]])
    path = write_table(tmp_path / "w.json", layer, w)
    module = compose(llama_dir, adapters, "module")
    start_from_file(module, path)
    for site in module.sites:
        expected = w[int(site.path.split(".")[2])]
        assert torch.equal(module.effective_weights()[site.group], expected)
    assert torch.equal(module.initial_weights(), module.effective_weights())  # θ0 moved too


def test_finer_weights_that_differ_within_a_group_are_refused(tmp_path, llama_dir, adapters):
    module = compose(llama_dir, adapters, "module")
    w = torch.arange(len(module.group_names) * 2, dtype=torch.float32).view(-1, 2)
    path = write_table(tmp_path / "w.json", module, w)
    with pytest.raises(ConfigError, match="share group 'global'"):
        weights_from_file(path, compose(llama_dir, adapters, "global"))


def test_softmax_takes_simplex_weights_only(tmp_path, llama_dir, adapters):
    source = compose(llama_dir, adapters, "global")
    simplex = write_table(tmp_path / "s.json", source, torch.tensor([[0.25, 0.75]]))
    target = compose(llama_dir, adapters, "layer", parameterisation="softmax")
    start_from_file(target, simplex)
    torch.testing.assert_close(target.effective_weights(), torch.tensor([[0.25, 0.75]] * 2))
    signed = write_table(tmp_path / "n.json", source, torch.tensor([[1.2, -0.4]]))
    with pytest.raises(ConfigError, match=r"cat\.parameterisation: free"):
        start_from_file(compose(llama_dir, adapters, "layer", parameterisation="softmax"), signed)


def test_bad_weight_files_are_one_line_errors(tmp_path, llama_dir, adapters):
    composition = compose(llama_dir, adapters, "global")
    with pytest.raises(ConfigError, match="does not exist"):
        weights_from_file(tmp_path / "missing.json", composition)
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a weights table"):
        weights_from_file(tmp_path / "junk.json", composition)
    other = write_table(tmp_path / "w.json", composition, torch.tensor([[1.0, 2.0]]))
    payload = json.loads(other.read_text())
    payload["adapters"] = ["a", "z"]
    payload["weights"]["global"] = {"a": 1.0, "z": 2.0}
    other.write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match="no weights for adapter"):
        weights_from_file(other, composition)


def test_run_cat_starts_from_init_from(tmp_path, llama_dir, adapters):
    source = compose(llama_dir, adapters, "global")
    path = write_table(tmp_path / "w.json", source, torch.tensor([[0.7, -0.3]]))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"add {i} 1", "output": str(i + 1)} for i in range(4)]))
    config = CatRunConfig(
        base_model=str(llama_dir),
        adapters=[AdapterRef(a.source, name=a.name) for a in adapters],
        data=DataConfig(train=[str(data)], template="plain", cutoff_len=32),
        output=str(tmp_path / "out"),
        cat=CatOptions(parameterisation="free", init_from=str(path)),
        train=FitOptions(max_steps=1, batch_size=4, learning_rate=1e-3, device="cpu"),
    )
    run_cat(config)
    saved = json.loads((tmp_path / "out" / "cat_weights.json").read_text())
    for row in saved["initial_weights"].values():
        assert row == pytest.approx({"a": 0.7, "b": -0.3})
