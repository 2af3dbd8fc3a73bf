"""Which adapter layouts an adapter's files hold, and which files make up a download of one.

The trainer stores mlx-lm's layout at the root of the adapter prefix and PEFT's under `peft/`
(a merged model, on request, under `merged/`); the run and evaluation files lie at the root. A
layout is present when its weights and its adapter_config.json both are, in a folder:

    mlx    adapters.safetensors       + adapter_config.json     loaded by mlx_lm.load(..., adapter_path=)
    peft   adapter_model.safetensors  + adapter_config.json     loaded by PeftModel.from_pretrained
    gguf   gguf/adapter.gguf (one file; the registry writes it)  llama.cpp --lora, Ollama ADAPTER

A full fine-tune (adapter.type full) is no adapter but a whole model, in the Hugging Face layout
under `full/`, and is named like a layout so that registry, downloads and evaluator treat it as
one:

    full   full/config.json + full/model.safetensors (or its shards' index), tokenizer files
                                                          AutoModelForCausalLM.from_pretrained,
                                                          mlx_lm.load

The registry serves downloads by layout with these names; the evaluator fetches the layout its
backend reads, and converts when it has only the other one.

## Conversion: mlx_to_peft, peft_to_mlx

LoRA and DoRA adapters convert between mlx-lm's layout and PEFT's, both ways, exactly.

Both libraries compute the same function of the same numbers; only names, layouts and one
constant's spelling differ:

    mlx-lm (adapters.safetensors)          PEFT (adapter_model.safetensors)
    <module>.lora_a  (in, r)               base_model.model.<module>.lora_A.weight  (r, in)
    <module>.lora_b  (r, out)              base_model.model.<module>.lora_B.weight  (out, r)
    <module>.m       (out,)      DoRA      base_model.model.<module>.lora_magnitude_vector  (out,)

    LoRA:  y = W x + s * B A x        s = lora_parameters.scale (mlx-lm) = lora_alpha / r (PEFT)
    DoRA:  y = m / ||W + s B A||_row * (W x + s B A x) + bias

DoRA is exact in both directions: mlx-lm's `m` and PEFT's `lora_magnitude_vector` are the same
learned per-output-row magnitude (both start as the row norms of W and are trained directly; both
divide by the detached row norm of the adapted weight at run time), so the vector is copied as is.

`<module>` is the module path inside the causal LM (`model.layers.0.self_attn.q_proj`): mlx-lm keeps
the Hugging Face names for the Llama, Qwen, Mistral, Gemma and Phi families, which is what makes
the mapping a rename. Only adapters on linear layers convert; embedding LoRA, mixture-of-experts
(3-D) LoRA, PEFT's `modules_to_save`, trained biases, `alpha_pattern` and non-LoRA PEFT methods
are refused with the reason. PEFT's `rank_pattern` and rsLoRA do convert: per-module ranks are
zero-padded to the largest and per-module scales folded into B, which leaves B A unchanged.

Converting needs only numpy and safetensors, so the MLX side runs without torch and the PEFT side
without mlx; they are imported when a conversion runs, so that naming the layouts needs no ML
stack (the registry runs without one). A bfloat16 file (a QLoRA adapter) is read through torch or
mlx, whichever is installed, and written as float32 (exact).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

MLX, PEFT, FULL = "mlx", "peft", "full"  # the layouts' names, as TrainingCompleted.layouts says them
CONFIG = "adapter_config.json"
WEIGHTS = {MLX: "adapters.safetensors", PEFT: "adapter_model.safetensors"}
MLX_WEIGHTS, PEFT_WEIGHTS = WEIGHTS[MLX], WEIGHTS[PEFT]
MLX_CONFIG = PEFT_CONFIG = CONFIG
PEFT_DIR = "peft"  # the PEFT copy's folder in an adapter prefix
MERGED_DIR = "merged"  # the merged model's folder, on request
FULL_DIR = "full"  # the whole model of a full fine-tune
MODEL_CONFIG = "config.json"  # a Hugging Face model directory's files, as in merged/ and full/
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards
GGUF_DIR = "gguf"  # the llama.cpp LoRA GGUF copy's folder, written at registration
GGUF_FILE = "adapter.gguf"
MERGED_GGUF_FILE = "model.gguf"  # the merged model as one full GGUF, written where it is downloaded
# The run files beside the adapter.
TRAINING_ARGS = "training_args.json"
METRICS = "metrics.json"
LOSS_CURVE = "loss_curve.json"
LOSS_PLOT = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"  # the run's TensorBoard event files, when the request asked


def adapter_prefix(adapters_bucket: str, adapter_name: str, job_id: str) -> str:
    """Where a job's adapter lives, and the only place the registry accepts one from."""
    return f"s3://{adapters_bucket}/{adapter_name}/{job_id}"


