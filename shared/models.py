"""Base models: from a Hugging Face id, an s3:// prefix or a local path, cached per worker.

Only safetensors weights are ever fetched or loaded (no pickle), and no repository code runs
(`trust_remote_code` stays off everywhere).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .objectstore import ObjectStore

# What a model directory needs; weights only as safetensors.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


class ModelNotFound(LookupError):
    pass


def resolve_model(ref: str, store: ObjectStore, cache_dir: Path, revision: str | None = None) -> Path:
    """A local directory holding the model `ref` points to, downloading it once if needed."""
    if ref.startswith("s3://"):
        target = cache_dir / "s3" / _slug(ref)
        if not (target / "config.json").exists():
            tmp = target.with_name(target.name + f".partial-{os.getpid()}")
            store.get_dir(ref, tmp)
            _check_safetensors_only(tmp, ref)
            tmp.rename(target)
        return target
    path = Path(ref).expanduser()
    if path.exists():
        _check_safetensors_only(path, ref)
        return path
    return _from_hub(ref, cache_dir / "hub", revision)


def _from_hub(repo_id: str, cache_dir: Path, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelNotFound(f"{repo_id}: not a local path or s3:// URI, and huggingface_hub is not installed") from e
    try:
        path = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS
        ))
    except Exception as e:
        raise ModelNotFound(f"{repo_id}: cannot be fetched from the Hugging Face hub ({e})") from e
    _check_safetensors_only(path, repo_id)
    return path


def _check_safetensors_only(path: Path, ref: str) -> None:
    if not any(path.glob("*.safetensors")):
        raise ModelNotFound(f"{ref}: no *.safetensors weights (other weight formats are refused)")


def _slug(ref: str) -> str:
    readable = ref.removeprefix("s3://").strip("/").replace("/", "--")[:80]
    return f"{readable}-{hashlib.sha256(ref.encode()).hexdigest()[:12]}"
