"""TOML recipe -> typed, validated Recipe.

Every default lives in the field definitions below, and nowhere else. Problems are collected
as `UserError` lines (launcher.errors) ("key.path: what is wrong; how to fix") so the CLI can print one clear
line per problem instead of a traceback.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from launcher.config import methods, objectives, templates
from launcher.config.hardware import resolve_device, resolve_dtype
from launcher.errors import UserError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
SEED_MAX = 2**32 - 1  # numpy's seed range, which set_seed hands the seed to


class Section(BaseModel):
    # strict: a TOML value of the wrong type is refused, not coerced ("16" is no number, true no count).
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, strict=True, allow_inf_nan=False
    )

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: Any) -> Any:
        # Values may end up in shell scripts and YAML; a newline or control character in a
        # string is never what a user meant.
        if isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
                    raise ValueError(f"{key}: contains a newline or control character; remove it")
        return data


class ModelSection(Section):
    name_or_path: str = Field(min_length=1)
    """Base model: a local directory (relative paths are resolved against the recipe file) or a hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin the base model to."""
    trust_remote_code: bool = False
    """Allow the model's own Python code from the hub to run (needed by TransNormer, ChatGLM)."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Dtype of the base weights and of training; auto: bf16 where the device has it (Ampere+ GPUs, AVX512-BF16/AMX CPUs), else fp32."""

    @model_validator(mode="after")
    def _remote_code_is_pinned(self):
        if self.trust_remote_code and not self.revision and not Path(self.name_or_path).is_absolute():
            raise ValueError(
                "model.revision: trust_remote_code runs the hub's Python code; pin model.revision "
                "to a commit (or tag) so that code cannot change under you"
            )
        return self


