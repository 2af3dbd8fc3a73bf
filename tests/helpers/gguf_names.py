"""What a full-model GGUF of a Llama-style Hugging Face model holds, written out independently
of gguf-py's maps and tunebus's reordering, for tests to compare a written file against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

# llama.cpp's tensor names for the tiny model's Hugging Face ones, written out here so that the
# test does not take gguf-py's map (which the code uses) for granted.
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
IN_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm"}


def llama_cpp_name(hf_name: str) -> str:
    if hf_name in TOP:
        return TOP[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{IN_BLOCK[module]}.{kind}"


def interleave_rope_halves(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: in each head, row 2i is Hugging Face's row i and row 2i+1 its
    row i + d/2 (the two RoPE halves interleaved)."""
    d = rows.shape[0] // heads
    order = [h * d + (i // 2) + (i % 2) * (d // 2) for h in range(heads) for i in range(d)]
    return rows[order]


def expected_tensors(model_dir: Path, config: dict, *, reorder: bool) -> dict[str, np.ndarray]:
    """{llama.cpp name: array} for every tensor of model_dir/model.safetensors."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out = {}
    for name, value in load_file(str(model_dir / "model.safetensors")).items():
        module = name.rsplit(".", 2)[-2]
        if reorder and module in heads:
            value = interleave_rope_halves(value, heads[module])
        out[llama_cpp_name(name)] = value
    return out