FOLDERS = ("", f"{PEFT_DIR}/")  # where tunebus writes layouts, the root first


def layouts(names: list[str]) -> dict[str, str]:
    """{layout: folder} for every layout whose files are among `names` (paths in the prefix)."""
    present = set(names)
    found: dict[str, str] = {}
    for folder in FOLDERS:
        for layout, weights in WEIGHTS.items():
            if layout not in found and {folder + weights, folder + CONFIG} <= present:
                found[layout] = folder
    if f"{GGUF_DIR}/{GGUF_FILE}" in present:
        found["gguf"] = f"{GGUF_DIR}/"
    full = f"{FULL_DIR}/"
    if full + MODEL_CONFIG in present and any(full + w in present for w in MODEL_WEIGHTS):
        found[FULL] = full
    return found


def layout_files(names: list[str], folder: str) -> dict[str, str]:
    """{name in the download: name in the prefix} for the layout in `folder`: its files, and the
    root's run and evaluation files, all in one flat directory; no other layout's adapter files,
    nothing from another folder (not merged/*)."""
    adapter_files = {*WEIGHTS.values(), CONFIG}
    run_files = {name: name for name in names if "/" not in name and name not in adapter_files}
    in_folder = {
        name.removeprefix(folder): name for name in names
        if name.startswith(folder) and "/" not in name.removeprefix(folder)
    }
    return run_files | in_folder


PEFT_PREFIX = "base_model.model."

# A module inside a numbered block: "model.layers.12.self_attn.q_proj" -> prefix, 12, relative path.
_IN_BLOCK = re.compile(r"^(?P<prefix>.*?\blayers)\.(?P<index>\d+)\.(?P<rel>.+)$")
_MLX_SUFFIXES = {"lora_a": "a", "lora_b": "b", "m": "m"}
_PEFT_SUFFIXES = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_magnitude_vector": "m"}


class AdapterFormatError(ValueError):
    """The adapter cannot be converted exactly; the message names the file and what is wrong."""