class DataSection(Section):
    train_file: str = Field(min_length=1)
    """Training data: a local .json/.jsonl/.csv/.parquet file (relative to the recipe file) or a hub dataset id."""
    split: str = "train"
    """Split of a hub dataset to read."""
    eval_file: str | None = None
    """Held-out data for the final evaluation; when unset, `eval_fraction` of train_file is held out."""
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of train_file held out for evaluation when eval_file is not given."""
    format: Literal[objectives.SFT_FORMATS + objectives.PREFERENCE_FORMATS] = "alpaca"
    """Row format: alpaca (instruction/input/output), prompt-response (+ history; AdGen's content/summary), text, messages; preference (dpo)."""
    instruction_column: str = "instruction"
    """alpaca: column holding the instruction."""
    input_column: str = "input"
    """alpaca: column holding the optional input appended to the instruction."""
    output_column: str = "output"
    """alpaca: column holding the target response."""
    prompt_column: str = "prompt"
    """prompt-response: column holding the prompt (AdGen: "content")."""
    response_column: str = "response"
    """prompt-response: column holding the response (AdGen: "summary")."""
    history_column: str | None = None
    """alpaca / prompt-response: column holding earlier [query, answer] turns (ChatGLM style), if any."""
    text_column: str = "text"
    """text: column holding the text to learn whole (english_quotes: "quote")."""
    messages_column: str = "messages"
    """messages: column holding a list of {role, content} (system, then user / assistant turns)."""
    chosen_column: str = "chosen"
    """preference: column holding the preferred answer (text, or messages ending with the assistant's)."""
    rejected_column: str = "rejected"
    """preference: column holding the dispreferred answer to the same prompt (text, or messages)."""
    system_prompt: str | None = None
    """System text put before every prompt (chatml, transnormer, chatglm3, plain and tokenizer templates)."""
    template: Literal[templates.NAMES] = "plain"
    """Prompt template: plain, chatml, transnormer (its fine-tune script's), chatglm (ChatGLM2's), chatglm3 (role tokens), tokenizer (its chat template)."""
    max_length: int = Field(256, gt=0)
    """Maximum tokens per example (prompt + response); longer examples are truncated and counted."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A row with invalid JSON or a missing/empty field: stop with its file and line, or skip it and count."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the train/eval split."""
    batching: Literal["auto", "packed", "grouped", "padded"] = "auto"
    """Micro-batch layout: packed (one row, no padding, attention within each example), grouped (similar lengths), padded; auto: packed if supported."""


class PeftSection(Section):
    method: Literal[methods.NAMES] = "lora"
    """Adapter method: lora, qlora (4-bit base), lora-8bit (8-bit base), adalora, ia3, prefix-tuning, prompt-tuning, p-tuning."""
    r: int = Field(8, gt=0)
    """LoRA rank (lora, qlora, lora-8bit)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / r (LoRA family)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input (LoRA family)."""
    target_modules: list[str] | Literal["all-linear"] | None = None
    """Module names (or suffixes) that get adapters, or "all-linear"; unset: all-linear for the LoRA family, peft's per-model default for ia3."""
    use_dora: bool = False
    """LoRA family: DoRA, a learned magnitude per output row over LoRA's direction (merges exactly)."""
    use_rslora: bool = False
    """LoRA family: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    lora_init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    """LoRA family: adapter start; pissa (principal singular vectors, fast SVD) and olora (QR) move them out of the base weights."""
    lora_plus_ratio: float | None = Field(None, gt=0)
    """LoRA family: LoRA+, B's learning rate = this x A's (the paper suggests 16); unset: one learning rate."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """qlora: 4-bit data type of the frozen base."""
    double_quant: bool = True
    """qlora: quantize the quantization constants too (saves ~0.4 bit per weight)."""
    init_r: int = Field(12, gt=0)
    """adalora: rank every adapted matrix starts with."""
    target_r: int = Field(8, gt=0)
    """adalora: average rank the budget is pruned to."""
    tinit: float = Field(0.1, ge=0)
    """adalora: warm-up before ranks are pruned: steps, or a fraction of the planned steps when below 1."""
    tfinal: float = Field(0.2, ge=0)
    """adalora: final stretch trained with the ranks fixed: steps, or a fraction of the planned steps when below 1."""
    delta_t: int = Field(1, gt=0)
    """adalora: steps between two budget allocations."""
    feedforward_modules: list[str] | None = None
    """ia3: target modules whose input (not output) is scaled; must be among target_modules."""
    num_virtual_tokens: int = Field(20, gt=0)
    """Prompt family: virtual tokens prepended to every example."""
    prompt_init: Literal["random", "text"] = "random"
    """prompt-tuning: start the soft prompt from random vectors or from the embedding of prompt_init_text."""
    prompt_init_text: str | None = None
    """prompt-tuning: the text whose token embeddings initialise the soft prompt (prompt_init = "text")."""
    encoder_type: Literal["mlp", "lstm"] = "mlp"
    """p-tuning: the prompt encoder."""
    encoder_hidden_size: int | None = Field(None, gt=0)
    """p-tuning / prefix-tuning: hidden size of the prompt encoder (default: the model's hidden size)."""
    prefix_projection: bool = False
    """prefix-tuning: produce the prefix through a two-layer MLP (more parameters, often steadier)."""

    @field_validator("r", "init_r", "target_r", "num_virtual_tokens", mode="before")
    @classmethod
    def _rank_is_integer(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"must be a positive integer, got {json.dumps(value)}")
        return value

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or not all(value)):
            raise ValueError('needs at least one non-empty module name (or "all-linear"); remove the key for the default')
        return value

    @model_validator(mode="after")
    def _keys_of_this_method(self):
        for key in sorted(self.model_fields_set - {"method"}):
            owners = methods.owners_of(key)
            if self.method not in owners:
                raise ValueError(
                    f"peft.{key} belongs to {' / '.join(owners)}, not {self.method}; remove it or change peft.method"
                )
        for problem in self.spec.recipe_problems(self):
            raise ValueError(problem)
        if self.lora_init in methods.MOVES_THE_BASE and self.spec.quantization:
            raise ValueError(
                f"peft.lora_init: {self.lora_init} starts from the base's full-precision weights, which "
                f'{self.method} quantizes; use method = "lora" or another lora_init'
            )
        return self

    @property
    def spec(self) -> methods.Method:
        """This method's entry in the PEFT-method registry."""
        return methods.method(self.method)

    def adalora_steps(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps for a run of `total_steps`."""
        as_steps = lambda value: int(value * total_steps) if value < 1 else int(value)  # noqa: E731
        return as_steps(self.tinit), as_steps(self.tfinal)


class TrainSection(Section):
    objective: Literal[objectives.NAMES] = "sft"
    """What the adapter learns: sft (next-token loss on the response), dpo (preference pairs, data.format = "preference")."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = Field(-1, ge=-1)
    """Optimizer steps to run; -1 means derive from epochs."""
    micro_batch_size: int = Field(4, gt=0)
    """Examples per rank per forward pass."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warm-up."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm (0 disables)."""
    save_steps: int = Field(50, gt=0)
    """Save a checkpoint every this many optimizer steps."""
    save_total_limit: int | None = Field(None, gt=0)
    """Keep at most this many checkpoints (oldest removed first); unset keeps all."""
    logging_steps: int = Field(1, gt=0)
    """Write a row to logs/train_metrics.jsonl every this many steps."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (non-reentrant)."""
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention implementation: auto is flash_attention_2 on CUDA when flash-attn is installed, the model's default (sdpa where it has it) otherwise."""
    optimizer: Literal["auto", "adamw", "adamw_fused"] = "auto"
    """AdamW implementation: auto is torch's fused kernel (one kernel per step for all tensors, on CUDA and CPU)."""
    liger_kernels: bool | None = None
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); CUDA only; unset: on with CUDA when liger-kernel is installed."""
    compile: bool = False
    """torch.compile the model (opt-in: the first steps pay for compilation)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "none"]] = ["tensorboard"]
    """Experiment trackers (one name or a list): tensorboard (RUN/tensorboard/, offline), wandb, mlflow, trackio (in the run dir by default), or "none"."""
    seed: int = Field(42, ge=0, le=SEED_MAX)
    """Seed of model init, adapter init and data order."""

    @property
    def objective_spec(self) -> objectives.Objective:
        """This objective's entry in the objective registry."""
        return objectives.objective(self.objective)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _none_alone(cls, value: list[str]) -> list[str]:
        if "none" in value and len(value) > 1:
            raise ValueError(f"{value}: 'none' cannot be listed with trackers; give the trackers, or \"none\" alone")
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: a tracker is listed twice")
        return value


