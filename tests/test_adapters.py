import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasoup.adapters import load_adapter
from lorasoup.compat import check_compatibility
from lorasoup.errors import AdapterError, CompatibilityError
from tests.conftest import make_peft_lora


def peft_delta(base_dir, adapter_dir, module):
    """ΔW of one module as PEFT computes it (merge minus base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    w0 = base.get_submodule(module).weight.detach().clone()
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return merged.get_submodule(module).weight.detach() - w0


def test_factors_and_scale_match_peft(make_lora, llama_dir):
    path = make_lora("a", r=4, alpha=8)
    adapter = load_adapter(path)
    module = "model.layers.1.self_attn.q_proj"
    factors = adapter.modules[module]
    assert factors.scale == 2.0 and factors.rank == 4
    assert factors.A.shape == (4, 32) and factors.B.shape[1] == 4
    torch.testing.assert_close(factors.delta(), peft_delta(llama_dir, path, module), atol=1e-6, rtol=1e-5)
    assert len(adapter.modules) == 2 * 5
    assert adapter.target_names == sorted(["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])


def test_rslora_and_patterns_match_peft(make_lora, llama_dir):
    path = make_lora(
        "p",
        r=4,
        alpha=8,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
    )
    adapter = load_adapter(path)
    q1 = adapter.modules["model.layers.1.self_attn.q_proj"]
    assert q1.scale == pytest.approx(3 / math.sqrt(4))
    v0 = adapter.modules["model.layers.0.self_attn.v_proj"]
    assert v0.rank == 2 and v0.scale == pytest.approx(8 / math.sqrt(2))
    for module in ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]:
        torch.testing.assert_close(
            adapter.modules[module].delta(), peft_delta(llama_dir, path, module), atol=1e-6, rtol=1e-5
        )


def test_gpt2_conv1d_fan_in_fan_out(gpt2_dir, tmp_path):
    path = make_peft_lora(gpt2_dir, tmp_path / "g", targets=["c_attn", "c_fc"], fan_in_fan_out=True)
    adapter = load_adapter(path)
    assert adapter.fan_in_fan_out
    f = adapter.modules["transformer.h.0.attn.c_attn"]
    assert (f.out_features, f.in_features) == (96, 32)
    # PEFT merges (B A)^T into the (in, out) Conv1D weight
    torch.testing.assert_close(
        f.delta().T, peft_delta(gpt2_dir, path, "transformer.h.0.attn.c_attn"), atol=1e-6, rtol=1e-5
    )


def test_bin_weights_load_like_safetensors(make_lora):
    path = make_lora("b")
    reference = load_adapter(path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    torch.save(tensors, path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    again = load_adapter(path)
    for module, f in reference.modules.items():
        assert torch.equal(f.A, again.modules[module].A) and torch.equal(f.B, again.modules[module].B)


def one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.update(use_dora=True), "DoRA"),
        (lambda c: c.update(bias="all"), "bias='all'"),
        (lambda c: c.update(bias="none", lora_bias=True), "trained LoRA biases (lora_bias=True)"),
        (lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda c: c.update(peft_type="IA3"), "IA3"),
    ],
)
def test_unsupported_features_are_named(make_lora, change, expected):
    path = make_lora("u")
    config = json.loads((path / "adapter_config.json").read_text())
    change(config)
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as err:
        load_adapter(path)
    assert expected in one_line(err.value)


def test_dora_magnitude_keys_are_rejected(make_lora):
    path = make_lora("d")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(path)


def test_bad_files(make_lora, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        load_adapter(empty)
    corrupt = make_lora("c")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError) as err:
        load_adapter(corrupt)
    assert "corrupt" in one_line(err.value)
    shapes = make_lora("s")
    tensors = load_file(str(shapes / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(32, 3)
    save_file(tensors, str(shapes / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="mismatched shapes"):
        load_adapter(shapes)


def test_compatibility_report(make_lora, gpt2_dir, tmp_path):
    a = load_adapter(make_lora("a", targets=["q_proj", "v_proj"]), name="a")
    b = load_adapter(make_lora("b", targets=["v_proj", "down_proj"], r=2), name="b")
    report = check_compatibility([a, b])
    assert report.composable
    assert len(report.modules) == 6
    assert report.missing["a"] == [m for m in report.modules if m.endswith("down_proj")]
    assert any("zero block" in n for n in report.notices)

    g = load_adapter(make_peft_lora(gpt2_dir, tmp_path / "g", targets=["c_attn"], fan_in_fan_out=True))
    bad = check_compatibility([a, g])
    assert not bad.composable
    with pytest.raises(CompatibilityError):
        bad.raise_if_incompatible()


def test_base_model_mismatch_and_hidden_size(make_lora, tmp_path):
    a = load_adapter(make_lora("a"), name="a")
    b = load_adapter(make_lora("b"), name="b")
    b.base_model = "someone/else"
    report = check_compatibility([a, b])
    assert "different base models" in report.problems[0]
    assert check_compatibility([a, b], allow_base_mismatch=True).composable
    module = "model.layers.0.self_attn.q_proj"
    f = b.modules[module]
    b.modules[module] = type(f)(A=torch.zeros(f.rank, 16), B=f.B, scale=f.scale)
    assert "hidden sizes differ" in check_compatibility([a, b], allow_base_mismatch=True).problems[0]


def test_base_mismatch_hint_fits_the_command_and_is_left_out_when_sizes_differ(make_lora):
    a = load_adapter(make_lora("a"), name="a")
    b = load_adapter(make_lora("b"), name="b")
    b.base_model = "someone/else"
    assert "--set allow_base_mismatch=true" in check_compatibility([a, b]).problems[0]
    inspect = check_compatibility([a, b], mismatch_hint="--allow-base-mismatch").problems[0]
    assert inspect.endswith("pass --allow-base-mismatch")
    module = "model.layers.0.self_attn.q_proj"
    f = b.modules[module]
    b.modules[module] = type(f)(A=torch.zeros(f.rank, 16), B=f.B, scale=f.scale)
    problems = check_compatibility([a, b]).problems
    assert "hidden sizes differ" in problems[0] and "different base models" in problems[1]
    assert not any("allow_base_mismatch" in p or "--allow-base-mismatch" in p for p in problems)


def test_an_alias_and_its_hub_id_are_one_base_and_another_declared_base_is_a_notice(make_lora, llama_dir):
    a = load_adapter(make_lora("a"), name="a")
    b = load_adapter(make_lora("b"), name="b")
    a.base_model, b.base_model = "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert check_compatibility([a, b]).composable
    b.base_model = "builtin:smollm2-135m"
    report = check_compatibility([a, b], base_model=str(llama_dir))
    assert report.composable
    assert [n for n in report.notices if "declares base model" in n] == [
        f"{name} declares base model 'HuggingFaceTB/SmolLM2-135M-Instruct' but is composed onto "
        f"'{llama_dir.resolve()}'; its shapes fit, but check it was trained on this model"
        for name in ("a", "b")
    ]
