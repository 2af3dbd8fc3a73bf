"""The tiny model generator: deterministic bytes, HF layout, and loadable by mlx-lm."""

import hashlib
import json
from pathlib import Path

from safetensors import safe_open
from tunebus.shared.devstack.tinymodel import generate_tiny_model, main

EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
}


def _digests(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model_dir.iterdir()}


def test_writes_the_hugging_face_file_set(tiny_model):
    assert {p.name for p in tiny_model.iterdir()} == EXPECTED_FILES


def test_same_seed_gives_byte_identical_files(tiny_model, tmp_path):
    again = generate_tiny_model(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_model)


def test_other_seed_changes_the_weights_but_not_the_tokenizer(tiny_model, tmp_path):
    other = _digests(generate_tiny_model(tmp_path / "other", seed=1))
    same = _digests(tiny_model)
    assert other["model.safetensors"] != same["model.safetensors"]
    assert other["tokenizer.json"] == same["tokenizer.json"]


def test_config_describes_a_small_untied_llama(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert 1000 <= config["vocab_size"] <= 2000


def test_weights_use_hf_llama_names_shapes_and_pt_metadata(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    with safe_open(str(tiny_model / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").shape == (vocab, hidden)
        assert f.get_tensor("lm_head.weight").shape == (vocab, hidden)
        assert f.get_tensor("model.layers.1.self_attn.k_proj.weight").shape == (32, hidden)
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").shape == (hidden, 128)
        embed_std = float(f.get_tensor("model.embed_tokens.weight").std())
        assert 0.9 * hidden**-0.5 < embed_std < 1.1 * hidden**-0.5  # fan-in scaled
        assert (f.get_tensor("model.norm.weight") == 1.0).all()
    per_layer = [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        "input_layernorm", "post_attention_layernorm",
    ]
    expected = {f"model.layers.{n}.{m}.weight" for n in range(2) for m in per_layer}
    expected |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert names == expected


def test_loads_with_mlx_lm_and_runs_forward_and_generate(tiny_model):
    import mlx.core as mx
    from mlx_lm import generate, load

    model, tokenizer = load(str(tiny_model))
    ids = tokenizer.encode("Where is the ball? The ball is in the house.")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), tokenizer.vocab_size)
    assert bool(mx.isfinite(logits).all())
    text = generate(model, tokenizer, "The cat likes", max_tokens=5)
    assert isinstance(text, str) and text


def test_tokenizer_round_trips_arbitrary_bytes(tiny_model):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model))
    text = "Hello wörld! 123 — ünïcode ☃"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_template_renders_chatml_with_generation_prompt(tiny_model):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_token_ids


def test_cli_writes_a_model_directory(tmp_path):
    main([str(tmp_path / "cli"), "--seed", "3"])
    assert {p.name for p in (tmp_path / "cli").iterdir()} == EXPECTED_FILES