class PreferenceSection(Section):
    """Keys of the preference objectives (train.objective = "dpo")."""

    beta: float = Field(0.1, gt=0)
    """dpo: how far the policy may move from the reference (higher: closer to it); IPO's regulariser."""
    loss_type: list[Literal[objectives.DPO_LOSSES]] = ["sigmoid"]
    """dpo: TRL's DPO loss (one name or a list, combined with loss_weights): sigmoid, ipo, robust, hinge, ..."""
    loss_weights: list[float] | None = None
    """dpo: the weight of each loss_type when several are combined (unset: 1.0 each)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """dpo: robust / exo_pair losses: the probability that a pair's preference is flipped."""

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _a_weight_per_loss(self):
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"preference.loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} loss types "
                f"{self.loss_type}; give one weight per loss type"
            )
        return self


class DistributedSection(Section):
    procs_per_node: int = Field(1, gt=0)
    """Worker processes per node (one per GPU on GPU machines)."""
    nodes: int = Field(1, gt=0)
    """Nodes to run on (more than one needs the SLURM executor)."""
    deepspeed: str = "zero2"
    """DeepSpeed template: a name in ds_configs/ (zero2, zero3, zero3-offload) or a path to a JSON file."""
    deepspeed_overrides: dict[str, Any] = {}
    """Keys merged into the DeepSpeed template (nested tables merge key by key)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where workers run; auto picks cuda when nvidia-smi sees a GPU."""
    gpu_memory_gb: float | None = Field(None, gt=0)
    """Memory of one device; pre-flight warns when its per-device estimate exceeds it."""


TIME_PATTERN = r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$|^\d+$"
MEM_PATTERN = r"^\d+[KMGT]?$"


