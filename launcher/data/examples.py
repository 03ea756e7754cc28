"""Dataset rows -> prompt/response pairs -> tokenized examples with the prompt masked out.

Rows come from local .json/.jsonl/.csv/.parquet files or a hub dataset, in one of the seeds'
formats (data.format), and are rendered with a prompt template (data.template). Tokenization
runs once per (data, tokenizer, template, max length): rank 0 writes the cache under the run
dir, the other ranks wait and read it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from launcher.config import templates
from launcher.config.objectives import PREFERENCE_FORMATS
from launcher.config.recipe import DataSection, Recipe
from launcher.config.templates import render
from launcher.errors import UserError
from launcher.models.loading import load_tokenizer
from launcher.rundir.runs import publish, staging_for

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    suffix: str = ""  # the template's end-of-turn text after the response (trained on, not shown)
    joint: bool = False  # tokenized as one text, the prompt's tokens counted apart (the template authors' way)
    special_tokens: bool = True  # the tokenizer adds its special tokens (False: the rendered prompt holds them)
    rejected: str | None = None  # preference data: the dispreferred answer (the response is the chosen one)


class BadRow(Exception):
    """A row that cannot become an example; the message names its file and line."""


# ---------------------------------------------------------------- reading rows


def read_rows(source: str, data: DataSection) -> list[tuple[str, Any]]:
    """(where, row) pairs: `where` names the file and line (or row) for error messages.
    A row that is not valid JSON comes back as a BadRow in place of the row. A file that cannot be
    read at all (not UTF-8, not CSV, not parquet, empty) is one line naming it."""
    path = Path(source)
    if not path.exists():
        return _hub_rows(source, data)
    if path.suffix not in (".json", ".jsonl", ".csv", ".parquet"):
        raise UserError([f"{path}: unsupported file type {path.suffix!r}; use .json, .jsonl, .csv or .parquet"])
    try:
        return _file_rows(path)
    except UnicodeDecodeError as err:
        raise UserError([f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8"]) from None
    except (ValueError, OSError) as err:  # pandas' and pyarrow's parse errors are ValueErrors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError([f"{path}: cannot be read as {path.suffix[1:]} ({first})"]) from None


def _file_rows(path: Path) -> list[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a leading BOM is read, not kept
        except json.JSONDecodeError as err:
            raise UserError([f"{path}:{err.lineno}: invalid JSON: {err.msg}"]) from None
        if not isinstance(rows, list):
            raise UserError([f"{path}: expected a JSON list of objects (or use a .jsonl file)"])
        return [(f"{path}: item {i + 1}", row) for i, row in enumerate(rows)]
    import pandas

    if path.suffix == ".csv":
        frame = pandas.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        return [(f"{path}:{i + 2}", row) for i, row in enumerate(frame.to_dict("records"))]
    frame = pandas.read_parquet(path)
    return [(f"{path}: row {i + 1}", row) for i, row in enumerate(frame.to_dict("records"))]


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as err:
            rows.append((f"{path}:{number}", BadRow(f"invalid JSON: {err.msg}")))
    return rows


def _hub_rows(name: str, data: DataSection) -> list[tuple[str, Any]]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, split=data.split)
    except Exception as err:  # offline, unknown id, no such split: one line, not a traceback
        raise UserError(
            [
                f"data: {name} is neither a local file nor a reachable hub dataset "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
            ]
        ) from None
    return [(f"{name}[{data.split}] row {i + 1}", row) for i, row in enumerate(dataset)]


# ---------------------------------------------------------------- rows -> examples


def _text(row: dict, column: str, data: DataSection | None, key: str, required: bool = True) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):  # missing, or NaN from pandas
        value = ""
    if not isinstance(value, str):  # a number, list or object where text belongs: not trained on as its repr
        raise BadRow(f"column {column!r} holds {type(value).__name__} {json.dumps(value, default=str)[:40]}, not text")
    if required and not value.strip():
        raise BadRow(f"column {column!r} is missing or empty (set data.{key} if it has another name)")
    return value


def _history(row: dict, data: DataSection) -> list[tuple[str, str]]:
    if not data.history_column or row.get(data.history_column) is None:
        return []
    turns = row[data.history_column]
    if hasattr(turns, "tolist"):  # numpy arrays from parquet
        turns = turns.tolist()
    if not isinstance(turns, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in turns):
        raise BadRow(f"column {data.history_column!r} must be a list of [query, answer] pairs")
    return [(str(q), str(a)) for q, a in turns]


def conversation(row: Any, data: DataSection) -> tuple[str | None, list[tuple[str, str]], str, str, str]:
    """(system, earlier turns, query, response, instruction) of one row, whatever its format; the
    instruction is an alpaca row's instruction when it also has an input (the query then)."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object with columns, got {type(row).__name__}")
    system = data.system_prompt
    if data.format == "alpaca":
        query = _text(row, data.instruction_column, data, "instruction_column")
        extra = _text(row, data.input_column, data, "input_column", required=False)
        instruction, query = (query, extra) if extra.strip() else ("", query)
        return system, _history(row, data), query, _text(row, data.output_column, data, "output_column"), instruction
    if data.format == "prompt-response":
        return (
            system,
            _history(row, data),
            _text(row, data.prompt_column, data, "prompt_column"),
            _text(row, data.response_column, data, "response_column"),
            "",
        )
    if data.format == "text":
        return None, [], "", _text(row, data.text_column, data, "text_column"), ""
    return *_messages(row, data), ""


