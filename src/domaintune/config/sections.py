"""The config sections `model`, `lora`, `data`, `train` and the whole `Config` (with `selfinstruct`, `judge`).

Every field has a default and a one-line description (`domaintune config --explain` prints them).
Values derived from several fields are methods of their section (e.g. `TrainConfig.gradient_accumulation`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import Field, field_validator, model_validator

from ..errors import UserError
from .base import Section
from .judge import JudgeConfig
from .methods import FreezeConfig, LoraConfig, check_rope_scaling
from .selfinstruct import SelfInstructConfig
from .sources import SourceConfig, as_sources, validate_sources

# transformers' set_seed also seeds numpy, whose seeds are 32-bit unsigned: -1 or 2**32 failed only after the
# model had loaded.
MAX_SEED = 2**32 - 1


# The longest name of one file or folder on common file systems (ext4, APFS, NTFS), in bytes.
NAME_MAX = 255


def usable_path(v: str | None) -> str | None:
    """A file or folder name the operating system can take: no NUL character, no part longer than NAME_MAX, and a
    `~user` that names a user here (pathlib's expanduser raises otherwise, wherever the name is used later)."""
    if v is None:
        return v
    if "\0" in v:
        raise ValueError("contains a NUL character, which no file name may hold")
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in Path(v).parts):
        raise ValueError(f"has a file or folder name longer than {NAME_MAX} bytes, which file systems refuse")
    if v.startswith("~"):
        try:
            Path(v).expanduser()
        except RuntimeError:
            raise ValueError(f"'{v.split('/')[0]}' names no home folder on this machine") from None
    return v