class EvalSection(Section):
    enabled: bool = True
    """Run the batch evaluation (base vs adapter) after training."""
    data: str | None = None
    """File (or hub dataset) to evaluate on, in data.format; default: the held-out split."""
    max_examples: int = Field(200, gt=0)
    """Evaluate at most this many examples."""
    batch_size: int = Field(16, gt=0)
    """Prompts per generation batch (batches are built from length-sorted prompts)."""
    max_new_tokens: int = Field(32, gt=0)
    """Generation budget per prompt; generation stops earlier at EOS."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (with do_sample)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (with do_sample)."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Sampling seed (each shard adds its index)."""
    checkpoints: Literal["final", "all"] = "final"
    """Evaluate the final adapter only, or every complete checkpoint too."""
    backend: Literal["hf", "vllm"] = "hf"
    """Generation backend: hf (transformers generate), or vllm for the base and LoRA adapters (requirements/vllm-env; GPUs: [vllm]); HF where vLLM cannot."""
    benchmarks: list[str] = []
    """lm-evaluation-harness tasks run on every system too (e.g. ["ceval-valid", "cmmlu", "mmlu"]); needs the [benchmarks] extra."""
    benchmark_tasks_dir: str | None = None
    """A folder of your own lm-eval task YAML files (their names can then go in eval.benchmarks)."""
    benchmark_limit: int | None = Field(None, gt=0)
    """Run at most this many samples of each benchmark task (default: all)."""
    metrics_convention: Literal["auto", "chatglm", "sacrebleu"] = "auto"
    """How BLEU-4 and ROUGE are counted: chatglm (ChatGLM AdGen / LLaMA-Factory), sacrebleu (corpus BLEU); auto: chatglm for Chinese references."""
    shards: int = Field(1, gt=0)
    """Split the examples over this many processes (local) or SLURM tasks."""
    time: str = Field("01:00:00", pattern=TIME_PATTERN)
    """SLURM time limit of the chained eval job."""
    cpus_per_task: int | None = Field(None, gt=0)
    """CPUs of each eval task on SLURM (default: the cluster's)."""
    gpus_per_task: int | None = Field(None, ge=0)
    """GPUs of each eval task on SLURM (default: none requested)."""
    mem: str | None = Field(None, pattern=MEM_PATTERN)
    """Memory of the eval job's node on SLURM (default: the cluster's)."""


class MergeSection(Section):
    enabled: bool = True
    """Merge the adapter into the base model after training (merged/)."""
    time: str = Field("01:00:00", pattern=TIME_PATTERN)
    """SLURM time limit of the chained merge job."""
    cpus_per_task: int | None = Field(None, gt=0)
    """CPUs of the merge job on SLURM (default: the cluster's)."""
    mem: str | None = Field(None, pattern=MEM_PATTERN)
    """Memory of the merge job on SLURM: about one shard plus the adapter (default: the cluster's)."""


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SECRET_NAME_PATTERN = r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|_KEY$"
# Values shaped like the credentials users hold: HF, GitHub, OpenAI-style, Slack tokens, W&B keys (40 hex).
SECRET_VALUE_PATTERN = r"^(hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}|xox[abpr]-\S+|[0-9a-f]{40})$"
# What goes into an #SBATCH line: sbatch splits those lines with its own tokenizer, so shell quoting
# cannot make them safe; only the characters SLURM itself allows in each value get there.
SLURM_NAMES = r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$"  # partitions, accounts, QOS: names or a comma list
SLURM_FEATURES = r"^[A-Za-z0-9_.,:&|*!\[\]()-]+$"  # constraint: feature names, & | , * [ ] ( ) ! :


class SlurmSection(Section):
    profile: str | None = Field(None, pattern=NAME_PATTERN)
    """Cluster profile slurm/profiles/<profile>.toml; its keys override this section's (the CLI overrides both)."""
    partition: str | None = None
    """Partition to submit to (sbatch --partition); unset uses the cluster's default."""
    account: str | None = None
    """Account to charge (sbatch --account)."""
    qos: str | None = None
    """Quality of service (sbatch --qos)."""
    constraint: str | None = None
    """Node features required (sbatch --constraint)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs per node (sbatch --gpus-per-node); one rank per GPU."""
    cpus_per_task: int | None = Field(None, gt=0)
    """CPU cores per rank (sbatch --cpus-per-task); also sets OMP_NUM_THREADS."""
    mem: str | None = Field(None, pattern=MEM_PATTERN)
    """Memory per node, e.g. "64G" (sbatch --mem)."""
    time: str = Field("01:00:00", pattern=TIME_PATTERN)
    """Wall-time limit of the training job: minutes, HH:MM:SS or D-HH:MM:SS."""
    signal_lead_s: int = Field(120, ge=10)
    """Seconds before the time limit at which SLURM signals the job to save a checkpoint and requeue."""
    max_restarts: int = Field(2, ge=0)
    """Times a crashed job is requeued to resume from its last checkpoint (none after a crash that made no step)."""
    setup: list[str] = []
    """Shell commands run in the job before the ranks start (e.g. "module load cuda"); run as written."""
    environment: dict[str, str] = {}
    """Environment variables exported to every rank; values are shell-quoted."""

    @field_validator("setup", "environment", mode="before")
    @classmethod
    def _one_line_each(cls, value: Any) -> Any:
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        for item in items:
            if isinstance(item, str) and any(ord(c) < 32 or ord(c) == 127 for c in item):
                raise ValueError(f"{json.dumps(item)} contains a newline or control character; one line each")
        if isinstance(value, dict):
            for key in value:
                if not re.match(ENV_NAME_PATTERN, key):
                    raise ValueError(f"{json.dumps(key)} is not a valid environment variable name")
                if isinstance(value[key], str) and re.match(SECRET_VALUE_PATTERN, value[key]):
                    raise ValueError(
                        f"{key}: its value looks like a token or key; recipes and rendered scripts are no place "
                        f"for it: export {key} in your shell instead (SLURM passes it on to the job)"
                    )
                if re.search(SECRET_NAME_PATTERN, key, re.IGNORECASE):
                    raise ValueError(
                        f"{key} looks like a secret: recipes and rendered scripts are no place for it; "
                        f"export {key} in your shell instead (SLURM passes it on to the job)"
                    )
        return value

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _sbatch_safe(cls, value: str | None, info) -> str | None:
        allowed = SLURM_FEATURES if info.field_name == "constraint" else SLURM_NAMES
        if value is not None and not re.match(allowed, value):
            what = (
                "feature names joined by & | , with * [ ] ( ) ! :"
                if info.field_name == "constraint"
                else "a name of letters, digits, '.', '_' and '-' (or a comma-separated list of them)"
            )
            raise ValueError(f"{json.dumps(value)} is not {what}, as SLURM accepts on an #SBATCH line")
        return value

    def time_minutes(self) -> int:
        return minutes(self.time)


