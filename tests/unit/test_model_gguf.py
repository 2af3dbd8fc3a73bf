"""A Hugging Face model directory as a full llama.cpp GGUF, read back with gguf-py: every tensor
under llama.cpp's name with the Hugging Face values (q/k rows reordered for the Llama family),
the architecture's hyperparameters, and the tokenizer token for token."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from gguf import GGUFReader
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer
from typer.testing import CliRunner

from tests.helpers.gguf_names import expected_tensors
from tunebus.shared.adapter_gguf import GgufError
from tunebus.shared.model_gguf import model_to_gguf

def read_back(path):
    reader = GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


@pytest.fixture(scope="module")
def gguf_file(tiny_model, tmp_path_factory):
    return model_to_gguf(tiny_model, tmp_path_factory.mktemp("model-gguf") / "model.gguf", name="tiny")


@pytest.fixture(scope="module")
def converted(gguf_file):
    return read_back(gguf_file)


def test_every_tensor_is_the_models_under_its_llama_cpp_name_with_q_and_k_rows_reordered(
        converted, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    _, tensors = converted
    want = expected_tensors(tiny_model, config, reorder=True)
    assert sorted(tensors) == sorted(want) and len(want) == 3 + 9 * config["num_hidden_layers"]
    for name, value in want.items():
        found = np.asarray(tensors[name].data)
        assert found.dtype == np.float32 and found.shape == value.shape, name
        assert np.array_equal(found, value), name
    q = load_file(str(tiny_model / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), q)  # reordered indeed


def test_the_architecture_and_the_tokenizer_are_in_the_metadata(converted, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    fields, _ = converted
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["general.name"] == "tiny" and fields["general.file_type"] == 0  # all float32
    expected = {
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.dimension_count": config["head_dim"],
        "llama.vocab_size": config["vocab_size"],
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(config["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])

    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(tokens) == tokenizer.get_vocab_size() == config["vocab_size"]
    assert tokens == [tokenizer.id_to_token(i) for i in range(len(tokens))]
    merges = json.loads((tiny_model / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    special = json.loads((tiny_model / "special_tokens_map.json").read_text())
    for key, token in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        assert fields[f"tokenizer.ggml.{key}_token_id"] == tokenizer.token_to_id(special[token]), key
    control = [i for i, kind in enumerate(fields["tokenizer.ggml.token_type"]) if kind == 3]
    assert control == [0, 1, 2]  # <|endoftext|>, <|im_start|>, <|im_end|>: control tokens
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in fields["tokenizer.chat_template"]


def test_transformers_gguf_loader_reads_it_back_as_the_same_model(gguf_file, tiny_model):
    """transformers' own GGUF reader (llama.cpp's layout, undone: names, q/k order, tokenizer from
    the metadata) gives the same token ids and the same logits as the Hugging Face directory."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from_gguf = {"pretrained_model_name_or_path": str(gguf_file.parent), "gguf_file": gguf_file.name}
    text = "<|im_start|>user\nhello there, how are you?<|im_end|>\n"
    ids = AutoTokenizer.from_pretrained(str(tiny_model))(text).input_ids
    assert AutoTokenizer.from_pretrained(**from_gguf)(text).input_ids == ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)(
            torch.tensor([ids])).logits
        found = AutoModelForCausalLM.from_pretrained(**from_gguf, dtype=torch.float32)(
            torch.tensor([ids])).logits
    assert torch.equal(found, want)


def test_a_bfloat16_model_keeps_its_matrices_in_bfloat16(tiny_model, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    model = tmp_path / "bf16"
    shutil.copytree(tiny_model, model)
    weights = load_file(str(model / "model.safetensors"))
    save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in weights.items()},
               str(model / "model.safetensors"))
    fields, tensors = read_back(model_to_gguf(model, tmp_path / "model.gguf"))
    assert fields["general.file_type"] == 32  # LlamaFileType.MOSTLY_BF16
    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type.name == "BF16" and list(embedding.shape) == [64, 1024]
    words = np.asarray(embedding.data).view(np.uint16).reshape(1024, 64)
    bf16 = torch.from_numpy(weights["model.embed_tokens.weight"]).to(torch.bfloat16).view(torch.int16)
    assert np.array_equal(words, bf16.numpy().view(np.uint16))
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_a_qwen2_model_keeps_its_q_and_k_rows_and_its_biases(tiny_model, tmp_path):
    model = tmp_path / "qwen2"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text()) | {"model_type": "qwen2",
                                                                   "architectures": ["Qwen2ForCausalLM"]}
    (model / "config.json").write_text(json.dumps(config))
    weights = load_file(str(model / "model.safetensors"))
    rng = np.random.default_rng(1)
    for n in range(config["num_hidden_layers"]):
        for proj, rows in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
            weights[f"model.layers.{n}.self_attn.{proj}.bias"] = rng.normal(size=rows).astype(np.float32)
    save_file(weights, str(model / "model.safetensors"))
    fields, tensors = read_back(model_to_gguf(model, tmp_path / "model.gguf"))
    assert fields["general.architecture"] == "qwen2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert "qwen2.attention.head_count_kv" in fields
    want = expected_tensors(model, config, reorder=False)
    assert sorted(tensors) == sorted(want) and "blk.1.attn_k.bias" in want
    for name, value in want.items():
        assert np.array_equal(np.asarray(tensors[name].data), value), name


def test_a_model_it_cannot_write_faithfully_is_refused_saying_why(tiny_model, tmp_path):
    def variant(name, config_change=None, drop_weights=False):
        model = tmp_path / name
        shutil.copytree(tiny_model, model)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | (config_change or {})))
        if drop_weights:
            (model / "model.safetensors").rename(model / "pytorch_model.bin")
        return model

    cases = [
        (variant("gemma", {"model_type": "gemma"}), "model_type 'gemma' has no full-model GGUF layout"),
        (variant("llama3", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
         "rope_scaling type 'llama3' needs llama.cpp's rope_freqs"),
        (variant("pickle", drop_weights=True), r"no \*.safetensors weights"),
        (tmp_path / "missing", "config.json: no such file"),
    ]
    for model, message in cases:
        with pytest.raises(GgufError, match=message):
            model_to_gguf(model, tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()



def test_tunebus_model_gguf_writes_a_local_model_directory_and_names_what_it_refuses(tiny_model, tmp_path):
    from tunebus.shared.cli import app

    result = CliRunner().invoke(app, ["model", "gguf", str(tiny_model), str(tmp_path / "tiny.gguf")])
    assert result.exit_code == 0, result.output
    _, tensors = read_back(tmp_path / "tiny.gguf")
    assert "blk.1.ffn_down.weight" in tensors
    result = CliRunner().invoke(app, ["model", "gguf", str(tmp_path), str(tmp_path / "x.gguf")])
    assert result.exit_code == 1 and "config.json: no such file" in " ".join(result.output.split())
