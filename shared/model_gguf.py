"""A Hugging Face model directory (a merged model, or a base model) as one full llama.cpp GGUF
(`llama-cli -m model.gguf`, Ollama's `FROM ./model.gguf`), written with gguf-py's writer,
tensor-name maps and vocabulary loaders.

What llama.cpp loads for the Llama and Qwen2 families (`ARCHITECTURES` in adapter_gguf):

    general.architecture, general.name, general.file_type
    <arch>.context_length, embedding_length, block_count, feed_forward_length,
           attention.head_count, attention.head_count_kv, attention.key_length/value_length,
           attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count, vocab_size
    tokenizer.ggml.model (gpt2: byte-level BPE; llama: SentencePiece-style), .pre, .tokens,
           .token_type, .scores (llama), .merges (gpt2), bos/eos/pad/unk ids, add_bos/add_eos,
           chat_template

Every tensor of the model's safetensors files (one or sharded; never pickle) under gguf-py's
name for it, with the q/k rows of a Llama-family model reordered as adapter_gguf.permute_rows
says (what llama.cpp's converter does for its RoPE). Matrices keep their dtype (float32, float16,
bfloat16); 1-D tensors (norms, biases) are written as float32, as llama.cpp wants them. A vocabulary
shorter than the embedding (Qwen pads it) is padded with unused `[PADn]` tokens so that the
token count equals the embedding's rows, which llama.cpp checks. RoPE scaling other than linear
(llama3's, YaRN) needs extra tensors this writer does not make, and is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from .adapter_gguf import ARCHITECTURES, GgufError, permute_rows
from .adapter_layouts import read_tensors

SUPPORTED = ("llama", "mistral", "qwen2")  # model types whose full layout is written here


def model_to_gguf(model_dir: Path, out_path: Path, *, name: str | None = None) -> Path:
    """Write the Hugging Face causal LM in `model_dir` (config.json, *.safetensors, tokenizer) as
    a full GGUF at `out_path`."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = _config(model_dir)
    arch = ARCHITECTURES[config["model_type"]][0]
    tensors = gguf_tensors(model_dir, config)
    tokens = vocabulary(model_dir, vocab_size=tensors["token_embd.weight"].shape[0])

    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    writer.add_file_type(_file_type(tensors))
    _add_hyperparameters(writer, config)
    writer.add_tokenizer_model(tokens.model)
    writer.add_tokenizer_pre(tokens.pre)
    writer.add_token_list(tokens.tokens)
    writer.add_token_types(tokens.types)
    if tokens.scores is not None:
        writer.add_token_scores(tokens.scores)
    tokens.special.add_to_gguf(writer, quiet=True)
    for tensor_name, data in tensors.items():
        writer.add_tensor(tensor_name, data, raw_dtype=_raw_dtype(data))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return out_path


def gguf_tensors(model_dir: Path, config: dict) -> dict[str, np.ndarray]:
    """{GGUF tensor name: array as written} for every weight in the model's safetensors files."""
    model_dir = Path(model_dir)
    arch, permutes_qk = ARCHITECTURES[config["model_type"]]
    blocks = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), blocks)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GgufError(f"{model_dir}: no *.safetensors weights (pickled weights are never read)")
    out: dict[str, np.ndarray] = {}
    for file in files:
        stored = _stored_dtypes(file)
        for key, value in sorted(read_tensors(file).items()):
            if key.endswith("rotary_emb.inv_freq"):
                continue  # recomputed by llama.cpp from rope.freq_base
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise GgufError(f"{file}: {key} has no GGUF name for {arch}")
            data = np.asarray(value)
            if permutes_qk and key.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                data = permute_rows(data, heads if ".q_proj." in key else kv_heads)
            if data.ndim == 1 or data.dtype not in (np.float16, np.float32):
                data = data.astype(np.float32)
            elif stored[key] == "BF16":
                # numpy has no bfloat16: read as float32 (exact), written back as bfloat16 bytes
                data = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.BF16)
            out[target] = np.ascontiguousarray(data)
    if "token_embd.weight" not in out:
        raise GgufError(f"{model_dir}: no token embedding (model.embed_tokens.weight)")
    return out