def minutes(time: str) -> int:
    """A SLURM time ("MM", "HH:MM:SS" or "D-HH:MM:SS") in whole minutes, rounded up."""
    if time.isdigit():
        return int(time)
    days, _, clock = time.rpartition("-")
    hours, mins, seconds = (int(x) for x in clock.split(":"))
    return int(days or 0) * 1440 + hours * 60 + mins + (1 if seconds else 0)


class Recipe(Section):
    name: str = Field(pattern=NAME_PATTERN)
    """Run name (default: the recipe file's name without .toml); the default run dir is runs/<name>."""
    model: ModelSection
    data: DataSection
    peft: PeftSection = PeftSection()
    train: TrainSection = TrainSection()
    preference: PreferenceSection = PreferenceSection()
    distributed: DistributedSection = DistributedSection()
    eval: EvalSection = EvalSection()
    merge: MergeSection = MergeSection()
    slurm: SlurmSection = SlurmSection()
    _chosen: dict[str, str] = PrivateAttr(default_factory=dict)
    """key -> why: the values "auto" was resolved to on this machine (validate_recipe), for pre-flight to say."""

    @model_validator(mode="after")
    def _objective_takes_the_data(self):
        goal, used = self.train.objective, self.preference.model_fields_set
        for problem in objectives.problems(goal, self.data.format, used, self.peft.method):
            raise ValueError(problem)
        if self.train.objective_spec.reference_forward and self.peft.lora_init in methods.MOVES_THE_BASE:
            raise ValueError(
                f"peft.lora_init: {self.peft.lora_init} moves part of the base weights into the adapter, so the adapter "
                f'disabled (train.objective = "{goal}"\'s reference) is no longer the base; use "default" or "gaussian"'
            )
        return self

    def world_size(self) -> int:
        return self.distributed.nodes * self.distributed.procs_per_node

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe; [peft] and [preference] list only the keys of its method and objective
        (others would be refused)."""
        resolved = self.model_dump(mode="json", exclude_none=True)
        resolved["peft"] = {
            key: value for key, value in resolved["peft"].items() if key == "method" or key in self.peft.spec.keys
        }
        resolved["preference"] = {
            key: value for key, value in resolved["preference"].items() if key in self.train.objective_spec.keys
        }
        return resolved

    def fingerprint(self) -> str:
        """Hash of the resolved recipe: two runs with the same hash train the same thing."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def with_new_defaults(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe written by an earlier version, given the keys of `new` (today's resolved recipe)
    it lacks where they hold their defaults (an SFT run of before train.objective existed is an sft run),
    so that comparing the two shows only what really changed."""
    filled = copy.deepcopy(old)
    for name, table in new.items():
        if not isinstance(table, dict) or not isinstance(filled.setdefault(name, {}), dict):
            continue
        fields = getattr(Recipe.model_fields.get(name), "annotation", None)
        for key, value in table.items():
            field = getattr(fields, "model_fields", {}).get(key)
            if key not in filled[name] and field is not None and not field.is_required() and value == _json_default(field):
                filled[name][key] = value
    return filled


def _json_default(field) -> Any:
    default = field.get_default(call_default_factory=True)
    return default.model_dump(mode="json") if isinstance(default, BaseModel) else default


def reference_rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every recipe key: the README's recipe reference is made from this."""
    rows = []
    for section_name, section in Recipe.model_fields.items():
        annotation = section.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            rows.append((section_name, "file name", section.description or ""))
            continue
        for key, field in annotation.model_fields.items():
            rows.append((f"{section_name}.{key}", _default_text(field), field.description or ""))
    return rows


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    return json.dumps(field.default) if not isinstance(field.default, BaseModel) else ""


