"""A PEFT LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora adapter.gguf`,
Ollama's `ADAPTER`), written with gguf-py's writer and tensor-name maps.

What llama.cpp's own `convert_lora_to_gguf.py` writes, for the architectures named in
`ARCHITECTURES`:

    general.architecture   the base model's (llama, qwen2, ...), from its config.json
    general.type           adapter;   adapter.type  lora;   adapter.lora.alpha  lora_alpha
    blk.<i>.<tensor>.weight.lora_a   PEFT's lora_A.weight (r, in)
    blk.<i>.<tensor>.weight.lora_b   PEFT's lora_B.weight (out, r)

gguf-py's maps turn each Hugging Face module path into its GGUF name (`model.layers.0.self_attn.
q_proj` -> `blk.0.attn_q`). llama.cpp stores a Llama-family model's q and k projections with
their rows reordered (its converter permutes them so its RoPE can rotate adjacent pairs), so
their B matrices (whose rows are the output rows) are permuted the same way; A is unchanged.
Tensors are written as float32: the values are PEFT's, exactly. DoRA, rank/alpha patterns and
anything but linear LoRA are refused with the reason (llama.cpp's LoRA GGUF has no place for them).

Needs numpy, safetensors and gguf, no ML framework: the registry writes the copies.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np

from .adapter_layouts import CONFIG, PEFT, PEFT_PREFIX, WEIGHTS, read_tensors

# Hugging Face model_type -> the GGUF architecture llama.cpp loads it as, and whether its
# converter reorders the q/k rows (the Llama family does; Qwen, Gemma, Phi-3 do not).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "gemma": ("gemma", False),
    "gemma2": ("gemma2", False),
    "phi3": ("phi3", False),
}


class GgufError(ValueError):
    """The adapter cannot be written as a llama.cpp LoRA GGUF, and why."""


def peft_to_gguf(peft_dir: Path, out_path: Path, base_config: dict, *, name: str = "adapter") -> Path:
    """Write the PEFT adapter in `peft_dir` for the base model whose config.json is `base_config`."""
    peft_dir, out_path = Path(peft_dir), Path(out_path)
    config = json.loads((peft_dir / CONFIG).read_text())
    arch, tensors = gguf_tensors(peft_dir, base_config)
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _alpha(config))
    writer.add_name(name)
    writer.add_block_count(int(base_config["num_hidden_layers"]))
    for tensor_name, data in tensors.items():
        writer.add_tensor(tensor_name, data)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def gguf_tensors(peft_dir: Path, base_config: dict) -> tuple[str, dict[str, np.ndarray]]:
    """(GGUF architecture, {GGUF tensor name: float32 array}) of the PEFT adapter in peft_dir."""
    peft_dir = Path(peft_dir)
    config = json.loads((peft_dir / CONFIG).read_text())
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise GgufError(f"{peft_dir / CONFIG}: {key} is set; llama.cpp's LoRA GGUF holds plain "
                            "LoRA on linear layers only")
    model_type = base_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise GgufError(f"base model type {model_type!r} has no GGUF mapping here (known: "
                        f"{', '.join(sorted(ARCHITECTURES))})")
    arch, permutes_qk = ARCHITECTURES[model_type]
    blocks = int(base_config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), blocks)
    heads = int(base_config["num_attention_heads"])
    kv_heads = int(base_config.get("num_key_value_heads") or heads)

    out: dict[str, np.ndarray] = {}
    weights = read_tensors(peft_dir / WEIGHTS[PEFT])
    for key in sorted(weights):
        for suffix, part in ((".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b")):
            if key.endswith(suffix):
                break
        else:
            raise GgufError(f"{peft_dir / WEIGHTS['peft']}: {key} is not a lora_A or lora_B weight")
        module = key.removeprefix(PEFT_PREFIX).removesuffix(suffix)
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise GgufError(f"{peft_dir / WEIGHTS['peft']}: {module} has no GGUF name for {arch}")
        data = np.asarray(weights[key], dtype=np.float32)
        if part == "lora_b" and permutes_qk and module.endswith(("q_proj", "k_proj")):
            data = permute_rows(data, heads if module.endswith("q_proj") else kv_heads)
        out[f"{target}.{part}"] = np.ascontiguousarray(data)
    if not out:
        raise GgufError(f"{peft_dir / WEIGHTS['peft']}: no LoRA weights")
    return arch, out


def permute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Each head's rows from Hugging Face's half-split RoPE order to llama.cpp's interleaved
    one: rows (h, 2, d/2) -> (h, d/2, 2), as llama.cpp's converter reorders q_proj/k_proj."""
    per_head = rows.shape[0] // heads
    return (rows.reshape(heads, 2, per_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape))


def _alpha(config: dict) -> float:
    """The alpha llama.cpp scales by (alpha / r); rsLoRA's alpha / sqrt(r) expressed as one."""
    alpha, rank = float(config["lora_alpha"]), int(config["r"])
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha
