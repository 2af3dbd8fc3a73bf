"""The CUDA evaluation backend ("cuda", as the trainer's): held-out loss, token accuracy and greedy answers with
transformers (and PEFT for the adapter), on CUDA in bf16 or on the CPU in float32.

It scores exactly the tokens the MLX backend scores, so the two backends' numbers can be
compared. That means mlx-lm-lora's SFT tokenization and mask, not TRL's:

- a "messages" row is the chat template's text, encoded; a prompt/completion row is the
  conversation [user: prompt, assistant: completion]; a "text" row is the encoded text with EOS
  appended when it does not end in it (and is never prompt-masked);
- with mask_prompt, scoring starts at the first token after the template of every message but
  the last, *without* a generation prompt: the assistant header (`<|im_start|>assistant\\n` in
  ChatML) is scored too, as the MLX trainer trains on it (TRL's completion mask leaves it out);
- mlx-lm-lora's mask runs from that offset to the example's length *inclusive*, so for every
  example shorter than max_seq_length it also scores the prediction of the batch's zero padding
  just past the end: token id 0 after the last token. That is kept here (`PAST_THE_END`), one
  token per untruncated example; truncated examples end at max_seq_length without it.

The loss is the mean NLL over all scored tokens of all examples (as `evaluate_sft` sums
batch-mean * batch-tokens), so batch_size changes only speed and memory, not the result.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from tunebus.shared.adapter_layouts import PEFT
from tunebus.shared.chat import FALLBACK_CHAT_TEMPLATE  # mlx-lm-lora's, for template-less models

from .backend import Answer, Measurement

NAME = "cuda"
ADAPTER_FORMAT = PEFT

PAST_THE_END = 0  # the token mlx-lm-lora's zero-padded batches hold after an example's end
IGNORE = -100  # a label that is not scored (cross_entropy's ignore_index)


def measure(
    model_dir: Path,
    rows: list[dict],
    prompts: list[list[dict]],
    *,
    adapter_dir: Path | None = None,
    max_seq_length: int = 512,
    batch_size: int = 4,
    mask_prompt: bool = True,
    max_tokens: int = 64,
) -> Measurement:
    """Score `rows` and answer `prompts` with the model (and the PEFT adapter, when given), as
    backend.py says."""
    if not rows:
        raise ValueError("no examples to score")
    model, tokenizer = load(Path(model_dir), Path(adapter_dir) if adapter_dir else None)
    return _measure_loaded(model, tokenizer, rows, prompts, max_seq_length=max_seq_length,
                           batch_size=batch_size, mask_prompt=mask_prompt, max_tokens=max_tokens)


def measure_base_and_adapter(model_dir: Path, adapter_dir: Path, rows: list[dict],
                             prompts: list[list[dict]], **settings) -> tuple[Measurement, Measurement]:
    """`measure` of the base model, then of base+adapter, loading the model once: PEFT puts
    the adapter's layers into the loaded base, as `load` does with an adapter_dir."""
    if not rows:
        raise ValueError("no examples to score")
    model, tokenizer = load(Path(model_dir), None)
    before = _measure_loaded(model, tokenizer, rows, prompts, **settings)
    model = PeftModel.from_pretrained(model, Path(adapter_dir)).eval()
    return before, _measure_loaded(model, tokenizer, rows, prompts, **settings)


def _measure_loaded(model, tokenizer, rows: list[dict], prompts: list[list[dict]], *,
                    max_seq_length: int = 512, batch_size: int = 4, mask_prompt: bool = True,
                    max_tokens: int = 64) -> Measurement:
    mask_prompt = mask_prompt and "text" not in rows[0]
    examples = [scored_example(row, tokenizer, mask_prompt, max_seq_length, index)
                for index, row in enumerate(rows)]

    totals = _Totals()
    for start in range(0, len(examples), batch_size):
        totals.add(model, examples[start:start + batch_size])
    if totals.tokens == 0:
        raise ValueError("nothing to score: every token is prompt or truncated")
    loss = totals.nll / totals.tokens
    answers = answer_all(model, tokenizer, prompts, max_tokens, batch_size)
    return Measurement(
        loss=loss, perplexity=math.exp(loss), token_accuracy=totals.correct / totals.tokens,
        tokens=totals.tokens, examples=len(rows), answers=answers,
    )


def load(model_dir: Path, adapter_dir: Path | None):
    """The model in eval mode (bf16 on CUDA, float32 on the CPU) and its tokenizer."""
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if tokenizer.chat_template is None:  # as the trainers do, so a template-less model scores alike
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.bfloat16 if cuda else torch.float32,
        use_safetensors=True,
        trust_remote_code=False,
    ).to("cuda" if cuda else "cpu")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class Example:
    ids: list[int]  # the tokens the model reads, truncated to max_seq_length
    labels: list[int]  # labels[i] is the target after ids[i], or IGNORE


def scored_example(row: dict, tokenizer, mask_prompt: bool, max_seq_length: int,
                   index: int = 0) -> Example:
    """One row as mlx-lm-lora's SFT datasets tokenize and mask it (see the module docstring)."""
    tokens, offset = _tokens_and_offset(row, tokenizer, mask_prompt, index)
    ids = tokens[:max_seq_length]
    targets = ids[1:] + ([PAST_THE_END] if len(tokens) < max_seq_length else [])
    # Target i is the token at position i + 1; mlx-lm-lora scores positions offset..length.
    labels = [t if i + 1 >= offset else IGNORE for i, t in enumerate(targets)]
    return Example(ids=ids[:len(labels)], labels=labels)


