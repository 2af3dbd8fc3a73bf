"""Generation with transformers + PEFT for the inference API: one base model, adapters beside it.

PEFT holds several adapters on one model by name (`load_adapter`, `set_adapter`,
`delete_adapter`, `disable_adapter` for the base alone), so the base weights are loaded once
(by the evaluator's own `torch_eval.load`) and a swap moves no weights. Text is streamed through
transformers' TextStreamer; a stop string ends generation through a StoppingCriteria.

Every method runs on the evaluator's backend thread (tunebus.shared.threads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from tunebus.shared.adapter_layouts import PEFT

from .torch_eval import load

ADAPTER_FORMAT = PEFT  # the adapter layout it loads


class Generator:
    def __init__(self, model_dir: Path) -> None:
        self.model, self.tokenizer = load(Path(model_dir), None)
        self.peft: PeftModel | None = None
        self.slots: dict[str, str] = {}  # adapter key -> PEFT adapter name ('.' is not allowed)
        self._next = 0

    def add_adapter(self, key: str, adapter_dir: Path) -> None:
        slot = f"adapter{self._next}"
        self._next += 1
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, adapter_dir, adapter_name=slot).eval()
        else:
            self.peft.load_adapter(adapter_dir, adapter_name=slot)
        self.slots[key] = slot

    def drop_adapter(self, key: str) -> None:
        slot = self.slots.pop(key, None)
        if slot is None or self.peft is None:
            return
        if self.slots:
            if self.peft.active_adapter == slot:
                self.peft.set_adapter(next(iter(self.slots.values())))
            self.peft.delete_adapter(slot)
        else:  # the last one: back to the plain model, no LoRA layers left in it
            self.model = self.peft.unload()
            self.peft = None

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)
            return list(ids["input_ids"])
        return list(self.tokenizer.encode(prompt))

    @torch.inference_mode()
    def generate(self, key: str | None, prompt: list[int], *, max_tokens: int, temperature: float,
                 top_p: float, top_k: int, seed: int | None,
                 on_piece: Callable[[str], bool]) -> tuple[int, str]:
        """As mlx_generate.Generator.generate: (new tokens, "stop" or "length")."""
        if key is not None:
            self.peft.set_adapter(self.slots[key])
        model = self.peft if self.peft is not None else self.model
        base_only = self.peft.disable_adapter() if key is None and self.peft is not None \
            else contextlib.nullcontext()
        if seed is not None:
            torch.manual_seed(seed)
        streamer = _Pieces(self.tokenizer, on_piece)
        eos = model.generation_config.eos_token_id
        eos = sorted({self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
        ids = torch.tensor([prompt], device=model.device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None) \
            if temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        with base_only:
            output = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                num_beams=1, eos_token_id=eos, streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Stopped(streamer)]),
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                else eos[0], **sampling)
        new = output[0, len(prompt):].tolist()
        ended = streamer.stopped or (new and new[-1] in eos)
        return len(new), "stop" if ended or len(new) < max_tokens else "length"


class _Pieces(TextStreamer):
    """TextStreamer handing each finished piece of text to on_piece instead of printing it."""

    def __init__(self, tokenizer, on_piece: Callable[[str], bool]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_piece = on_piece
        self.stopped = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text and not self.stopped and not self.on_piece(text):
            self.stopped = True


class _Stopped(StoppingCriteria):
    def __init__(self, streamer: _Pieces) -> None:
        self.streamer = streamer

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.streamer.stopped, dtype=torch.bool,
                          device=input_ids.device)
