"""A throwaway model for a worker's warm-up: loading it runs the code a job's model load runs.

The first model a process loads pays for imports (transformers' tokenizer and model modules,
mlx-lm's or transformers' model classes, tokenizers, the chat template's jinja), seconds
where a warm load takes tens of milliseconds. A trainer or evaluator loads this one during
start-up, before it answers discovery, so its first job costs what its second does.

What it writes is a complete Hugging Face Llama checkpoint of a few hundred parameters: a
config, safetensors weights (numpy, so no ML library is needed to write it) and a word-level
fast tokenizer with a ChatML template. Nothing here is meant to be trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ["<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "\n"]
HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM = 8, 16, 2, 4
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]


def write_warm_up_model(out_dir: Path) -> Path:
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(WORDS),
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": 1,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "head_dim": HEAD_DIM,
        "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0,
    }
    (out_dir / "config.json").write_text(json.dumps(config))
    save_file(_weights(len(WORDS)), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<pad>", "eos_token": "<|im_end|>",
        "pad_token": "<pad>", "unk_token": "<pad>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": 64}))
    return out_dir


def _weights(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.1, size=shape).astype(np.float32)

    q = HEADS * HEAD_DIM
    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": normal(vocab, HIDDEN),
        p + "self_attn.q_proj.weight": normal(q, HIDDEN), p + "self_attn.k_proj.weight": normal(q, HIDDEN),
        p + "self_attn.v_proj.weight": normal(q, HIDDEN), p + "self_attn.o_proj.weight": normal(HIDDEN, q),
        p + "mlp.gate_proj.weight": normal(INTERMEDIATE, HIDDEN),
        p + "mlp.up_proj.weight": normal(INTERMEDIATE, HIDDEN),
        p + "mlp.down_proj.weight": normal(HIDDEN, INTERMEDIATE),
        p + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
        p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
        "model.norm.weight": np.ones(HIDDEN, np.float32),
        "lm_head.weight": normal(vocab, HIDDEN),
    }
