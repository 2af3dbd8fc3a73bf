"""Generation with mlx-lm for the inference API: one base model, adapters beside it.

Each loaded adapter gets a module tree of its own whose base weights are the base model's very
arrays (MLX arrays are shared by reference, so nothing is copied) with mlx-lm's LoRA layers
loaded on top by `load_adapters`, exactly as `mlx_lm.load(..., adapter_path=)` applies them.
Swapping adapters is then picking a tree; dropping one frees only its LoRA weights.

Every method runs on the evaluator's backend thread (tunebus.shared.threads).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load_model
from mlx_lm_lora.chat_template import ensure_chat_template
from tunebus.shared.adapter_layouts import MLX

ADAPTER_FORMAT = MLX  # the adapter layout it loads


class Generator:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.base, self.tokenizer = load(str(model_dir))
        ensure_chat_template(self.tokenizer)  # as the trainer and the evaluator do
        self.adapters: dict[str, object] = {}

    def add_adapter(self, key: str, adapter_dir: Path) -> None:
        model, _ = load_model(self.model_dir, lazy=True)  # never evaluated: replaced just below
        model.load_weights(list(tree_flatten(self.base.parameters())))
        load_adapters(model, str(adapter_dir))
        mx.eval(model.parameters())
        self.adapters[key] = model.eval()

    def drop_adapter(self, key: str) -> None:
        self.adapters.pop(key, None)

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return list(self.tokenizer.encode(prompt))

    def generate(self, key: str | None, prompt: list[int], *, max_tokens: int, temperature: float,
                 top_p: float, top_k: int, seed: int | None,
                 on_piece: Callable[[str], bool]) -> tuple[int, str]:
        """Feed each new piece of text to on_piece until it returns False, EOS or max_tokens;
        (new tokens, "stop" or "length")."""
        model = self.base if key is None else self.adapters[key]
        if seed is not None:
            mx.random.seed(seed)
        sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0, top_k=top_k)
        tokens, finish = 0, "length"
        for response in stream_generate(model, self.tokenizer, prompt, max_tokens=max_tokens,
                                        sampler=sampler):
            tokens = response.generation_tokens
            if response.text and not on_piece(response.text):
                return tokens, "stop"
            if response.finish_reason:
                finish = response.finish_reason
        return tokens, finish