def _raw_dtype(data: np.ndarray) -> gguf.GGMLQuantizationType | None:
    """gguf_tensors' bfloat16 matrices are their bytes (uint8); the rest say their own dtype."""
    return gguf.GGMLQuantizationType.BF16 if data.dtype == np.uint8 else None


def _stored_dtypes(file: Path) -> dict[str, str]:
    """{tensor: safetensors dtype} from the file's JSON header."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _file_type(tensors: dict[str, np.ndarray]) -> int:
    matrices = [t for t in tensors.values() if t.ndim > 1]
    if any(t.dtype == np.uint8 for t in matrices):
        return gguf.LlamaFileType.MOSTLY_BF16
    if any(t.dtype == np.float16 for t in matrices):
        return gguf.LlamaFileType.MOSTLY_F16
    return gguf.LlamaFileType.ALL_F32


def _add_hyperparameters(writer: gguf.GGUFWriter, config: dict) -> None:
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise GgufError(f"{path}: no such file (not a Hugging Face model directory)")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise GgufError(f"{path}: model_type {model_type!r} has no full-model GGUF layout here "
                        f"(known: {', '.join(SUPPORTED)})")
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "linear"):
        raise GgufError(f"{path}: rope_scaling type {kind!r} needs llama.cpp's rope_freqs tensors, "
                        "which this writer does not make; use llama.cpp's convert_hf_to_gguf.py")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "vocab_size"):
        if key not in config:
            raise GgufError(f"{path}: {key} is missing")
    return config


class Vocabulary:
    """What the tokenizer.ggml.* keys hold, loaded with gguf-py's vocab classes."""

    def __init__(self, model: str, pre: str, tokens: list, types: list[int], scores: list[float] | None,
                 special: gguf.SpecialVocab):
        self.model, self.pre, self.tokens, self.types = model, pre, tokens, types
        self.scores, self.special = scores, special


def vocabulary(model_dir: Path, *, vocab_size: int) -> Vocabulary:
    """The model's tokens padded to `vocab_size` (the embedding's rows): a byte-level BPE
    tokenizer as llama.cpp's `gpt2` model with its merges, else a SentencePiece-style
    tokenizer.json (byte fallback) as its `llama` model with scores."""
    model_dir = Path(model_dir)
    try:
        vocab: gguf.vocab.Vocab = gguf.vocab.BpeVocab(model_dir)
        model, merges = "gpt2", True
    except FileNotFoundError:
        try:
            vocab = gguf.vocab.LlamaHfVocab(model_dir)
        except (FileNotFoundError, ImportError) as e:
            raise GgufError(f"{model_dir}: no tokenizer gguf-py can read as byte-level BPE or "
                            f"SentencePiece-style tokenizer.json ({e})") from None
        model, merges = "llama", False
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    for token_id, kind in _added_token_types(model_dir).items():
        if token_id < len(types):
            types[token_id] = kind
    if len(tokens) > vocab_size:
        raise GgufError(f"{model_dir}: the tokenizer has {len(tokens)} tokens but the embedding "
                        f"only {vocab_size} rows")
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    special = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=len(tokens))
    return Vocabulary(model, _pre_tokenizer(model_dir), tokens, types,
                      None if model == "gpt2" else scores, special)


def _added_token_types(model_dir: Path) -> dict[int, int]:
    """{token id: GGUF token type} for tokenizer.json's added tokens: special ones are control
    tokens, the others user-defined (gguf-py's BPE vocab marks tokens inside the vocab as normal)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return {}
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
    return {int(t["id"]): int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
            for t in added}


def _pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's name for the pre-tokenizer: GPT-2's plain byte-level split when that is what
    tokenizer.json has, Qwen2's for Qwen2 models, else llama.cpp's default."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") == "qwen2":
        return "qwen2"
    path = model_dir / "tokenizer.json"
    pre = (json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}) if path.is_file() else {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"
