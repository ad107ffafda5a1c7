"""Greedy generation from a model, through the tokenizer's chat template when it has one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64) -> str:
    """The greedy continuation of ``prompt`` (as a user turn when there is a chat template)."""
    if not hasattr(model, "generate"):
        raise ValueError("the model is an encoder; generation needs a causal language model")
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=ids["input_ids"].to(device),
            attention_mask=ids["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :].cpu(), skip_special_tokens=True)