def _messages(row: dict, data: DataSection) -> tuple[str | None, list[tuple[str, str]], str, str]:
    messages = row.get(data.messages_column)
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"column {data.messages_column!r} must be a non-empty list of {{role, content}} messages")
    system = data.system_prompt
    if isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system, messages = str(messages[0].get("content", "")), messages[1:]
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if len(messages) % 2 or roles != ["user", "assistant"] * (len(messages) // 2):
        raise BadRow("messages must alternate user / assistant and end with the assistant's answer")
    texts = [str(m.get("content") or "") for m in messages]
    if not texts[-1].strip():
        raise BadRow("the last assistant message is empty")
    pairs = list(zip(texts[0::2], texts[1::2]))
    return system, pairs[:-1], pairs[-1][0], pairs[-1][1]


def preference(row: Any, data: DataSection) -> tuple[str | None, list[tuple[str, str]], str, str, str]:
    """(system, earlier turns, query, chosen, rejected) of a preference row. The prompt is text or a
    message list ending with the user's turn; each answer is text or messages ending with the
    assistant's. Without a prompt, the answers are whole conversations that share all but their last
    turn, which is then the prompt (as in Anthropic's HH data)."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object with columns, got {type(row).__name__}")
    chosen_before, chosen = _answer(row, data.chosen_column, "chosen_column")
    rejected_before, rejected = _answer(row, data.rejected_column, "rejected_column")
    prompt = _given(row.get(data.prompt_column))
    if prompt is None:
        if not chosen_before:
            raise BadRow(f"column {data.prompt_column!r} is missing or empty (set data.prompt_column if it has another name)")
        if chosen_before != rejected_before:
            raise BadRow(
                "the chosen and rejected conversations differ before their last answer, so they answer different prompts"
            )
        turns = chosen_before
    elif isinstance(prompt, list):
        turns = _message_pairs(prompt, data.prompt_column)
    elif isinstance(prompt, str):
        turns = [("user", prompt)]
    else:
        raise BadRow(f"column {data.prompt_column!r} holds {type(prompt).__name__}, not text or messages")
    if any(before and before != turns for before in (chosen_before, rejected_before)):
        raise BadRow(f"an answer holds a conversation that is not column {data.prompt_column!r}'s; give the answers alone")
    if chosen.strip() == rejected.strip():
        raise BadRow("chosen and rejected are the same answer: nothing to prefer")
    system, history, query = _prompt_of(turns, data)
    return system, history, query, chosen, rejected


def _given(value: Any) -> Any:
    """A cell's value, None when it is missing or empty (pandas' NaN included); arrays as lists."""
    value = value.tolist() if hasattr(value, "tolist") else value
    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, (str, list)) and not value):
        return None
    return None if isinstance(value, str) and not value.strip() else value


def _answer(row: dict, column: str, key: str) -> tuple[list[tuple[str, str]], str]:
    """(the conversation before it, the answer's text) of one side of a preference pair."""
    value = row.get(column)
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, list) and value:
        turns = _message_pairs(value, column)
        if turns[-1][0] != "assistant":
            raise BadRow(f"column {column!r}: the messages must end with the assistant's answer")
        if not turns[-1][1].strip():
            raise BadRow(f"column {column!r}: the assistant's answer is empty")
        return turns[:-1], turns[-1][1]
    return [], _text(row, column, None, key)