def mlx_to_peft(src_dir: Path, dst_dir: Path, *, base_model: str) -> Path:
    """Write the mlx-lm adapter in src_dir as a PEFT adapter directory in dst_dir.

    `base_model` is recorded as PEFT's `base_model_name_or_path` (a hub id, path or s3:// URI);
    `PeftModel.from_pretrained(model, dst_dir)` does not need it to be resolvable.
    """
    import numpy as np
    from safetensors.numpy import save_file

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config = _read_json(src_dir / MLX_CONFIG)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise AdapterFormatError(
            f"{src_dir / MLX_CONFIG}: fine_tune_type {kind!r} is not an adapter (lora or dora)")
    params = config.get("lora_parameters") or {}
    for key in ("rank", "scale"):
        if key not in params:
            raise AdapterFormatError(f"{src_dir / MLX_CONFIG}: lora_parameters.{key} is missing")
    rank, scale = int(params["rank"]), float(params["scale"])

    modules = _group(_read_tensors(src_dir / MLX_WEIGHTS), _MLX_SUFFIXES, src_dir / MLX_WEIGHTS)
    use_dora = kind == "dora"
    tensors = {}
    for path, parts in modules.items():
        a, b = _lora_pair(parts, path, src_dir / MLX_WEIGHTS, use_dora=use_dora)
        if a.shape[1] != rank or b.shape[0] != rank:
            raise AdapterFormatError(f"{src_dir / MLX_WEIGHTS}: {path} has rank "
                                     f"{a.shape[1]}/{b.shape[0]} (lora_a/lora_b), "
                                     f"lora_parameters.rank is {rank}")
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(b.T)
        if use_dora:
            tensors[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = parts["m"]

    target_modules, layers = _peft_targets(list(modules))
    alpha = scale * rank
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": int(alpha) if alpha == int(alpha) else alpha,
        "lora_dropout": float(params.get("dropout", 0.0)),
        "use_dora": use_dora,
        "use_rslora": False,
        "target_modules": target_modules,
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    dst_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    _write_json(dst_dir / PEFT_CONFIG, peft_config)  # last: a directory with a config is complete
    return dst_dir


def peft_to_mlx(src_dir: Path, dst_dir: Path, *, num_hidden_layers: int | None = None) -> Path:
    """Write the PEFT LoRA/DoRA adapter in src_dir as an mlx-lm adapter directory in dst_dir.

    mlx-lm adapts "the last num_layers blocks". When the adapter starts at block 0 that is
    `-1` (all, mlx-lm's own spelling); otherwise the model's block count is needed: pass
    `num_hidden_layers`, or let it be read from `base_model_name_or_path` when that is a local
    model directory.
    """
    import numpy as np
    from safetensors.numpy import save_file

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config = _read_json(src_dir / PEFT_CONFIG)
    _check_peft_config(config, src_dir / PEFT_CONFIG)
    use_dora = bool(config.get("use_dora"))
    weights_file = src_dir / PEFT_WEIGHTS
    tensors = {}
    for name, value in _read_tensors(weights_file).items():
        if not name.startswith(PEFT_PREFIX):
            raise AdapterFormatError(f"{weights_file}: tensor {name!r} does not start with "
                                     f"{PEFT_PREFIX!r} (not a causal-LM PEFT adapter)")
        tensors[name.removeprefix(PEFT_PREFIX)] = value
    modules = _group(tensors, _PEFT_SUFFIXES, weights_file)

    # The transposed pairs, each with the scale PEFT applies to that module.
    alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
    pairs = {}
    for path, parts in modules.items():
        a, b = _lora_pair(parts, path, weights_file, use_dora=use_dora, peft=True)
        if a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"{weights_file}: {path} has lora_A rank {a.shape[0]} but "
                                     f"lora_B rank {b.shape[1]}")
        r = a.shape[0]
        pairs[path] = (a.T, b.T, alpha / (math.sqrt(r) if rslora else r))

    rank = max(a.shape[1] for a, _, _ in pairs.values())
    scale = alpha / (math.sqrt(config["r"]) if rslora else config["r"])
    out = {}
    for path, (a, b, module_scale) in pairs.items():
        # mlx-lm has one rank and one scale: pad A and B with zeros (B A unchanged) and fold this
        # module's scale into B. With a uniform rank nothing is touched, so the copy is bit-exact.
        pad = rank - a.shape[1]
        if pad:
            a = np.pad(a, ((0, 0), (0, pad)))
            b = np.pad(b, ((0, pad), (0, 0)))
        if module_scale != scale:
            b = (b.astype(np.float64) * (module_scale / scale)).astype(b.dtype)
        out[f"{path}.lora_a"] = np.ascontiguousarray(a)
        out[f"{path}.lora_b"] = np.ascontiguousarray(b)
        if use_dora:
            out[f"{path}.m"] = modules[path]["m"]

    num_layers, keys = _mlx_layers_and_keys(list(modules), config, num_hidden_layers, src_dir)
    mlx_config = {
        "fine_tune_type": "dora" if use_dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": float(config.get("lora_dropout") or 0.0),
            "keys": keys,
        },
        "lora_alpha": alpha,
        "model": config.get("base_model_name_or_path"),
        "converted_from": "peft",
    }
    dst_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst_dir / MLX_WEIGHTS), metadata={"format": "mlx"})
    _write_json(dst_dir / MLX_CONFIG, mlx_config)  # last: a directory with a config is complete
    return dst_dir


