"""What an evaluation backend is asked to do, and which one runs here.

A backend is a module with `NAME`, `ADAPTER_FORMAT` (the adapter layout it loads: "mlx" or
"peft") and

    measure(model_dir, rows, prompts, *, adapter_dir=None, max_seq_length, batch_size,
            mask_prompt, max_tokens) -> Measurement

which scores `rows` (held-out examples in mlx-lm-lora's SFT shapes) and answers each prompt
(chat messages) greedily with at most `max_tokens` new tokens. `mlx_eval` is the MLX one; a
`torch_eval` module with the same three names is all a torch backend needs.

This module imports no ML library, so the service starts without one.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType

# Preferred first: MLX where it is installed (Apple silicon, or mlx[cpu] on Linux), else torch.
BACKENDS = {"mlx": ("mlx_lm", "mlx_eval"), "torch": ("torch", "torch_eval")}


class BackendUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Answer:
    text: str
    seconds: float  # wall time from the prompt to the last token
    tokens: int  # new tokens generated


@dataclass(frozen=True)
class Measurement:
    loss: float  # mean NLL per scored token, in nats
    perplexity: float
    token_accuracy: float  # share of scored tokens that are the model's greedy prediction
    tokens: int
    examples: int
    answers: list[Answer] = field(default_factory=list)


def available() -> list[str]:
    """The backends whose library is installed and whose module exists, in preference order."""
    return [
        name for name, (library, module) in BACKENDS.items()
        if importlib.util.find_spec(library) is not None
        and importlib.util.find_spec(f"{__package__}.{module}") is not None
    ]


def load_backend(preference: str = "auto") -> ModuleType:
    """The backend module to measure with; BackendUnavailable says why there is none."""
    found = available()
    if preference == "auto":
        if not found:
            raise BackendUnavailable(
                "no evaluation backend is installed: install the 'mlx' extra (MLX), or torch "
                "with transformers and peft (the 'cuda' extra)")
        preference = found[0]
    if preference not in found:
        library, module = BACKENDS[preference]
        raise BackendUnavailable(
            f"evaluation backend {preference!r} needs the {library!r} package and the "
            f"{__package__}.{module} module (available here: {', '.join(found) or 'none'})")
    return importlib.import_module(f"{__package__}.{BACKENDS[preference][1]}")