def _message_pairs(messages: list, column: str) -> list[tuple[str, str]]:
    """[(role, content)] of a {role, content} list."""
    if not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") for m in messages):
        raise BadRow(f"column {column!r} must be text or a list of {{role, content}} messages (system, user, assistant)")
    return [(m["role"], str(m.get("content") or "")) for m in messages]


def _prompt_of(turns: list[tuple[str, str]], data: DataSection) -> tuple[str | None, list[tuple[str, str]], str]:
    """(system, earlier turns, query) of a conversation that ends with the user's turn."""
    system = data.system_prompt
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    roles = [role for role, _ in turns]
    if not turns or len(turns) % 2 == 0 or roles != (["user", "assistant"] * len(turns))[: len(turns)]:
        raise BadRow("the prompt's messages must alternate user / assistant and end with the user's turn")
    if not turns[-1][1].strip():
        raise BadRow("the prompt's last user message is empty")
    texts = [content for _, content in turns]
    return system, list(zip(texts[0:-1:2], texts[1::2])), texts[-1]


def to_example(row: Any, data: DataSection, tokenizer=None) -> Example:
    if isinstance(row, BadRow):
        raise row
    rejected = None
    if data.format in PREFERENCE_FORMATS:
        system, history, query, response, rejected = preference(row, data)
        instruction = ""
    else:
        system, history, query, response, instruction = conversation(row, data)
    prompt, suffix = render(data.template, system, history, query, tokenizer, instruction)
    template = templates.REGISTRY[data.template]
    return Example(prompt, response, suffix, joint=template.joint, special_tokens=template.special_tokens, rejected=rejected)


def load_examples(source: str, data: DataSection, tokenizer=None) -> tuple[list[Example], int]:
    """Examples of a file (or hub dataset) and the count of bad rows skipped (data.on_bad_rows)."""
    examples, skipped = [], 0
    for where, row in read_rows(source, data):
        try:
            examples.append(to_example(row, data, tokenizer))
        except BadRow as err:
            if data.on_bad_rows == "error":
                raise UserError([f'{where}: {err}; fix the row, or set data.on_bad_rows = "skip"']) from None
            skipped += 1
    if not examples:
        raise UserError([f"{source}: no usable rows (skipped {skipped})"])
    return examples, skipped


@dataclass
class Split:
    train: list[Example]
    held_out: list[Example]
    skipped: int  # bad rows skipped (data.on_bad_rows = "skip")


def split_examples(recipe: Recipe, tokenizer=None) -> Split:
    """Train and held-out examples; the split is a fixed function of data.seed."""
    data = recipe.data
    examples, skipped = load_examples(data.train_file, data, tokenizer)
    if data.eval_file:
        held_out, more = load_examples(data.eval_file, data, tokenizer)
        return Split(examples, held_out, skipped + more)
    order = list(range(len(examples)))
    random.Random(data.seed).shuffle(order)
    count = int(len(examples) * data.eval_fraction)
    if data.eval_fraction > 0 and len(examples) > 1:
        count = max(count, 1)  # a small file still gets one held-out example to evaluate on
    chosen = set(order[:count])
    return Split(
        [e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen], skipped
    )


