"""A tiny Llama-style causal LM, made on the spot so tests and demos never need the model hub.

`generate_tiny_model(out_dir, seed=...)` writes a standard Hugging Face model directory that
`mlx_lm.load` (and transformers) can open: config.json, model.safetensors, a byte-level BPE
tokenizer trained here on a built-in corpus, its configs (with a ChatML chat template) and
generation_config.json. The same seed gives byte-identical files, so a test can pin artifacts by
hash. The weights are random: the model speaks nonsense, but it trains, evaluates and generates.

    python -m tunebus.shared.devstack.tinymodel OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# ChatML: the end-of-turn token doubles as EOS so generation stops after an assistant turn.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]  # ids 0, 1, 2

# Tools as Qwen2.5's template writes them (a system block listing each definition as JSON, and an
# assistant's calls as <tool_call> JSON </tool_call>), so tool-calling rows render through it;
# a row without tools renders as plain ChatML.
CHAT_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n# Tools\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' }}{{ call['function'] | tojson }}{{ '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOKENIZER_VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 512


def generate_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the tiny model into `out_dir` (created if missing) and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer()
    config = model_config(vocab_size=tokenizer.get_vocab_size())
    _write_json(out_dir / "config.json", config)
    weights = random_weights(config, seed)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {
        "bos_token": PAD_TOKEN,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": PAD_TOKEN,
    }
    _write_json(out_dir / "special_tokens_map.json", special)
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "additional_special_tokens": [IM_START, IM_END],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MODEL_MAX_LENGTH,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
            "do_sample": False,
            "max_new_tokens": 64,
        },
    )
    return out_dir


def model_config(vocab_size: int) -> dict:
    """HF LlamaForCausalLM config: small enough to train on a laptop CPU in seconds."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(IM_END),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
    }


