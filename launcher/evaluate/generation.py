"""What one model does for an evaluation, on one shard's examples: the reference responses' losses
(prompt masked as in training) and batched answers, with the base model or one adapter selected."""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from launcher.config.quirks import quirks_for
from launcher.config.recipe import Recipe
from launcher.data.examples import Example, tokenize
from launcher.evaluate.decoding import answer_of, decode
from launcher.rundir.evaldir import System


def with_adapters(model, systems: list[System]):
    """One model holding every adapter (loaded once per shard); set_adapter picks one."""
    from peft import PeftModel

    for number, system in enumerate(systems):
        name = adapter_name(system)
        if number == 0:
            model = PeftModel.from_pretrained(model, system.adapter, adapter_name=name)
        else:
            model.load_adapter(system.adapter, adapter_name=name)
    return model.eval()


def peft_type_of(adapter: str) -> str | None:
    """An adapter folder's peft type ("LORA", "IA3", ...), as its config says."""
    return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("peft_type")


def adapter_name(system: System) -> str:
    return "a" + hashlib.sha1(system.name.encode()).hexdigest()[:10]  # peft names cannot hold "/" or "."


def selected(model, system: System):
    """The base model (adapters disabled) or one adapter, for a `with` block."""
    if system.adapter is None:
        return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    model.set_adapter(adapter_name(system))
    return nullcontext()


def evaluate_examples(
    model, tokenizer, examples: list[Example], recipe: Recipe, answer: bool = True
) -> tuple[list[dict], str | None]:
    """Per example: the reference's summed loss and token count (a preference pair's: the chosen answer's,
    and the rejected one's summed loss), and (when there is a prompt to
    answer, and `answer`) the generated text and how many tokens it took. Generation that fails
    leaves the losses standing: the second value says why there are no answers (None when there are)."""
    rows = [dict(zip(("loss_sum", "loss_tokens"), pair)) for pair in reference_losses(model, tokenizer, examples, recipe)]
    if all(e.rejected is not None for e in examples):  # preference pairs: the rejected answer's loss too
        dispreferred = [replace(e, response=e.rejected) for e in examples]
        for row, (total, _) in zip(rows, reference_losses(model, tokenizer, dispreferred, recipe)):
            row["rejected_loss_sum"] = total
    answers, failure = [("", 0)] * len(rows), None
    if answer and all(e.prompt for e in examples):
        try:
            answers = generate(model, tokenizer, examples, recipe)
        except Exception as err:  # the model's own generation code: a good training keeps its losses
            failure = failure_text(err)
    for row, (text, count) in zip(rows, answers):
        row.update(prediction=text, new_tokens=count)
    return rows, failure


def failure_text(err: BaseException) -> str:
    return f"generation failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"


def generate(model, tokenizer, examples: list[Example], recipe: Recipe) -> list[tuple[str, int]]:
    """Batched generation, left padded; batches are built from length-sorted prompts so they pad
    little. Returns (cleaned text, generated tokens up to EOS) per example, in input order."""

    e = recipe.eval
    quirks = quirks_for(model.config.model_type)
    special = all(x.special_tokens for x in examples)  # one template: all or none
    lengths = [len(tokenizer(x.prompt, add_special_tokens=special)["input_ids"]) for x in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    sampling = {"do_sample": True, "temperature": e.temperature, "top_p": e.top_p} if e.do_sample else {"do_sample": False}
    outputs: dict[int, tuple[str, int]] = {}
    for start in range(0, len(order), e.batch_size):
        batch = order[start : start + e.batch_size]
        prompts = [examples[i].prompt for i in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=special).to(model.device)
        ends = {
            "max_new_tokens": e.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if quirks.own_generation_loop:
            cache = quirks.generate_with_cache
            new_tokens = decode(model, encoded["input_ids"], encoded["attention_mask"], **ends, **sampling, cache=cache).cpu()
        else:
            generated = model.generate(**encoded, **ends, use_cache=quirks.generate_with_cache, **sampling)
            new_tokens = generated[:, encoded["input_ids"].shape[1] :].cpu()
        for i, tokens in zip(batch, new_tokens):
            outputs[i] = answer_of(tokenizer, tokens.tolist(), examples[i].suffix)
    return [outputs[i] for i in range(len(examples))]


def reference_losses(model, tokenizer, examples: list[Example], recipe: Recipe) -> list[tuple[float, int]]:
    """(summed cross-entropy, token count) of each reference response, prompt masked as in training."""
    import torch

    results = []
    for start in range(0, len(examples), recipe.eval.batch_size):
        rows = [tokenize(e, tokenizer, recipe.data.max_length) for e in examples[start : start + recipe.eval.batch_size]]
        batch = hf_batch(tokenizer, rows)
        width = batch["input_ids"].shape[1]
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        inputs = {key: value.to(model.device) for key, value in batch.items()}
        logits = model(**inputs).logits.float().cpu()
        logits = logits[:, -width:]  # prompt / p-tuning put their virtual tokens first
        shifted = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=-100, reduction="none")
        results += [(float(total), int(count)) for total, count in zip(losses.sum(1), (shifted != -100).sum(1))]
    return results


def hf_batch(tokenizer, rows: list[dict]) -> dict:
    """Tokenized rows as one right-padded batch: input_ids and attention_mask."""
    import torch

    width, pad = max(len(r["input_ids"]) for r in rows), tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]),
    }