def _tokens_and_offset(row: dict, tokenizer, mask_prompt: bool, index: int) -> tuple[list[int], int]:
    """mlx-lm-lora's create_dataset for train_mode "sft": which shape is read decides on the
    row's keys in the same order (prompt+completion, then messages, then text)."""

    def encode_chat(messages: list[dict], tools=None) -> list[int]:
        return tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False))

    if "prompt" in row and "completion" in row:
        prompt = [{"role": "user", "content": row["prompt"]}]
        tokens = encode_chat(prompt + [{"role": "assistant", "content": row["completion"]}])
        return tokens, len(encode_chat(prompt)) if mask_prompt else 0
    if "messages" in row:
        messages, tools = row["messages"], row.get("tools")
        tokens = encode_chat(messages, tools)
        return tokens, len(encode_chat(messages[:-1], tools)) if mask_prompt else 0
    if "text" in row:
        if mask_prompt:
            raise ValueError(f"row {index}: prompt masking is not supported for a 'text' row")
        tokens = tokenizer.encode(row["text"])
        if not tokens or tokens[-1] != tokenizer.eos_token_id:
            tokens.append(tokenizer.eos_token_id)
        return tokens, 0
    raise ValueError(f"row {index}: none of the SFT fields prompt+completion, messages, text "
                     f"(has {', '.join(sorted(row)) or 'no fields'})")


class _Totals:
    """Summed NLL, scored tokens and exact greedy predictions over every batch."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.correct = 0

    @torch.inference_mode()
    def add(self, model, batch: list[Example]) -> None:
        width = max(len(e.ids) for e in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for row, e in enumerate(batch):  # right padding: causal attention keeps it unseen
            ids[row, :len(e.ids)] = torch.tensor(e.ids)
            attention[row, :len(e.ids)] = 1
            labels[row, :len(e.labels)] = torch.tensor(e.labels)
        device = model.device
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        labels = labels.to(device)
        scored = labels != IGNORE
        self.nll += F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                    reduction="sum").item()
        self.tokens += int(scored.sum())
        self.correct += int(((logits.argmax(-1) == labels) & scored).sum())


def answer_all(model, tokenizer, prompts: list[list[dict]], max_tokens: int,
               batch_size: int = 4) -> list[Answer]:
    """The greedy answers to every prompt, generated `batch_size` prompts at a time (the
    evaluator's batch_size, as for scoring): a request may bring up to 64 probes of up to 8000
    characters each, too many to generate in one batch on every GPU. Each answer's `seconds`
    is its batch's, as the MLX backend's are."""
    return [answer for start in range(0, len(prompts), batch_size)
            for answer in _answer_batch(model, tokenizer, prompts[start:start + batch_size],
                                        max_tokens)]


@torch.inference_mode()
def _answer_batch(model, tokenizer, prompts: list[list[dict]], max_tokens: int) -> list[Answer]:
    """The greedy answers to `prompts`, generated as one batch: the prompts left-padded with
    an attention mask (transformers derives each row's positions from it), so each row's tokens
    are those `answer` gives it alone, in a fraction of the time."""
    encoded = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for messages in prompts]
    eos, pad = _stop_tokens(model, tokenizer)
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, prompt in enumerate(encoded):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention[row, width - len(prompt):] = 1
    started = time.perf_counter()
    output = model.generate(
        input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
        max_new_tokens=max_tokens, do_sample=False, num_beams=1, top_p=None, top_k=None,
        temperature=None, eos_token_id=sorted(eos), pad_token_id=pad,
    )
    seconds = time.perf_counter() - started
    answers = []
    for new in output[:, width:].tolist():
        # A row that ended before the others is filled with pad tokens after its EOS.
        end = next((i + 1 for i, token in enumerate(new) if token in eos), len(new))
        answers.append(Answer(_text(tokenizer, new[:end], eos), seconds, end))
    return answers


@torch.inference_mode()
def answer(model, tokenizer, messages: list[dict], max_tokens: int) -> Answer:
    """The greedy reply to `messages` alone, at most max_tokens new tokens, stopping at EOS.

    The text is the tokenizer's own decoding; mlx-lm's streaming detokenizer can differ from it
    in how it renders raw byte tokens, so compare answers across backends by tokens."""
    started = time.perf_counter()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt").to(model.device)
    eos, pad = _stop_tokens(model, tokenizer)
    output = model.generate(
        **prompt, max_new_tokens=max_tokens, do_sample=False, num_beams=1, top_p=None, top_k=None,
        temperature=None, eos_token_id=sorted(eos), pad_token_id=pad,
    )
    new = output[0, prompt["input_ids"].shape[1]:].tolist()
    return Answer(_text(tokenizer, new, eos), time.perf_counter() - started, len(new))


def _stop_tokens(model, tokenizer) -> tuple[set[int], int]:
    """The tokens that end an answer (the tokenizer's EOS and the generation config's), and the
    pad token."""
    eos = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list)
                                         else [eos] if eos is not None else [])
    eos.discard(None)
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)


def _text(tokenizer, new: list[int], eos: set[int]) -> str:
    """As mlx-lm's detokenizer: special tokens stay in the text, except the EOS that ended it
    (which still counts as a generated token)."""
    return tokenizer.decode(new[:-1] if new and new[-1] in eos else new,
                            skip_special_tokens=False).strip()


def warm_up() -> None:
    """Load a throwaway model as `measure` does, score and answer with it: transformers'
    imports and first-use costs are paid at start-up, not by the first evaluation
    (tunebus.shared.warmup)."""
    import tempfile

    from tunebus.shared.warmup import MESSAGES, write_warm_up_model

    with tempfile.TemporaryDirectory(prefix="tunebus-warm-up-") as tmp:
        measure(write_warm_up_model(Path(tmp)), [{"messages": MESSAGES}], [MESSAGES[:1]],
                max_tokens=2)