def tokenize(example: Example, tokenizer, max_length: int) -> dict[str, Any]:
    """Prompt and response tokenized apart, so the label mask falls exactly on the boundary; or, for
    a joint example, as one text whose first len(prompt tokens) are masked (as the template's own
    fine-tune script does). An example with no prompt (data.format = "text") is learned whole."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=example.special_tokens)["input_ids"]
    if example.joint:
        whole = tokenizer(example.prompt + example.response + example.suffix, add_special_tokens=example.special_tokens)
        response_ids = whole["input_ids"][len(prompt_ids) :] + [tokenizer.eos_token_id]
        prompt_ids = whole["input_ids"][: len(prompt_ids)]
    else:
        response_ids = tokenizer(example.response + example.suffix, add_special_tokens=False)["input_ids"]
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "truncated": len(prompt_ids) + len(response_ids) > max_length}


def tokenize_pair(example: Example, tokenizer, max_length: int) -> dict[str, Any]:
    """A preference pair as TRL's preference collator takes it: the prompt's tokens once, then each
    answer's (its end-of-turn text and EOS included), each side tokenized as `tokenize` does an SFT
    example. Where a template tokenizes prompt and answer as one text, the prompt is the tokens both
    sides share. Prompt + answer is cut to max_length on each side; `truncated`: either side was."""
    sides = [
        tokenize(replace(example, response=answer), tokenizer, max_length=10**9)
        for answer in (example.response, example.rejected)
    ]
    prompt_lengths = [sum(label == IGNORE_INDEX for label in side["labels"]) for side in sides]
    shared = 0
    for a, b in zip(sides[0]["input_ids"][: min(prompt_lengths)], sides[1]["input_ids"]):
        if a != b:
            break
        shared += 1
    prompt_ids = sides[0]["input_ids"][:shared]
    chosen, rejected = (side["input_ids"][shared:] for side in sides)
    room = max(max_length - len(prompt_ids), 0)
    return {
        "prompt_ids": prompt_ids[:max_length],
        "chosen_ids": chosen[:room],
        "rejected_ids": rejected[:room],
        "truncated": len(prompt_ids) + max(len(chosen), len(rejected)) > max_length,
    }


def tokenized(example: Example, tokenizer, max_length: int) -> dict[str, Any]:
    """An example's training row: an SFT example's input ids and labels, or a preference pair's ids."""
    return (tokenize_pair if example.rejected is not None else tokenize)(example, tokenizer, max_length)


def row_tokens(row: dict) -> int:
    """Tokens one row feeds the model (a pair: the prompt with each answer)."""
    if "input_ids" in row:
        return len(row["input_ids"])
    return 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])


def sequence_ids(row: dict) -> list[int]:
    """The token ids of a row as one sequence (a pair: its prompt and chosen answer)."""
    return row["input_ids"] if "input_ids" in row else row["prompt_ids"] + row["chosen_ids"]


def learns_nothing(row: dict) -> bool:
    """Truncation left it no trained token (a pair: no token of one of its answers)."""
    if "labels" in row:
        return all(label == IGNORE_INDEX for label in row["labels"])
    return not row["chosen_ids"] or not row["rejected_ids"]