def _check_peft_config(config: dict, where: Path) -> None:
    """Refuse what an mlx-lm adapter cannot express, naming the field."""
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {config.get('peft_type')!r}; only LORA "
                                 "adapters (LoRA or DoRA) convert to MLX")
    unsupported = {
        "bias": (config.get("bias", "none") != "none", "trained biases have no mlx-lm slot"),
        "modules_to_save": (bool(config.get("modules_to_save")),
                            "fully trained module copies are not an mlx-lm adapter"),
        "alpha_pattern": (bool(config.get("alpha_pattern")), "per-module alpha is not supported"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")), "Conv1D (GPT-2 style) layers"),
        "trainable_token_indices": (bool(config.get("trainable_token_indices")),
                                    "trained token embeddings are not an mlx-lm adapter"),
    }
    for field, (present, why) in unsupported.items():
        if present:
            raise AdapterFormatError(f"{where}: {field}={config[field]!r} cannot be converted: {why}")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise AdapterFormatError(f"{where}: {field} is missing")


def _group(tensors: dict[str, np.ndarray], suffixes: dict[str, str], where: Path) -> dict:
    """{module path: {"a"|"b"|"m": tensor}}, refusing tensors that are not LoRA/DoRA linear weights."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, value in sorted(tensors.items()):
        for suffix, part in suffixes.items():
            if name.endswith("." + suffix):
                modules.setdefault(name[: -len(suffix) - 1], {})[part] = value
                break
        else:
            raise AdapterFormatError(f"{where}: tensor {name!r} is not a LoRA/DoRA weight of a "
                                     f"linear layer (expected a name ending in one of "
                                     f"{sorted(suffixes)})")
    if not modules:
        raise AdapterFormatError(f"{where}: no adapter tensors")
    return modules


def _lora_pair(parts: dict, path: str, where: Path, *, use_dora: bool, peft: bool = False):
    names = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector") if peft else (
        "lora_a", "lora_b", "m")
    for part, name in zip("abm", names):
        if part == "m" and not use_dora:
            if "m" in parts:
                raise AdapterFormatError(f"{where}: {path}.{name} is a DoRA magnitude, but the "
                                         "config says LoRA")
            continue
        if part not in parts:
            raise AdapterFormatError(f"{where}: {path}.{name} is missing")
    a, b = parts["a"], parts["b"]
    if a.ndim != 2 or b.ndim != 2:
        raise AdapterFormatError(f"{where}: {path} has {a.ndim}-D LoRA weights; only linear "
                                 "layers (2-D) convert (not mixture-of-experts or conv layers)")
    if "embed" in path.rsplit(".", 1)[-1]:
        raise AdapterFormatError(f"{where}: {path} is an embedding; embedding LoRA is not converted")
    if use_dora and parts["m"].shape != (b.shape[0] if peft else b.shape[1],):
        raise AdapterFormatError(f"{where}: {path} magnitude shape {parts['m'].shape} does not "
                                 "match the layer's output size")
    return a, b


def _peft_targets(paths: list[str]) -> tuple[list[str], list[int] | None]:
    """target_modules (+ layers_to_transform) that select exactly these modules in PEFT.

    mlx-lm adapts the same block-relative modules in each of the last N blocks; PEFT spells that
    as block-relative names plus the block indices. Anything else (a module outside the blocks,
    a ragged selection) is listed by full path, which PEFT also matches exactly.
    """
    in_blocks = [_IN_BLOCK.match(p) for p in paths]
    if all(in_blocks):
        indices = sorted({int(m["index"]) for m in in_blocks})
        rels = sorted({m["rel"] for m in in_blocks})
        prefixes = {m["prefix"] for m in in_blocks}
        if len(prefixes) == 1 and len(paths) == len(indices) * len(rels):
            return rels, indices
    return sorted(paths), None


def _mlx_layers_and_keys(paths: list[str], config: dict, num_hidden_layers: int | None,
                         src_dir: Path) -> tuple[int, list[str]]:
    """mlx-lm's (num_layers, keys) covering these modules.

    mlx-lm puts a fresh adapter on every `keys` module of the last num_layers blocks and loads
    the file over them; a module the file lacks keeps lora_b = 0 (and m = ||W||), which is the
    identity, so covering more than the file holds changes nothing.
    """
    keys, indices = set(), set()
    for path in paths:
        if m := _IN_BLOCK.match(path):
            keys.add(m["rel"])
            indices.add(int(m["index"]))
        else:
            keys.add(path)  # mlx-lm also matches keys against paths outside the blocks
    if not indices or min(indices) == 0:
        return -1, sorted(keys)
    total = num_hidden_layers or _layer_count(config.get("base_model_name_or_path"))
    if total is None:
        raise AdapterFormatError(
            f"{src_dir}: the adapter starts at block {min(indices)}, so mlx-lm needs the model's "
            "block count: pass num_hidden_layers, or make base_model_name_or_path a local model "
            "directory with a config.json")
    if max(indices) >= total:
        raise AdapterFormatError(f"{src_dir}: the adapter has block {max(indices)} but the model "
                                 f"has {total} blocks")
    return total - min(indices), sorted(keys)


def _layer_count(base_model: str | None) -> int | None:
    if not base_model or not (Path(base_model) / "config.json").is_file():
        return None
    model_config = _read_json(Path(base_model) / "config.json")
    text_config = model_config.get("text_config") or {}
    return model_config.get("num_hidden_layers") or text_config.get("num_hidden_layers")


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy (bfloat16 read as float32)."""
    return _read_tensors(path)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except TypeError as e:  # numpy has no bfloat16: read through the framework that is here
        if "bfloat16" not in str(e):
            raise
        return _read_bfloat16(path)


def _read_bfloat16(path: Path) -> dict[str, np.ndarray]:
    import numpy as np

    try:
        from safetensors.torch import load_file as torch_load

        return {k: v.float().numpy() for k, v in torch_load(str(path)).items()}
    except ImportError:
        pass
    try:
        import mlx.core as mx

        return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path)).items()}
    except ImportError:
        raise AdapterFormatError(
            f"{path}: holds bfloat16 tensors, which numpy cannot read; install torch or mlx"
        ) from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: line {e.lineno}: not JSON ({e.msg})") from None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


