"""Ask LLaVA about images: the chat prompt, batched greedy generation, the first word of an answer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

ONE_WORD_PROMPT = "What is shown in this image? Use exactly one word!"  # METHOD §5


def chat_prompt(processor: Any, question: str) -> str:
    """The model's own conversation format with one image, via its chat template when it has one."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's format


def white_image(size: int = 336):
    """The plain white image of METHOD §5's second steering setting."""
    from PIL import Image

    return Image.new("RGB", (size, size), (255, 255, 255))


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor: Any,
    images: Sequence[Any],
    question: str,
    max_new_tokens: int = 5,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers to ``question`` about each image, batched (left padding), decoded without the prompt;
    ``progress``: a tqdm bar named ``desc``."""
    from tqdm import tqdm

    prompt = chat_prompt(processor, question)
    device = next(p for p in model.parameters()).device
    vision_dtype = next(model.parameters()).dtype
    answers: list[str] = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress):
        batch = list(images[start : start + batch_size])
        inputs = processor(images=batch, text=[prompt] * len(batch), return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(vision_dtype)
        out_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_ids = out_ids[:, inputs["input_ids"].shape[1] :]
        answers += [a.strip() for a in processor.batch_decode(new_ids, skip_special_tokens=True)]
    return answers


def first_word(text: str) -> str:
    """The first word of an answer, lower-cased, punctuation stripped ("" if there is none)."""
    match = re.search(r"[^\W_]+(?:[-'][^\W_]+)*", text)
    return match.group(0).lower() if match else ""