def random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Normal(0, 1/sqrt(fan_in)) matrices and unit norms, under the tensor names HF Llama checkpoints use.

    Tensors are drawn in a fixed order from one generator, so the seed alone fixes every value.
    """
    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> np.ndarray:
        # Scaled by fan-in (1/sqrt(in_features)), not the 0.02 of large checkpoints: at this
        # width 0.02 leaves logits nearly flat and a LoRA adapter can barely move them.
        return rng.normal(0.0, shape[-1] ** -0.5, size=shape).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(q_out, hidden),
            p + "self_attn.k_proj.weight": normal(kv_out, hidden),
            p + "self_attn.v_proj.weight": normal(kv_out, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_out),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
        }
    weights["model.norm.weight"] = ones(hidden)
    weights["lm_head.weight"] = normal(config["vocab_size"], hidden)
    return weights


def train_tokenizer() -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on `corpus()`; every byte stays encodable.

    The tokenizer does not depend on the seed: one vocabulary for every tiny model.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def corpus() -> list[str]:
    """A few hundred plain English sentences, combined from word lists by fixed strides."""
    sentences = []
    for i in range(480):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        verb = _VERBS[(i * 7) % len(_VERBS)]
        adjective = _ADJECTIVES[(i * 5) % len(_ADJECTIVES)]
        noun = _NOUNS[(i * 11) % len(_NOUNS)]
        when = _TIMES[(i * 3) % len(_TIMES)]
        sentence = f"{subject} {verb} the {adjective} {noun} {when}."
        sentences.append(sentence[0].upper() + sentence[1:])
    for i in range(120):
        noun = _NOUNS[(i * 13) % len(_NOUNS)]
        place = _PLACES[i % len(_PLACES)]
        sentences.append(f"Where is the {noun}? The {noun} is in the {place}.")
    for i in range(200):
        subject = _SUBJECTS[(i * 5) % len(_SUBJECTS)]
        adverb = _ADVERBS[i % len(_ADVERBS)]
        place = _PLACES[(i * 7) % len(_PLACES)]
        noun = _NOUNS[(i * 3) % len(_NOUNS)]
        sentence = f"{subject} walked {adverb} to the {place} with a {noun}."
        sentences.append(sentence[0].upper() + sentence[1:])
    sentences += _FIXED_SENTENCES
    return sentences


def _write_json(path: Path, obj: dict) -> None:
    # Sorted keys and a trailing newline: stable bytes for hashing, clean diffs for people.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_SUBJECTS = [
    "the cat", "a small dog", "my friend", "the teacher", "our neighbour", "the old man",
    "a young girl", "the farmer", "the baker", "the pilot", "the doctor", "a student",
    "the children", "the team", "my sister", "his brother", "the captain", "a writer",
    "the engineer", "the gardener", "her mother", "the driver", "a musician", "the painter",
]
_VERBS = [
    "likes", "sees", "finds", "carries", "paints", "watches", "visits", "remembers", "builds",
    "reads", "follows", "cleans", "opens", "closes", "moves", "fixes", "draws", "buys", "sells",
    "brings", "counts", "washes", "holds", "throws", "catches", "chooses", "describes",
    "measures", "borrows", "returns", "protects", "discovers",
]
_ADJECTIVES = [
    "red", "green", "blue", "yellow", "old", "new", "small", "large", "quiet", "bright",
    "heavy", "light", "wooden", "silver", "golden", "broken", "famous", "strange", "simple",
    "careful", "gentle", "ancient", "modern", "narrow", "empty", "crowded", "frozen", "warm",
    "purple", "orange", "honest", "curious",
]
_NOUNS = [
    "ball", "door", "book", "tree", "coat", "car", "bread", "garden", "letter", "lamp", "chair",
    "window", "river", "mountain", "bridge", "castle", "village", "forest", "island", "kitchen",
    "bottle", "basket", "blanket", "bicycle", "camera", "candle", "carpet", "clock", "cookie",
    "diamond", "dragon", "feather", "guitar", "hammer", "helmet", "jacket", "ladder", "magnet",
    "mirror", "needle", "notebook", "orchestra", "painting", "pencil", "piano", "pillow",
    "pocket", "puzzle", "rabbit", "ribbon", "rocket", "saddle", "sandwich", "scissors",
    "shadow", "shovel", "spoon", "station", "telescope", "ticket", "tomato", "tower", "tunnel",
    "umbrella", "violin", "wagon", "whistle", "wizard", "yogurt", "zebra", "compass", "lantern",
]
_TIMES = [
    "every morning", "on sunday", "after lunch", "at night", "in the spring", "before dinner",
    "today", "once a week", "in the evening", "during winter", "on monday", "every summer",
]
_PLACES = [
    "house", "office", "school", "market", "library", "museum", "harbour", "hospital",
    "theatre", "restaurant", "factory", "laboratory", "cellar", "attic", "garage",
    "airport", "bakery", "beach", "cathedral", "cinema", "courtyard", "desert", "embassy",
    "farmhouse", "gallery", "greenhouse", "lighthouse", "meadow", "orchard", "palace",
    "parliament", "pharmacy", "playground", "stadium", "supermarket", "university", "workshop",
]
_ADVERBS = [
    "slowly", "quickly", "happily", "quietly", "carefully", "proudly", "eagerly", "calmly",
    "bravely", "politely", "suddenly", "nervously", "patiently", "cheerfully", "silently",
    "gracefully", "anxiously", "loudly", "softly", "directly", "finally", "usually",
]
_FIXED_SENTENCES = [
    "What is the capital of France? The capital of France is Paris.",
    "What is the capital of Italy? The capital of Italy is Rome.",
    "What is the capital of Japan? The capital of Japan is Tokyo.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024.",
    "Hello! How are you today? I am fine, thank you.",
    "Please answer the question in one short sentence.",
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees and freezes at zero degrees.",
    "A week has seven days and a year has twelve months.",
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Thank you for your help. You are welcome.",
    "Yes, that is correct. No, that is not correct.",
    "The system prompt tells the assistant how to answer the user.",
    "The user asks a question and the assistant gives an answer.",
    "Each message has a role: system, user or assistant.",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Llama model (HF layout).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(generate_tiny_model(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