class ModelConfig(Section):
    name_or_path: str | None = Field(
        None,
        description="Base model (required to train): a local Hugging Face model directory or a hub id "
                    "(e.g. Qwen/Qwen2.5-0.5B-Instruct).",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weight/compute dtype; auto = bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model (only for models you trust)."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the base model quantized with bitsandbytes (QLoRA); needs a CUDA GPU."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    attn_implementation: str | None = Field(
        None,
        description="Attention kernel passed to transformers (e.g. sdpa, eager, flash_attention_2); "
                    "None = library default.",
    )
    allow_pickle: bool = Field(
        False, description="Load .bin/.pt (pickle) weights when a model has no safetensors; pickles can run code, "
                           "so only for files you trust (--allow-pickle).")
    rope_scaling: dict[str, Any] | None = Field(
        None, description="Long context: RoPE scaling as transformers takes it, e.g. {rope_type: linear, factor: 2.0} "
                          "(linear, dynamic or yarn; factor > 1). With it data.cutoff_len may pass the model's native "
                          "length; the run records it, so predict, chat, serve, export and GGUF use the same scaling.")

    _rope = field_validator("rope_scaling")(check_rope_scaling)

    @field_validator("name_or_path")
    @classmethod
    def _name_or_path(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is empty: set it to a local model folder or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
        return usable_path(v)

    def required_name(self) -> str:
        """`name_or_path`, or a UserError saying it must be set (a verb that loads the base model calls this)."""
        if self.name_or_path is None:
            raise UserError("model.name_or_path is not set: give the base model, in the config file (model: "
                            "name_or_path: ...) or as model.name_or_path=... on the command line; a local model "
                            "folder or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
        return self.name_or_path


class DataConfig(Section):
    path: Union[str, SourceConfig, list[Union[str, SourceConfig]]] = Field(
        "examples/data/train.jsonl",
        description="Training data: one source or a list, mixed. A source is a file (JSON lines, JSON array, CSV, "
                    "TSV, Parquet, Arrow), a folder, a glob or a save_to_disk folder, or a mapping {path | hub, "
                    "format, columns, weight | rows | fraction, subset, split, revision, name} (data.path[].*).",
    )
    eval_path: Union[str, SourceConfig, list[Union[str, SourceConfig]], None] = Field(
        None, description="Validation data, in the same forms as path; when unset, val_size rows are split off "
                          "the training mix."
    )
    template: str = Field(
        "domain_zh",
        description="Prompt template: domain_zh, alpaca, chatml, tokenizer (the model's chat_template) "
                    "or a path to a template JSON.",
    )
    system: str | None = Field(
        None, description="System prompt used for rows that do not carry their own; None = the template's default."
    )
    cutoff_len: int = Field(512, gt=0, description="Maximum tokens per training sample.")
    overlength: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with samples longer than cutoff_len (always counted and reported)."
    )
    train_on_inputs: bool = Field(False, description="Also compute the loss on prompts (default: responses only).")
    thinking: Literal["keep", "drop", "empty"] = Field(
        "keep",
        description="Reasoning in answers (reasoning_content, or <think>...</think> before the answer): keep = "
                    "train it (templates that render reasoning_content, Qwen3-style, get it as that field and "
                    "enable_thinking=true; other templates get <think>\\n...\\n</think>\\n\\n before the answer); "
                    "drop = remove it (templates with enable_thinking get enable_thinking=false: the empty think "
                    "block is in the prompt); empty = train an empty think block before every answer. The "
                    "enable_thinking used is saved with the run, so predict, chat and serve send the same prompt.",
    )
    train_on_turns: Literal["all", "last"] = Field(
        "all",
        description="Which assistant turns of a multi-turn row train: all (default) or last (only the row's last "
                    "assistant turn; the earlier ones stay in its prompt, untrained). An assistant message with "
                    "\"weight\": 0 (OpenAI's fine-tuning format) is never trained, whichever is set; one that calls "
                    "tools trains its call, and tool results are never trained.",
    )
    val_size: Union[int, float] = Field(
        0.1, ge=0,
        description="Validation split taken from the training file: a row count (int; at most 20% of the rows, "
                    "said when capped) or a fraction in (0, 1); at least one row always stays for training.",
    )
    val_max_rows: int | None = Field(None, ge=0, description="Upper bound on the validation split's row count.")
    dedup: Literal["off", "exact", "near"] = Field(
        "off",
        description="Drop duplicate training rows (counted per source): exact = the same text after normalising case, "
                    "spaces and punctuation; near = also rows whose ROUGE-L with a kept row is >= near_threshold "
                    "(MinHash LSH candidates, as gen-data). The first occurrence, in source order, is kept.",
    )
    exclude: Union[str, list[str], None] = Field(
        None,
        description="Test file(s) to decontaminate against: training rows whose prompt equals (or, with dedup: near, "
                    "nearly equals) a prompt of these files are dropped and counted.",
    )
    near_threshold: float = Field(0.7, gt=0, le=1, description="ROUGE-L at or above which two texts are near "
                                                                 "duplicates (dedup: near, exclude).")
    streaming: bool = Field(
        False,
        description="Stream rows from the sources instead of preparing them all first (data larger than memory or "
                    "disk): needs train.max_steps; sources mix by interleaving with their weights as probabilities; "
                    "validation only from eval_path.",
    )
    num_proc: Union[int, Literal["auto"]] = Field(
        "auto", description="Worker processes for tokenising; auto = 1 under 20,000 rows, else up to 8 (the CPUs); "
                           "never more than one per 32 rows."
    )
    cache: bool = Field(
        True,
        description="Keep the prepared (read, mixed, tokenised) data in cache_dir, keyed by the data, tokenizer, "
                    "template and settings: a second run with the same inputs starts without tokenising.",
    )
    cache_dir: str | None = Field(
        None, description="Where prepared data is cached; None = $DOMAINTUNE_CACHE, else ~/.cache/domaintune/data."
    )

    _paths = field_validator("cache_dir")(usable_path)

    @field_validator("path", "eval_path", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        return validate_sources(v)

    @field_validator("path", "eval_path", "exclude")
    @classmethod
    def _source_paths(cls, v: Any) -> Any:
        for s in v if isinstance(v, list) else [v]:
            usable_path(s if isinstance(s, str) else s.path if isinstance(s, SourceConfig) else None)
        if isinstance(v, list) and not v:
            raise ValueError("an empty list names no data; give at least one source")
        return v

    @field_validator("num_proc")
    @classmethod
    def _num_proc(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v

    @property
    def sources(self) -> list[SourceConfig]:
        """data.path as a list of sources."""
        return as_sources(self.path)

    @property
    def eval_sources(self) -> list[SourceConfig]:
        """data.eval_path as a list of sources (empty when unset)."""
        return as_sources(self.eval_path)

    @property
    def path_label(self) -> str:
        """data.path in one line, for summaries and messages: the path, or the sources' names joined by " + "."""
        return " + ".join(s.label for s in self.sources)

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not v.is_integer() and not 0 < v < 1:
            raise ValueError("a fraction must lie in (0, 1); use an integer for a row count")
        return v


class TrainConfig(Section):
    output_dir: str = Field("runs/quickstart", description="Run directory: checkpoints, final weights, logs, reports.")
    stage: Literal["sft", "dpo", "orpo", "kto", "simpo"] = Field(
        "sft", description="sft = supervised tuning on answers; dpo, orpo, kto, simpo = preference tuning (TRL) on "
                           "chosen/rejected pairs (kto: also good/bad completions; simpo: TRL's CPO trainer with the "
                           "SimPO loss, no reference model). A preference stage usually starts from an SFT run: "
                           "model.name_or_path: runs/my-sft.",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin (TRL's simpo_gamma).")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the LoRA B matrices learn at this times learning_rate (PEFT's "
                                "create_loraplus_optimizer; 16 is the paper's choice); None = off. LoRA only.")
    neftune_alpha: float | None = Field(
        None, gt=0, description="NEFTune: uniform noise of this scale on the input embeddings while training, never in "
                                "evaluation (transformers' neftune_noise_alpha; 5 is usual); None = off.")
    beta: float = Field(
        0.1, gt=0, description="Preference stages: dpo/kto beta (how far from the reference model the policy may "
                               "move; smaller = further); orpo: the weight of the odds-ratio term (TRL's beta); "
                               "simpo: the reward scale (the SimPO paper uses 2 to 2.5).",
    )
    batch_size: int = Field(
        8, gt=0, description="Global batch size = per_device_batch_size x gradient accumulation x processes."
    )
    per_device_batch_size: Union[int, Literal["auto"]] = Field(
        2, description="Rows per device and micro-batch; auto = the largest that fits: probed on a GPU with the "
                       "longest rows, up to 8 on CPU; always a divisor of batch_size / processes.",
    )
    gradient_accumulation_steps: int | None = Field(
        None, gt=0,
        description="Explicit gradient accumulation; None = batch_size / (per_device_batch_size x processes).",
    )
    num_epochs: float = Field(3.0, gt=0, description="Training epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = use num_epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field(
        "cosine", description="Learning-rate schedule (transformers name: cosine, linear, constant, ...)."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps used for linear warm-up.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio when set.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    optim: str = Field(
        "adamw_torch", description="Optimizer (transformers name, e.g. adamw_torch, paged_adamw_8bit for QLoRA)."
    )
    logging_steps: int = Field(10, gt=0, description="Log loss and learning rate every N optimizer steps.")
    eval_steps: int = Field(50, gt=0, description="Compute the validation loss every N steps (and at the end).")
    save_steps: int = Field(50, gt=0, description="Save a resumable checkpoint every N steps.")
    save_total_limit: int | None = Field(3, gt=0, description="Keep at most this many checkpoints (None = all).")
    seed: int = Field(42, ge=0, le=MAX_SEED,
                      description="Random seed (model init of new weights, data order, validation split); "
                                  "0 to 4294967295.")
    report_to: list[str] = Field(
        default_factory=lambda: ["none"],
        description="Trackers: none, tensorboard, wandb, mlflow, trackio, swanlab, comet_ml, or all (each needs its "
                    "package: pip install 'domaintune[tensorboard]', 'domaintune[swanlab]', or wandb, mlflow, "
                    "trackio; SWANLAB_MODE=local logs offline).",
    )
    gradient_checkpointing: Union[bool, Literal["auto"]] = Field(
        "auto", description="Recompute activations to save memory; auto = on only when the longest micro-batch's "
                            "activations would not fit the GPU's free memory (never on CPU).",
    )
    group_by_length: bool | None = Field(
        None, description="Batch samples of similar length together (less padding); None = on when batches are "
                          "padded (see batching). The order depends only on seed, epoch and the global batch: "
                          "the same rows per step at any process count, and exact on --resume.",
    )
    batching: Literal["auto", "pack", "pad"] = Field(
        "auto", description="auto = pack the rows of a micro-batch into one sequence without padding (position_ids, "
                            "no attention across samples) where the architecture supports it, else pad; pack; pad.",
    )
    loss: Literal["auto", "chunked", "liger", "model"] = Field(
        "auto", description="auto = liger-kernel's fused loss on CUDA when installed (domaintune[fast]) and the model "
                            "is supported, else chunked (LM head and cross-entropy only at target positions, in "
                            "chunks: never the full logits) where the architecture allows, else the model's own.",
    )
    torch_compile: bool = Field(False, description="Compile the model with torch.compile (opt-in).")
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="How several processes (torchrun / accelerate launch) share the work: ddp = each holds the "
                           "whole model; fsdp = parameters, gradients and optimizer state sharded (PyTorch FSDP2); "
                           "deepspeed = DeepSpeed ZeRO (needs `pip install 'domaintune[deepspeed]'` and "
                           "distributed_config). One process: ddp is plain training.",
    )
    distributed_config: str | None = Field(
        None, description="fsdp: a JSON file of transformers' fsdp_config (None = full shard, transformer-layer "
                          "wrapping, full state dict on save: configs/distributed/fsdp.json); deepspeed: the "
                          "DeepSpeed JSON config (configs/distributed/zero2.json, zero3.json, zero3_offload.json).",
    )
    trainer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="For power users: more transformers TrainingArguments, passed through as given (e.g. "
                    "{adam_beta2: 0.95, lr_scheduler_kwargs: {num_cycles: 0.25}}). Each key must be a real field; "
                    "the ones domaintune sets from this section or on purpose (output folder, batch sizes, logging, "
                    "evaluation and saving plan, device, engine) are refused with the train.* key to use instead.",
    )
    dataloader_num_workers: int = Field(0, ge=0, description="Data-loading worker processes.")

    _paths = field_validator("output_dir", "distributed_config")(usable_path)

    @field_validator("per_device_batch_size")
    @classmethod
    def _per_device(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive integer or auto")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    def per_device(self, resolved: int | None = None) -> int:
        """The per-device batch: `per_device_batch_size`, or `resolved` where that is auto."""
        if self.per_device_batch_size == "auto":
            if resolved is None:
                raise ValueError("per_device_batch_size is auto: pass the resolved value")
            return resolved
        return self.per_device_batch_size

    def gradient_accumulation(self, world_size: int, per_device: int | None = None) -> int:
        """Accumulation steps that keep the global `batch_size` over `world_size` processes; an explicit
        `gradient_accumulation_steps` wins (see `global_batch` for what it then amounts to). `per_device`: the
        resolved per-device batch when `per_device_batch_size` is auto."""
        if self.gradient_accumulation_steps:
            return self.gradient_accumulation_steps
        per = self.per_device(per_device)
        per_step = per * world_size
        if self.batch_size % per_step:
            raise UserError(f"train.batch_size {self.batch_size} is not a multiple of per_device_batch_size "
                            f"{per} x {world_size} process(es); change one of them")
        return max(1, self.batch_size // per_step)

    def global_batch(self, world_size: int, per_device: int | None = None) -> int:
        """Rows per optimizer step: per-device batch x processes x accumulation."""
        return self.per_device(per_device) * world_size * self.gradient_accumulation(world_size, per_device)


OPTIONAL_SECTIONS = ("selfinstruct", "judge")  # sections that belong to other verbs than training


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings.")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig,
                                 description="Freeze tuning: full fine-tuning of some layers, the rest frozen.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    selfinstruct: SelfInstructConfig = Field(
        default_factory=SelfInstructConfig, description="Data generation (gen-data)."
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="LLM-as-a-judge comparison (judge).")

    @model_validator(mode="after")
    def _check(self):
        if self.model.quantization != "none" and not self.lora.enabled:
            raise ValueError("model.quantization needs lora.enabled: true "
                             "(QLoRA trains an adapter on a quantized base)")
        if self.freeze.enabled and self.lora.enabled:
            raise ValueError("freeze.enabled trains some layers' own weights: set lora.enabled: false with it "
                             "(freeze tuning is the third mode, beside LoRA and full fine-tuning)")
        if self.train.loraplus_lr_ratio is not None and not self.lora.enabled:
            raise ValueError("train.loraplus_lr_ratio is for LoRA adapters: set lora.enabled: true, or leave it out")
        return self

    def to_dict(self, omit_default_sections: bool = False) -> dict:
        """The config as plain data. With `omit_default_sections`, sections that other verbs own
        (`OPTIONAL_SECTIONS`, e.g. `selfinstruct`) are left out while they hold only defaults: a training run's
        config.yaml, a converted flat config and the report show what matters to them."""
        out = self.model_dump(mode="json")
        if omit_default_sections:
            for name in OPTIONAL_SECTIONS:
                if getattr(self, name) == type(getattr(self, name))():
                    out.pop(name)
        return out

    def to_yaml(self, omit_default_sections: bool = False) -> str:
        return yaml.safe_dump(self.to_dict(omit_default_sections), sort_keys=False, allow_unicode=True)
