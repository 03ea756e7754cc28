"""The trainer of each objective (train.objective): HF Trainer for sft, TRL's trainers for the others.

Each entry gives the arguments class and its objective's settings, and builds the trainer from the
base model, the adapter's peft config and the worker's parts (dataset, collator, callbacks). Every
run guarantee (the checkpoint guard, the resume point, the metrics rows, the gathered and validated
adapter) lives in the worker around whichever trainer this returns, so a new objective inherits them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from launcher.config.recipe import Recipe
from launcher.data.examples import IGNORE_INDEX
from launcher.train.batching import packed_batch


@dataclass(frozen=True)
class TrainerEntry:
    arguments: Callable[[Recipe], tuple[type, dict[str, Any]]]
    """recipe -> (the arguments class, its objective's own settings)."""
    build: Callable[..., Any]
    """(recipe, base model, peft config, args, tokenizer, dataset, collator, callbacks) -> the trainer."""
    collator: Callable[[Recipe, Any, str], Callable]
    """(recipe, tokenizer, batching layout) -> what lays out a micro-batch of its rows."""


def with_lora_plus(trainer_class: type, recipe: Recipe) -> type:
    """`trainer_class`; with LoRA+ (peft.lora_plus_ratio), one whose optimizer gives B that multiple of A's
    learning rate (peft's create_loraplus_optimizer; DeepSpeed then wraps it)."""
    import torch

    ratio = recipe.peft.lora_plus_ratio
    if not ratio:
        return trainer_class

    class LoraPlus(trainer_class):
        def create_optimizer(self, model=None):
            from peft.optimizers import create_loraplus_optimizer

            if self.optimizer is None:
                self.optimizer = create_loraplus_optimizer(
                    self.model,
                    optimizer_cls=torch.optim.AdamW,
                    lr=self.args.learning_rate,
                    loraplus_lr_ratio=ratio,
                    weight_decay=self.args.weight_decay,
                    fused=self.args.optim == "adamw_torch_fused",
                )
            return self.optimizer

    return LoraPlus


# ---------------------------------------------------------------- sft: HF Trainer on next-token loss


def _sft_arguments(recipe: Recipe) -> tuple[type, dict[str, Any]]:
    from transformers import TrainingArguments

    return TrainingArguments, {}


def _sft_trainer(recipe: Recipe, base, peft_config, args, tokenizer, dataset, collator, callbacks):
    from peft import get_peft_model
    from transformers import Trainer

    model = get_peft_model(base, peft_config)
    return with_lora_plus(Trainer, recipe)(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    )


def _sft_collator(recipe: Recipe, tokenizer, layout: str) -> Callable:
    from transformers import DataCollatorForSeq2Seq

    return (
        packed_batch if layout == "packed" else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    )


# ---------------------------------------------------------------- dpo: TRL's DPOTrainer


def _dpo_arguments(recipe: Recipe) -> tuple[type, dict[str, Any]]:
    from trl import DPOConfig

    p = recipe.preference
    return DPOConfig, {
        "beta": p.beta,
        "loss_type": list(p.loss_type),
        "loss_weights": p.loss_weights,
        "label_smoothing": p.label_smoothing,
        "max_length": recipe.data.max_length,  # the pairs are cut to it already, each side (data.examples)
        "padding_free": False,  # TRL 1.16 pads preference batches whatever it is told
        "precompute_ref_log_probs": False,  # its cache lives outside the run dir; the reference runs each step
    }


def _dpo_trainer(recipe: Recipe, base, peft_config, args, tokenizer, dataset, collator, callbacks):
    """TRL's DPOTrainer given the base model and the adapter's config: it attaches the adapter, and its
    reference is the same model with the adapter disabled (no second copy of the base)."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(with_lora_plus(DPOTrainer, recipe)):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenized by launcher.data.examples.tokenize_pair: SFT's templates and truncation

    return PretokenizedDPOTrainer(
        model=base,
        ref_model=None,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
        peft_config=peft_config,
    )


def _dpo_collator(recipe: Recipe, tokenizer, layout: str) -> Callable:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)


ENTRIES: dict[str, TrainerEntry] = {
    "sft": TrainerEntry(_sft_arguments, _sft_trainer, _sft_collator),
    "dpo": TrainerEntry(_dpo_arguments, _dpo_trainer, _dpo_collator),
}


def entry(recipe: Recipe) -> TrainerEntry:
    return ENTRIES[recipe.train.objective]
