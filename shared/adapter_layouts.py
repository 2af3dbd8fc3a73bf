"""Which adapter layouts an adapter's files hold, and which files make up a download of one.

The trainer stores mlx-lm's layout at the root of the adapter prefix and PEFT's under `peft/`
(a merged model, on request, under `merged/`); the run and evaluation files lie at the root. A
layout is present when its weights and its adapter_config.json both are, in a folder:

    mlx    adapters.safetensors       + adapter_config.json     loaded by mlx_lm.load(..., adapter_path=)
    peft   adapter_model.safetensors  + adapter_config.json     loaded by PeftModel.from_pretrained
    gguf   gguf/adapter.gguf (one file; the registry writes it)  llama.cpp --lora, Ollama ADAPTER

Plain names, no ML stack: the registry runs without one. (The same names as
tunebus.shared.adapter_formats, which needs numpy.) The registry serves downloads by layout with
it; the evaluator fetches the layout its backend reads.
"""

from __future__ import annotations

CONFIG = "adapter_config.json"
WEIGHTS = {"mlx": "adapters.safetensors", "peft": "adapter_model.safetensors"}
PEFT_DIR = "peft"  # the PEFT copy's folder in an adapter prefix
MERGED_DIR = "merged"  # the merged model's folder, on request
GGUF_DIR = "gguf"  # the llama.cpp LoRA GGUF copy's folder, written at registration
GGUF_FILE = "adapter.gguf"
# The run files beside the adapter.
TRAINING_ARGS = "training_args.json"
METRICS = "metrics.json"
LOSS_CURVE = "loss_curve.json"
LOSS_PLOT = "loss_curve.png"


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
