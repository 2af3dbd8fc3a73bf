"""Chat formatting shared by the MLX and torch sides, so that both format prompts alike."""

from __future__ import annotations

import bisect

# The chat template for base checkpoints that have none: mlx-lm-lora's fallback
# (`mlx_lm_lora.chat_template.DEFAULT_CHAT_TEMPLATE`, which its `ensure_chat_template` installs),
# copied here because the torch trainer and evaluator run without MLX installed. A template-less
# model then formats, trains and scores the same on both backends; a unit test
# (tests/unit/test_evaluator_torch.py) keeps this equal to mlx-lm-lora's.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{{ (eos_token or '') if message['role'] == 'assistant' else '' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def prompt_messages(row: dict, system: str | None = None) -> list[dict]:
    """The prompt of a canonical preference or GRPO row as chat messages: [system,] the earlier
    turns (`context`), then the user's prompt. `system` stands in when the row has none."""
    system = row.get("system") or system
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *row.get("context", ()), {"role": "user", "content": row["prompt"]}]


def needs_loss_mask(row: dict) -> bool:
    """Whether a canonical chat row is trained through `loss_mask` rather than a library's own
    prompt masking: when a turn carries a weight or the row calls tools."""
    return "tools" in row or any("weight" in m or "tool_calls" in m for m in row["messages"])


def loss_mask(tokenizer, messages: list[dict], tools: list | None = None, *,
              mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """The tokens of a conversation as the tokenizer's chat template renders it, and a 0/1 mask
    of those that carry loss: every assistant turn but those with weight 0 (OpenAI's and
    Together's rule) and, without mask_prompt, every other token too. `tokenizer` is a
    transformers (fast) tokenizer; mlx-lm's TokenizerWrapper holds one as `_tokenizer`.

    A turn's text is what rendering the conversation up to it adds to the rendering before it;
    an assistant turn's header (what add_generation_prompt writes) belongs to the prompt, as in
    TRL's prompt/completion masking. Tokens are mapped to turns by their character offsets in
    the full rendering, so a merge across a turn boundary cannot shift the mask."""

    def render(turns: list[dict], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(messages)
    ends: list[int] = []  # where each span of text ends, and whether it is trained
    trained: list[bool] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and i:
            header = render(messages[:i], generation_prompt=True)
            if text.startswith(header):
                ends.append(len(header))
                trained.append(not mask_prompt)
        ends.append(len(render(messages[: i + 1])))
        trained.append(message.get("weight", 1) != 0 if message["role"] == "assistant"
                       else not mask_prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for first, _ in encoded["offset_mapping"]:
        span = bisect.bisect_right(ends, first)
        mask.append(int(trained[span] if span < len(trained) else not mask_prompt))
    return list(encoded["input_ids"]), mask
