"""Batch offline evaluation of the held-out split: base model vs base + adapter, side by side."""
from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext
from pathlib import Path

from launcher.data import Example, split_examples, tokenize
from launcher.quirks import quirks_for
from launcher.recipe import Recipe
from launcher.runs import RunDir, write_atomic

SYSTEMS = ("base", "adapter")


def evaluate_run(recipe: Recipe, run: RunDir, overwrite: bool = False) -> dict:
    """Write eval/predictions.jsonl, eval/metrics.json and eval/report.md; return the metrics."""
    import torch
    from peft import PeftModel

    from launcher.merge import validate_adapter
    from launcher.models import load_base_model, load_tokenizer

    if (run.eval / "metrics.json").exists() and not overwrite:
        raise FileExistsError(f"{run.eval}: holds an evaluation; pass --overwrite to replace it")
    validate_adapter(run.adapter)
    tokenizer = load_tokenizer(recipe, padding_side="left")
    examples = split_examples(recipe, tokenizer).held_out[: recipe.eval.max_examples]
    if not examples:
        raise ValueError("no held-out examples: set data.eval_file or a data.eval_fraction > 0")
    model = PeftModel.from_pretrained(load_base_model(recipe), str(run.adapter)).eval()
    predictions, metrics = {}, {}
    with torch.no_grad():
        for system in SYSTEMS:
            with model.disable_adapter() if system == "base" else nullcontext():
                metrics[system] = reference_loss(model, tokenizer, examples, recipe)
                if all(e.prompt for e in examples):  # plain text (data.format = "text") has no prompt to answer
                    predictions[system] = generate(model, tokenizer, examples, recipe)
                    metrics[system]["exact_match"] = exact_match(predictions[system], examples)
                else:
                    predictions[system] = [""] * len(examples)
    write_results(run.eval, examples, predictions, metrics)
    return metrics


def generate(model, tokenizer, examples: list[Example], recipe: Recipe) -> list[str]:
    """Greedy batched generation; batches are built from length-sorted prompts to pad little."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    outputs: dict[int, str] = {}
    size = recipe.eval.batch_size
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        encoded = tokenizer([examples[i].prompt for i in batch], return_tensors="pt", padding=True)
        generated = model.generate(
            **encoded, max_new_tokens=recipe.eval.max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            use_cache=quirks_for(model.config.model_type).generate_with_cache,
        )
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = clean_prediction(text, examples[i].suffix)
    return [outputs[i] for i in range(len(examples))]


def clean_prediction(text: str, suffix: str) -> str:
    suffix = suffix.strip()
    if suffix and suffix in text:
        text = text[: text.index(suffix)]
    return text.strip()


def exact_match(predictions: list[str], examples: list[Example]) -> float:
    hits = sum(p == e.response.strip() for p, e in zip(predictions, examples))
    return hits / len(examples)


def reference_loss(model, tokenizer, examples: list[Example], recipe: Recipe) -> dict[str, float]:
    """Mean cross-entropy per response token of the references (prompt tokens masked, as in training)."""
    import torch

    total, count = 0.0, 0
    size = recipe.eval.batch_size
    for start in range(0, len(examples), size):
        rows = [tokenize(e, tokenizer, recipe.data.max_length) for e in examples[start:start + size]]
        width = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        logits = logits[:, -input_ids.shape[1]:]  # prompt / p-tuning put their virtual tokens first
        shifted = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum")
        total += losses.item()
        count += int((shifted != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def write_results(out: Path, examples: list[Example], predictions: dict, metrics: dict) -> None:
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / "predictions.jsonl", "w") as handle:
        for i, example in enumerate(examples):
            row = {"prompt": example.prompt, "reference": example.response} | {s: predictions[s][i] for s in SYSTEMS}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomic(staging / "metrics.json", json.dumps(metrics | {"examples": len(examples)}, indent=2) + "\n")
    write_atomic(staging / "report.md", report_markdown(examples, predictions, metrics))
    if out.exists():
        shutil.rmtree(out)  # only reached with --overwrite, checked by the caller
    staging.rename(out)


def report_markdown(examples: list[Example], predictions: dict, metrics: dict) -> str:
    names = list(metrics[SYSTEMS[0]])
    lines = [f"# Evaluation on {len(examples)} held-out examples", "",
             "| system | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for system in SYSTEMS:
        lines.append(f"| {system} | " + " | ".join(f"{metrics[system][n]:.4f}" for n in names) + " |")
    lines += ["", "## Sample predictions", "", "| prompt | reference | base | adapter |", "|---|---|---|---|"]
    for i, example in enumerate(examples[:10]):
        cells = [example.prompt, example.response, predictions["base"][i], predictions["adapter"][i]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")[:120]