def reference_markdown() -> str:
    lines = ["| key | default | what it does |", "|---|---|---|"]
    for key, default, meaning in reference_rows():
        shown = f"`{default}`" if default else ""
        lines.append(f"| `{key}` | {shown} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- loading and overrides

PATH_KEYS = ("model.name_or_path", "data.train_file", "data.eval_file", "eval.data", "eval.benchmark_tasks_dir")


def load_recipe(
    path: str | Path, overrides: list[str] = (), raw: dict[str, Any] | None = None, values: dict[str, Any] | None = None
) -> Recipe:
    """Read, override, resolve paths and validate a recipe; raise UserError on any problem.
    `raw`: the file's tables already read (a sweep reads its recipe once for all its variants);
    `values`: KEY -> value set as if written in the file (a sweep's variant: paths relative to the recipe)."""
    path = Path(path)
    if raw is None:
        raw = read_recipe_tables(path)
        if "sweep" in raw:
            raise UserError([f"{path}: has a [sweep] table; run its variants with `launch sweep {path}`"])
    raw = {key: value for key, value in copy.deepcopy(raw).items() if key != "sweep"}
    raw.setdefault("name", path.stem)
    for key, value in (values or {}).items():
        _set_key(raw, key, copy.deepcopy(value))
    _resolve_paths(raw, base=path.parent.resolve())
    for item in overrides:
        _apply_override(raw, item)
    _apply_profile(raw)
    for item in overrides:  # flags win over the profile too
        _apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def read_recipe_tables(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError([f"{path}: recipe file not found"])
    return read_toml(path)


def resolve_automatic(recipe: Recipe) -> Recipe:
    """model.dtype = "auto" becomes this machine's choice (the run dir then records the concrete
    value, so every stage and a resume use the same); why is kept for pre-flight to say."""

    if recipe.model.dtype == "auto":
        dtype, why = resolve_dtype(resolve_device(recipe.distributed.device))
        recipe.model.dtype = dtype
        recipe._chosen["model.dtype"] = f"{dtype} ({why}; set model.dtype to force one)"
    return recipe


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables; a file that is not UTF-8 TOML is one line naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError([f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8"]) from None
    except tomllib.TOMLDecodeError as err:
        raise UserError([f"{path}: TOML syntax error: {err}"]) from None
    except OSError as err:
        raise UserError([f"{path}: cannot read it ({err.strerror})"]) from None


PROFILE_DIR = Path(__file__).resolve().parents[2] / "slurm" / "profiles"


def _apply_profile(raw: dict[str, Any]) -> None:
    """Merge slurm/profiles/<name>.toml over the recipe's [slurm] section (profile keys win)."""
    slurm = raw.get("slurm")
    name = slurm.get("profile") if isinstance(slurm, dict) else None
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        return  # absent, or reported by validation
    path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))) or "none"
        raise UserError([f"slurm.profile: no profile {name!r} in {PROFILE_DIR} (known: {known})"])
    profile = read_toml(path)
    try:
        SlurmSection.model_validate(profile | {"profile": name})
    except ValidationError as err:
        raise UserError([f"{path}: " + _describe(e | {"loc": ("slurm", *e["loc"])}) for e in err.errors()]) from None
    slurm.update(profile)


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError([_describe(e) for e in err.errors()]) from None
    missing = _missing_files(recipe)
    if missing:
        raise UserError(missing)
    return resolve_automatic(recipe)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """`--set key.path=value`: value parsed as TOML (so 2e-4, true, [..] keep their types)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError([f"--set {item}: expected KEY=VALUE, for example --set train.learning_rate=2e-4"])
    check_key(key)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: take it as a string
    if not isinstance(value, (str, int, float, bool, list, dict)):
        value = text  # TOML dates and times (01:00:00) are strings to us
    if key in PATH_KEYS and isinstance(value, str) and _looks_like_path(value):
        value = str(Path(value).expanduser().resolve())  # --set paths are relative to the cwd
    _set_key(raw, key, value)


def _set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError([f"--set {key}: {part} is not a table"])
    node[leaf] = value


def check_key(key: str, flag: str = "--set") -> None:
    """A recipe key path that exists (`flag KEY: unknown key; did you mean ...?` otherwise)."""
    model: type[BaseModel] = Recipe
    walked = []
    for part in key.split("."):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(walked + [part])
            raise UserError([f"{flag} {where}: unknown key{_suggestion(part, fields, walked)}"])
        walked.append(part)
        annotation = fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return  # a leaf, or a free-form table such as deepspeed_overrides
        model = annotation


def _maybe_hub_id(value: str) -> bool:
    """A hub id ("org/name"), not a path: no leading ./ ~ /, and no data-file extension."""
    return not _looks_like_path(value) and not value.endswith(DATA_SUFFIXES)


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Paths written in a recipe are relative to the recipe file, so recipes travel with their data."""
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        value = raw.get(section, {}).get(leaf) if isinstance(raw.get(section), dict) else None
        if not isinstance(value, str):
            continue
        if _maybe_hub_id(value) and not (base / value).exists():
            continue  # a hub id (model or dataset)
        if not Path(value).expanduser().is_absolute():
            raw[section][leaf] = str((base / Path(value).expanduser()).resolve())


def _missing_files(recipe: Recipe) -> list[str]:
    problems = []
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        value = getattr(getattr(recipe, section), leaf)
        if value is None or not Path(value).is_absolute():
            continue  # a hub id
        if not Path(value).exists():
            problems.append(f"{key}: {value} does not exist; fix the path (relative paths are read from the recipe's folder)")
    return problems


def _suggestion(word: str, choices, walked: list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {'.'.join(walked + close)}?"
    return f"; valid keys: {', '.join(choices)}"


# What a pattern-checked value must look like, with an example (pydantic only knows the regex).
PATTERN_FORMS = {
    NAME_PATTERN: "is not a plain name; use letters, digits, '.', '_' and '-' (starting with a letter or digit), e.g. \"gpu-a100\"",
    TIME_PATTERN: 'is not a SLURM time; write minutes, HH:MM:SS or D-HH:MM:SS, e.g. "02:00:00"',
    MEM_PATTERN: 'is not a SLURM memory size; write a whole number with K, M, G or T (no B), e.g. "64G"',
}


def _section_at(loc: list[str]) -> type[BaseModel]:
    """The recipe's section model that `loc` (a key path) points into."""
    parent: type[BaseModel] = Recipe
    for part in loc:
        field = parent.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        parent = annotation
    return parent


def _describe(error: dict[str, Any]) -> str:
    """One line for one pydantic error, in the recipe's own vocabulary."""
    loc = [str(p) for p in error["loc"]]
    where = ".".join(loc) or "recipe"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key{_suggestion(loc[-1], _section_at(loc[:-1]).model_fields, loc[:-1])}"
    if kind == "missing":
        return f"{where}: required key is missing; add it to the recipe"
    given = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    if message[1:2].islower():  # "Input should be ..." reads on after the key path; "HF_TOKEN ..." stays
        message = message[:1].lower() + message[1:]
    if kind == "value_error":
        key = message.split(":", 1)[0]
        if not loc and "." in key:  # a rule across sections names its key path itself
            return message
        if key in _section_at(loc).model_fields:  # a section's own check names its key: section.key: ...
            return f"{where}.{message}"
        return message if message.startswith(f"{where}.") else f"{where}: {message}"
    if kind == "literal_error":
        return f"{where}: {message}, got {json.dumps(given, default=str)}"
    if kind == "string_pattern_mismatch":
        form = PATTERN_FORMS.get(error.get("ctx", {}).get("pattern"), "has characters that are not allowed here")
        return f"{where}: {json.dumps(given)} {form}"
    return f"{where}: {message}, got {json.dumps(given, default=str)}"
