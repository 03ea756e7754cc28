"""Prompt templates (data.template), one entry each, as their authors wrote them.

Each renders (system, earlier turns, query, instruction) into the prompt text before the response
and the end-of-turn text after it; tests/test_seed_quirks.py checks the seeds' templates against
their models' own code. Adding a template is one entry here (the recipe's choices come from it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from launcher.errors import UserError

Turns = list[tuple[str, str]]


@dataclass(frozen=True)
class Template:
    name: str
    render: Callable[[str | None, Turns, str, object], tuple[str, str]]
    """(system, history, query with its instruction, tokenizer) -> (prompt, suffix)."""
    instruction_apart: bool = False
    """The instruction is a line of its own before the turns (else it opens the query)."""
    joint: bool = False
    """Prompt and answer are tokenized as one text, as its authors' script does."""
    special_tokens: bool = True
    """The tokenizer adds its special tokens (False: the text already holds them, a chat template's)."""


def _plain(system, history, query, tokenizer) -> tuple[str, str]:
    past = "".join(f"{q}\n{a}\n" for q, a in history)
    return (f"{system}\n" if system else "") + past + (f"{query}\n" if query else ""), ""


def _chatml(system, history, query, tokenizer) -> tuple[str, str]:
    turn = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    past = "".join(turn.format(q) + f"{a}<|im_end|>\n" for q, a in history)
    return head + past + turn.format(query), "<|im_end|>"


def _transnormer(system, history, query, tokenizer) -> tuple[str, str]:
    """OpenNLPLab's fine-tune/train.py: "{instruction}\\nHuman:\\n{input}\\nAssistant:\\n"."""
    past = "".join(f"Human:\n{q}\nAssistant:\n{a}\n" for q, a in history)
    return past + f"Human:\n{query}\nAssistant:\n", ""


def _chatglm(system, history, query, tokenizer) -> tuple[str, str]:
    """ChatGLM2's build_prompt."""
    past = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, 1))
    return past + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答：", ""


def _chatglm3(system, history, query, tokenizer) -> tuple[str, str]:
    """ChatGLM3's build_chat_input; the assistant's (empty) metadata line ends the prompt."""
    head = f"<|system|>\n{system}" if system else ""
    past = "".join(f"<|user|>\n{q}<|assistant|>\n{a}" for q, a in history)
    return head + past + f"<|user|>\n{query}<|assistant|>\n", ""


def _tokenizer(system, history, query, tokenizer) -> tuple[str, str]:
    """The tokenizer's own chat template; the suffix is what it writes after an answer."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        others = ", ".join(name for name in REGISTRY if name != "tokenizer")
        raise UserError(
            [f'data.template: "tokenizer" needs a tokenizer with a chat template; this model\'s has none: pick {others}']
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    messages.append({"role": "user", "content": query})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    marker = "@@LAUNCHER-ANSWER@@"
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": marker}], tokenize=False)
    after = full.split(marker, 1)[1] if marker in full else ""
    return prompt, after.rstrip("\n") if after.strip() else ""


REGISTRY: dict[str, Template] = {
    t.name: t
    for t in (
        Template("plain", _plain),
        Template("chatml", _chatml),
        Template("transnormer", _transnormer, instruction_apart=True, joint=True),
        Template("chatglm", _chatglm),
        Template("chatglm3", _chatglm3),
        Template("tokenizer", _tokenizer, special_tokens=False),
    )
}
NAMES = tuple(REGISTRY)


def render(name: str, system: str | None, history: Turns, query: str, tokenizer=None, instruction: str = "") -> tuple[str, str]:
    """(prompt, suffix) of template `name`: the text before the response, and the end-of-turn text after it."""
    template = REGISTRY[name]
    if template.instruction_apart:
        prompt, suffix = template.render(None, history, query, tokenizer)
        head = "".join(f"{text}\n" for text in (system, instruction) if text)
        return head + prompt, suffix
    return template.render(system, history, f"{instruction}\n{query}" if instruction else query, tokenizer)
