"""Base models: from a Hugging Face id, the models bucket or a local models root, cached per worker.

Only safetensors weights are ever fetched or loaded (no pickle: a `.bin` or `.pt` beside them is
not even downloaded), and no repository code runs (`trust_remote_code` stays off everywhere).
A reference anywhere else (another bucket, a path outside the models root) is refused with the
rule it broke.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from pathlib import Path

from .objectstore import ObjectStore, parse_uri

# What a model directory needs; weights only as safetensors.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFound(LookupError):
    pass


class ModelRefused(ModelNotFound):
    """The reference points somewhere base models may not come from."""


def model_files(name: str) -> bool:
    """Whether a file of a model prefix is one a model needs (config, tokenizer, safetensors)."""
    return any(fnmatch.fnmatch(name.rsplit("/", 1)[-1], pattern) for pattern in HUB_PATTERNS)


def refusal(ref: str, models_bucket: str, models_root: Path | None) -> str | None:
    """Why `ref` may not be used as a base model, or None: the models bucket, a path under the
    configured local models root, or a Hugging Face hub id."""
    rule = (f"base models come only from s3://{models_bucket}/, a path under the worker's "
            "models root (TUNEBUS_MODELS_ROOT) or a Hugging Face hub id")
    if ref.startswith("s3://"):
        bucket, _ = parse_uri(ref)
        return None if bucket == models_bucket else f"base model {ref} is in bucket {bucket}: {rule}"
    if _is_path(ref):
        if models_root is None:
            return f"base model {ref} is a local path and this worker has no models root: {rule}"
        path = Path(ref).expanduser().resolve()
        if not path.is_relative_to(Path(models_root).expanduser().resolve()):
            return f"base model {ref} is outside the models root {models_root}: {rule}"
        return None
    return None if _HUB_ID.match(ref) else f"base model {ref!r} is not a hub id: {rule}"


def _is_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or Path(ref).expanduser().exists()


def resolve_model(ref: str, store: ObjectStore, cache_dir: Path, revision: str | None = None,
                  *, models_root: Path | None = None) -> Path:
    """A local directory holding the model `ref` points to, downloading it once if needed."""
    if problem := refusal(ref, store.settings.models_bucket, models_root):
        raise ModelRefused(problem)
    if ref.startswith("s3://"):
        target = cache_dir / "s3" / _slug(ref)
        if not (target / "config.json").exists():
            tmp = target.with_name(target.name + f".partial-{os.getpid()}")
            store.get_dir(ref, tmp, include=model_files)
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
