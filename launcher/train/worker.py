"""The training stage, on one rank: `jobs.TrainJob` calls it in every task of the training job
(and by hand: `accelerate launch --config_file RUN/accelerate.yaml -m launcher.train.worker RUN`).

Each rank writes its own log under RUN/logs/; rank 0 also writes logs/train_metrics.jsonl.
The worker trains with HF Trainer and the run's rendered deepspeed.json, then gathers and
validates the final adapter into RUN/adapter/. It never merges or evaluates: those are stages
of their own.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from launcher.adapters.merge import PROBE_FILE, validate_adapter
from launcher.config.hardware import resolve_device
from launcher.config.knobs import resolve_knobs
from launcher.config.methods import MOVES_THE_BASE
from launcher.config.recipe import Recipe
from launcher.data.examples import build_train_dataset, sequence_ids
from launcher.models.loading import load_tokenizer, load_training_base, planned_steps, quiet_libraries_for
from launcher.rundir import lifecycle
from launcher.rundir.checkpoints import (
    SET_ASIDE,
    PlanComplete,
    checkpoint_guard,
    latest_complete_checkpoint,
    set_aside_incomplete,
    step_of,
    stop_flag,
)
from launcher.rundir.runs import RunDir, publish, stage_record, staging_for
from launcher.tracking.trackers import recipe_logger, trackers, tracking_environment
from launcher.train import trainers
from launcher.train.batching import SampleLoggingCollator
from launcher.train.buildlocks import use_environment_extension_cache, watch_build_locks
from launcher.train.packing import choose_batching
from launcher.train.rendezvous import rendezvous, smoke_all_reduce, topology_line, world_from_env
from launcher.train.throughput import flops_per_token, mfu, peak_flops


def main(argv: list[str] | None = None, last_stage: bool = False) -> int:
    started = time.time()
    argv = sys.argv[1:] if argv is None else argv
    run = RunDir(Path(argv[0]))
    rank = int(os.environ.get("RANK", "0"))
    redirect_output(run.rank_log(rank))
    run.clear_failure(rank)
    use_environment_extension_cache()  # one build per environment, not one folder per user that venvs fight over
    watching = watch_build_locks()  # DeepSpeed may build an op: a lock left by a killed build is said and cleared
    try:
        recipe = run.load_recipe()

        quiet_libraries_for(recipe)  # this node's device, before DeepSpeed loads
        world = world_from_env()
        print(
            f"rank {rank} of {world['world_size']} on node {world['node']} (local rank {world['local_rank']}, "
            f"pid {os.getpid()}), master {world['master_addr']}:{world['master_port']}"
        )
        records = rendezvous(world, recipe.world_size(), backend(recipe))
        fail_if_asked(rank)
        if run.adapter.exists():  # an earlier attempt trained and saved it
            print("the final adapter exists: training is done")
        elif with_trackers(recipe, run, rank, records) and rank == 0:
            lifecycle.stage_finished(run, "train", last_stage, stage_record(started))  # this attempt, in rank 0's process
    except BaseException as err:
        traceback.print_exc()  # the log is for people
        sys.stderr.flush()
        run.record_failure(rank, err)  # launch reads this record
        return 1
    finally:
        watching.set()
    return 0


def fail_if_asked(rank: int) -> None:
    """Fault injection for tests of failure reporting: LAUNCHER_FAIL_RANK=N makes rank N fail here."""
    if os.environ.get("LAUNCHER_FAIL_RANK") == str(rank):
        raise RuntimeError(f"injected failure on rank {rank} (LAUNCHER_FAIL_RANK={rank})")


def redirect_output(log_path: Path) -> None:
    """Send this process's stdout and stderr (C level too) to its own log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)


def training_arguments(recipe: Recipe, run: RunDir, layout: str, knobs):
    """The trainer's arguments: the recipe's [train], the batching layout and the device's knobs, in the
    objective's arguments class with its own settings."""
    arguments, objective = trainers.entry(recipe).arguments(recipe)
    t, device = recipe.train, resolve_device(recipe.distributed.device)
    return arguments(
        output_dir=str(run.checkpoints),
        deepspeed=str(run.deepspeed_config),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation is checkpoints.tidy's: it counts complete checkpoints only
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # re-entrant recompute breaks with frozen inputs
        train_sampling_strategy="group_by_length" if layout == "grouped" else "random",
        length_column_name="length",
        optim=knobs.optimizer,
        use_liger_kernel=knobs.liger,
        torch_compile=knobs.compile,
        seed=t.seed,
        bf16=recipe.model.dtype == "bf16",
        fp16=recipe.model.dtype == "fp16",
        use_cpu=device == "cpu",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to=trackers(recipe) or "none",
        run_name=run.root.name,
        project=recipe.name,  # Trackio's project (W&B's and MLflow's come from their environment: tracking.py)
        disable_tqdm=True,
        **objective,
    )