def cache_key(recipe: Recipe, tokenizer_dir: str) -> str:
    digest = hashlib.sha256()
    for path in [recipe.data.train_file, recipe.data.eval_file]:
        if path and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    for name in sorted(Path(tokenizer_dir).glob("tokenizer*")) if Path(tokenizer_dir).is_dir() else []:
        digest.update(name.read_bytes())
    digest.update(json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(tokenizer_dir.encode())
    digest.update(b"rows with index and length, v3")  # the cached format
    return digest.hexdigest()[:16]


def build_train_dataset(recipe: Recipe, tokenizer, cache_dir: Path) -> tuple[Any, dict]:
    """Tokenized training set (a datasets.Dataset) and its stats, cached under cache_dir.

    Call it on rank 0 first (TrainingArguments.main_process_first): the others then read
    the cache rank 0 wrote, published with a rename so it is never seen half-written.
    """
    from datasets import Dataset, load_from_disk

    target = cache_dir / cache_key(recipe, recipe.model.name_or_path)
    if not (target / "stats.json").exists():
        split = split_examples(recipe, tokenizer)
        rows = [tokenized(e, tokenizer, recipe.data.max_length) | {"index": i} for i, e in enumerate(split.train)]
        for row in rows:
            row["length"] = row_tokens(row)  # data.batching = "grouped" sorts by it
        stats = {
            "examples": len(rows),
            "truncated": sum(r.pop("truncated") for r in rows),
            "tokens": sum(r["length"] for r in rows),
            "skipped_rows": split.skipped,
        }
        staging = staging_for(target)
        Dataset.from_list(rows).save_to_disk(str(staging))
        (staging / "stats.json").write_text(json.dumps(stats))
        publish(staging, target)
    return load_from_disk(str(target)), json.loads((target / "stats.json").read_text())


@dataclass
class TrainingSetReport:
    examples: int | None = None
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def read_training_set(recipe: Recipe, samples: int = 5) -> TrainingSetReport:
    """Pre-flight view of the data: counts, truncation, skipped rows, and the first tokenized samples."""

    report = TrainingSetReport()
    try:
        tokenizer = load_tokenizer(recipe)
    except Exception as err:  # broken, or a hub tokenizer with no network: the run could not start; check the rows
        tokenizer = None
        why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"
        if Path(recipe.model.name_or_path).exists():
            report.errors.append(f"model: the tokenizer of {recipe.model.name_or_path} cannot be loaded ({why})")
        # a hub model that cannot be had here is one error, from the model check
    if tokenizer is None and recipe.data.template == "tokenizer":  # count the rows; prompts need the tokenizer
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"template": "plain"})})
    split = split_examples(recipe, tokenizer)
    report.examples = len(split.train)
    if recipe.eval.enabled and not split.held_out:
        report.errors.append(
            "eval.enabled: no held-out examples to evaluate on; set data.eval_file or a "
            "data.eval_fraction > 0, or eval.enabled = false"
        )
    line = f"data: {len(split.train)} training, {len(split.held_out)} held-out examples ({recipe.data.format}, template {recipe.data.template})"
    if split.skipped:
        line += f"; {split.skipped} bad rows skipped"
    if tokenizer is not None:
        rows = [tokenized(e, tokenizer, recipe.data.max_length) for e in split.train]
        cut = sum(r["truncated"] for r in rows)
        line += f"; {sum(row_tokens(r) for r in rows)} tokens, {cut} truncated to data.max_length={recipe.data.max_length}"
        empty = sum(learns_nothing(r) for r in rows)
        if empty:
            report.errors.append(
                f"data.max_length: {empty} of {len(rows)} examples keep no {'token of an answer' if 'prompt_ids' in rows[0] else 'response token'} "
                f"after truncation to {recipe.data.max_length} (nothing to learn from them); raise it"
            )
        elif cut:
            report.warnings.append(
                f"data.max_length: {cut} of {len(rows)} examples are longer than {recipe.data.max_length} "
                f"tokens and lose their end; raise it if the cut part matters"
            )
        report.samples = [show_sample(i + 1, r, tokenizer) for i, r in enumerate(rows[:samples])]
    report.lines.append(line)
    return report


def show_sample(number: int, row: dict, tokenizer) -> str:
    """A tokenized example as the model sees it: masked (prompt) and trained (response) parts apart;
    a preference pair's prompt and its two answers."""
    text = lambda ids: json.dumps(tokenizer.decode(ids, skip_special_tokens=False), ensure_ascii=False)  # noqa: E731
    if "prompt_ids" in row:
        return (
            f"sample {number}: prompt {len(row['prompt_ids'])} tokens, chosen {len(row['chosen_ids'])}, "
            f"rejected {len(row['rejected_ids'])}{' (truncated)' if row['truncated'] else ''}\n"
            f"  prompt   (not trained): {text(row['prompt_ids'])}\n"
            f"  chosen   (preferred):   {text(row['chosen_ids'])}\n"
            f"  rejected (dispreferred): {text(row['rejected_ids'])}"
        )
    masked = [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    pieces = " | ".join(
        json.dumps(str(piece), ensure_ascii=False)[1:-1] for piece in tokenizer.convert_ids_to_tokens(row["input_ids"][:12])
    )
    return (
        f"sample {number}: {len(row['input_ids'])} tokens, {len(trained)} trained"
        f"{' (truncated)' if row['truncated'] else ''}\n"
        f"  first tokens:          {pieces}\n"  # a role marker split into pieces shows here, not in the text
        f"  masked  (not trained): {text(masked)}\n"
        f"  trained (labels):      {text(trained)}"
    )
