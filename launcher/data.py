"""Dataset rows -> prompt/response pairs -> tokenized examples with the prompt masked out.

Tokenization runs once per (data, tokenizer, template, max length): rank 0 writes the cache
under the run dir, the other ranks wait and read it.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.recipe import DataSection, Recipe, RecipeError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs from a .jsonl or .json file; bad JSON names file and line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError([f"{path}:{err.lineno}: invalid JSON: {err.msg}"]) from None
        if not isinstance(rows, list):
            raise RecipeError([f"{path}: expected a JSON list of objects"])
        return [(i + 1, row) for i, row in enumerate(rows)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise RecipeError([f"{path}:{number}: invalid JSON: {err.msg}; fix or remove the line"]) from None
    return rows


def to_example(row: Any, data: DataSection, where: str) -> Example:
    if not isinstance(row, dict):
        raise RecipeError([f"{where}: expected a JSON object, got {type(row).__name__}"])
    for column in (data.instruction_column, data.output_column):
        if not isinstance(row.get(column), str) or not row[column].strip():
            raise RecipeError([f"{where}: column {column!r} is missing or empty (set data.{_column_key(data, column)} if it has another name)"])
    extra = row.get(data.input_column) or ""
    return Example(prompt=render_prompt(data.template, row[data.instruction_column], str(extra)),
                   response=row[data.output_column])


def _column_key(data: DataSection, column: str) -> str:
    return "instruction_column" if column == data.instruction_column else "output_column"


def render_prompt(template: str, instruction: str, extra: str) -> str:
    user = instruction if not extra else f"{instruction}\n{extra}"
    if template == "chatml":
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return f"{user}\n"


def response_suffix(template: str) -> str:
    return "<|im_end|>" if template == "chatml" else ""


def load_examples(path: str | Path, data: DataSection) -> list[Example]:
    return [to_example(row, data, f"{path}:{line}") for line, row in read_rows(path)]


def split_examples(recipe: Recipe) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples; the split is a fixed function of data.seed."""
    data = recipe.data
    examples = load_examples(data.train_file, data)
    if data.eval_file:
        return examples, load_examples(data.eval_file, data)
    order = list(range(len(examples)))
    random.Random(data.seed).shuffle(order)
    held_out = set(order[: int(len(examples) * data.eval_fraction)])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


def tokenize(example: Example, tokenizer, template: str, max_length: int) -> dict[str, Any]:
    """Prompt and response tokenized apart, so the label mask falls exactly on the boundary."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example.response + response_suffix(template), add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels,
            "truncated": len(prompt_ids) + len(response_ids) > max_length}


def cache_key(recipe: Recipe, tokenizer_dir: str) -> str:
    digest = hashlib.sha256()
    for path in [recipe.data.train_file, recipe.data.eval_file]:
        if path:
            digest.update(Path(path).read_bytes())
    for name in sorted(Path(tokenizer_dir).glob("tokenizer*")) if Path(tokenizer_dir).is_dir() else []:
        digest.update(name.read_bytes())
    digest.update(json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(tokenizer_dir.encode())
    digest.update(b"rows with index")  # the cached format
    return digest.hexdigest()[:16]


def build_train_dataset(recipe: Recipe, tokenizer, cache_dir: Path) -> tuple[Any, dict]:
    """Tokenized training set (a datasets.Dataset) and its stats, cached under cache_dir.

    Call it on rank 0 first (TrainingArguments.main_process_first): the others then read
    the cache rank 0 wrote, published with a rename so it is never seen half-written.
    """
    from datasets import Dataset, load_from_disk

    target = cache_dir / cache_key(recipe, recipe.model.name_or_path)
    if not (target / "stats.json").exists():
        train, _ = split_examples(recipe)
        rows = [tokenize(e, tokenizer, recipe.data.template, recipe.data.max_length) | {"index": i}
                for i, e in enumerate(train)]
        stats = {"examples": len(rows), "truncated": sum(r.pop("truncated") for r in rows),
                 "tokens": sum(len(r["input_ids"]) for r in rows)}
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # our own leftover from a killed run
        Dataset.from_list(rows).save_to_disk(str(partial))
        (partial / "stats.json").write_text(json.dumps(stats))
        partial.rename(target)
    return load_from_disk(str(target)), json.loads((target / "stats.json").read_text())


class SampleLoggingCollator:
    """Pads like DataCollatorForSeq2Seq and appends each micro-batch's sample indices to a per-rank
    log, so the data order (and what a resume skipped or repeated) can be checked afterwards."""

    def __init__(self, tokenizer, log_path: Path, attempt: int):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        self.log_path, self.attempt = log_path, attempt

    def __call__(self, features: list[dict]) -> dict:
        ids = [f.pop("index") for f in features]
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps({"attempt": self.attempt, "ids": ids}) + "\n")
        return self.pad(features)