def metrics_logger(run: RunDir, attempt: int, logged: tuple[str, ...] = ()):
    """A Trainer callback writing one JSON row per logged step to logs/train_metrics.jsonl (rank 0), with
    the objective's own `logged` metrics (a DPO run's rewards); its `efficiency` = (world size, FLOPs per
    token, one device's peak FLOP/s), set once the model is built, gives the row's MFU."""
    from transformers import TrainerCallback

    class MetricsLogger(TrainerCallback):
        last = (0.0, 0)  # (time, tokens seen) at the previous row
        efficiency: tuple[int, float, float | None] = (1, 0.0, None)

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.time(), state.num_input_tokens_seen)
            log = run.metrics_log
            if state.is_world_process_zero and log.exists() and log.stat().st_size:
                with open(log, "rb+") as handle:  # a row torn by a kill stays on its own line
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            clock, tokens = time.time(), state.num_input_tokens_seen
            previous, self.last = self.last, (clock, tokens)
            speed = (tokens - previous[1]) / max(clock - previous[0], 1e-9)
            row = {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "epoch": logs.get("epoch"),
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_seen": tokens,
                "tokens_per_second": speed,
                "mfu": mfu(speed, *self.efficiency),
                "time": clock,
                "attempt": attempt,
            } | {key: logs[key] for key in logged if key in logs}
            with open(run.metrics_log, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    return MetricsLogger()


def with_trackers(recipe: Recipe, run: RunDir, rank: int, records: list[dict]) -> bool:
    """train() with the run's experiment trackers set up in this process's environment."""
    with tracking_environment(recipe, run):
        return train(recipe, run, rank, records)


def train(recipe: Recipe, run: RunDir, rank: int, records: list[dict]) -> bool:
    """Train to the end (True: the final adapter is saved), or to a stop signal's checkpoint (False)."""
    import torch
    from transformers import set_seed

    stop = stop_flag()  # a signal during start-up is acted on at the first step
    attempt = run.manifest().attempts + 1  # rank 0 records it below
    device = resolve_device(recipe.distributed.device)
    layout, why = choose_batching(recipe)
    knobs = resolve_knobs(recipe, device)
    args = training_arguments(recipe, run, layout, knobs)  # before the model: it turns on ZeRO-3 sharded loading
    tokenizer = load_tokenizer(recipe)
    with args.main_process_first(local=False, desc="tokenize"):
        dataset, stats = build_train_dataset(recipe, tokenizer, run.cache)
    smoke_all_reduce()
    if rank == 0:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        print(topology_line(records, backend))
        print(
            f"data: {stats['examples']} examples, {stats['tokens']} tokens, "
            f"{stats['truncated']} truncated to data.max_length={recipe.data.max_length}, "
            f"{stats.get('skipped_rows', 0)} bad rows skipped"
        )
        print(f"batching: {layout} ({why}); precision {recipe.model.dtype}; {knobs.line()}")
        run.update_manifest(data=stats, attempts=attempt)
    init_deepspeed_comm(recipe)  # before loading: ZeRO-3 shards the weights as they load
    set_seed(recipe.train.seed)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    place = f"cuda:{local}" if device == "cuda" else "cpu"
    base = load_training_base(recipe, place, knobs.attention)
    # Before the trainer, which seeds the RNG its sampler draws from: measuring a CPU's peak draws random
    # numbers (on rank 0, once per machine), which would shift rank 0's data order against the others'.
    peak, source = peak_flops(place, base.dtype) if rank == 0 else (None, "")
    guard = checkpoint_guard(run.checkpoints, recipe.train.save_total_limit, stop, pause_at=run.pause_step())
    logger = metrics_logger(run, attempt, recipe.train.objective_spec.logged)
    objective = trainers.entry(recipe)
    trainer = objective.build(
        recipe,
        base,
        recipe.peft.spec.build_config(recipe, planned_steps(recipe, len(dataset))),
        args,
        tokenizer,
        dataset,
        SampleLoggingCollator(objective.collator(recipe, tokenizer, layout), run.logs / f"samples_rank{rank}.jsonl", attempt),
        [logger, guard, recipe_logger(recipe, run)],
    )
    model = trainer.model  # the base with its adapter
    logger.efficiency = (recipe.world_size(), flops_per_token(model), peak)
    if rank == 0:
        trainable, total = model.get_nb_trainable_parameters()
        print(f"trainable parameters {trainable} of {total}")
        print(f"MFU counts {logger.efficiency[1]:.3g} FLOPs per token against {peak or 0:.3g} FLOP/s per device ({source})")
        if recipe.peft.lora_init in MOVES_THE_BASE and not run.initial_adapter.exists():
            save_initial_adapter(model, run)
    if recipe.peft.spec.training_callback:  # AdaLoRA's rank allocator
        trainer.add_callback(recipe.peft.spec.training_callback(trainer))
    resume = resume_point(run, rank)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except PlanComplete as done:  # killed after the last checkpoint, before the adapter was published
        print(f"{resume.name} is the plan's last step ({done.step}): nothing left to train; publishing its adapter")
    if guard.stopped_at is not None:
        stopped(run, rank, guard.stopped_at)
        return False
    if guard.paused_at is not None:
        if rank == 0:
            lifecycle.paused(run)
            print(f"halving rung: saved a complete checkpoint at step {guard.paused_at}; paused for the rung's verdict")
        return False
    save_final_adapter(trainer, run, rank, probe=trained_probe(trainer, dataset, tokenizer))
    return True


def save_initial_adapter(model, run: RunDir) -> None:
    """PiSSA / OLoRA moved part of each base weight into the adapter's start: saved once (rank 0,
    first attempt), so the final adapter can be converted to one for the original base."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # reloading it must not decompose again
    staging = staging_for(run.initial_adapter)
    model.save_pretrained(str(staging))
    config.init_lora_weights = init
    publish(staging, run.initial_adapter)


def trained_probe(trainer, dataset, tokenizer) -> dict:
    """Logits of the trained model (eval mode) on the first two training examples (a pair: its prompt and
    chosen answer), saved with the
    adapter so that anyone can check a reloaded adapter reproduces the model that was trained.
    A forward of every rank: under ZeRO-3 it gathers the weights."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    rows = [{"input_ids": sequence_ids(dataset[i])} for i in range(min(2, len(dataset)))]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(rows)
    model = trainer.model
    model.eval()
    with torch.no_grad():
        device = next(p.device for p in model.parameters())
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    width = batch["input_ids"].shape[1]
    return {
        "input_ids": batch["input_ids"].contiguous(),
        "attention_mask": batch["attention_mask"].contiguous(),
        "logits": logits[:, -width:].float().cpu().contiguous(),
    }


def backend(recipe: Recipe) -> str:
    return "gloo" if resolve_device(recipe.distributed.device) == "cpu" else "nccl"


def init_deepspeed_comm(recipe: Recipe) -> None:
    """Hand the process group the rendezvous formed to DeepSpeed's comm layer.

    With use_cpu, accelerate leaves DeepSpeed's own comm layer uninitialised; ZeRO-3's sharded
    loading (zero.Init) then sees a world of one and rejects the batch sizes. Initialising it here
    wraps the existing group.
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend(recipe))


def resume_point(run: RunDir, rank: int) -> Path | None:
    """The newest complete checkpoint; incomplete newer ones are set aside (kept) first."""
    import torch.distributed as dist

    latest = latest_complete_checkpoint(run.checkpoints)
    if rank == 0:
        for path in set_aside_incomplete(run.checkpoints, after_step=step_of(latest) if latest else 0):
            print(
                f"warning: {path.name.split(SET_ASIDE)[0]} was not complete (killed while saving?); "
                f"ignored and kept as {path.name} until a newer checkpoint completes"
            )
        print(f"resuming from {latest} (step {step_of(latest)})" if latest else "starting at step 0")
    if dist.is_initialized():
        dist.barrier()
    return latest


def stopped(run: RunDir, rank: int, step: int) -> None:
    """After a stop signal: the checkpoint of `step` is complete. The job ends; on SLURM its
    teardown requeues it (manifest.stopped_in names this allocation)."""
    if rank == 0:
        lifecycle.preempted(run)
        print(f"stop signal: saved a complete checkpoint at step {step}; this job ends (on SLURM it is requeued)")


def save_final_adapter(trainer, run: RunDir, rank: int, probe: dict) -> None:
    """Gather the adapter (a collective under ZeRO-3), validate it, then publish it with a rename."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    staging = run.adapter_staging
    if rank == 0:
        staging = staging_for(run.adapter)
    if dist.is_initialized():
        dist.barrier()  # the staging folder is cleared before any rank writes into it
    if run.initial_adapter.exists():  # PiSSA / OLoRA (ZeRO <= 2: rank 0 holds every weight)
        if rank == 0:  # B·A - B0·A0 as a rank-2r LoRA of the original base
            trainer.model.save_pretrained(str(staging), path_initial_model_for_weight_conversion=str(run.initial_adapter))
    else:
        trainer.save_model(str(staging))  # every rank takes part in the ZeRO-3 gather
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        save_file(probe, str(staging / PROBE_FILE))
        summary = validate_adapter(staging, trained=True)
        publish(staging, run.adapter)
        print(f"adapter: {summary}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
