"""Chat formatting shared by the MLX and torch sides, so that both format prompts alike."""

from __future__ import annotations

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
