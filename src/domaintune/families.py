"""One record per model family: what every verb needs to know about an architecture, in one place.

A `Family` holds the facts about a `config.model_type` that the training, inference and export code branch on:
whether rows can be packed (the decoder masks attention by position_ids), whether the chunked loss applies
(logits are exactly `lm_head(hidden)`), whether liger-kernel patches it, whether it is a mixture of experts (the
router's auxiliary loss), the GGUF architecture llama.cpp knows it by (or why it is refused), and whether vLLM
serves it. A `TinyRecipe` says how `domaintune make-tiny-model --arch NAME` builds a small random model of the
family offline: the transformers config class, the tokenizer's kind and special tokens, and where its official
chat template comes from (an installed package: never typed from memory).

Adding a family means adding its `Family` (and a `TinyRecipe` to prove it), then its row in the family matrix test
(tests/test_families.py), whose results the supported-models table (`domaintune models`, README) is checked
against. Stdlib only: the CLI imports this module to build its `--help`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """What differs per architecture. `model_types`: the `config.model_type` values it covers."""

    name: str
    model_types: tuple[str, ...]
    packable: bool = False  # rows packed into one sequence (position_ids restart per row, no cross-row attention)
    plain_head: bool = False  # logits = lm_head(final hidden states) and nothing else: the chunked loss applies
    liger: bool = False  # liger-kernel patches it (fused linear cross-entropy) on CUDA
    moe: bool = False  # mixture of experts: the router's auxiliary loss joins the loss when the config asks for it
    gguf: str | None = None  # llama.cpp's architecture name (`general.architecture`); None: GGUF export refused
    gguf_refusal: str = ""  # why GGUF is refused, when `gguf` is None
    vllm: bool = False  # vLLM serves this architecture
    vllm_lora: bool = True  # ... and applies LoRA adapters to it (no LoRA mark in vLLM's supported-models list: False)
    batched: bool = True  # serve's continuous batcher joins requests (full-attention KV caches only)


FAMILIES: tuple[Family, ...] = (
    Family("bloom", ("bloom",), plain_head=True, gguf="bloom", vllm=True, vllm_lora=False),
    Family("llama", ("llama",), packable=True, plain_head=True, liger=True, gguf="llama", vllm=True),
    # llama.cpp converts Mistral checkpoints as its llama architecture (convert_hf_to_gguf.py: MistralModel).
    Family("mistral", ("mistral",), packable=True, plain_head=True, liger=True, gguf="llama", vllm=True),
    Family("qwen2", ("qwen2",), packable=True, plain_head=True, liger=True, gguf="qwen2", vllm=True),
    Family("qwen2_moe", ("qwen2_moe",), packable=True, plain_head=True, liger=True, moe=True, vllm=True,
           gguf_refusal="qwen2_moe has no tested GGUF conversion here"),
    Family("qwen3", ("qwen3",), packable=True, plain_head=True, liger=True, gguf="qwen3", vllm=True),
    Family("qwen3_moe", ("qwen3_moe",), packable=True, plain_head=True, liger=True, moe=True, gguf="qwen3moe",
           vllm=True),
    # Qwen3.5: linear-attention (Gated DeltaNet) layers between full-attention ones; its cache cannot be padded
    # and joined, and packed rows would leak state through the linear-attention recurrence.
    Family("qwen3_5", ("qwen3_5", "qwen3_5_text"), plain_head=True, gguf="qwen35", vllm=True, batched=False),
    # Gemma 3's logits are lm_head(hidden) unless its config soft-caps them (final_logit_softcapping, null in the
    # released checkpoints): loss.supports_lean_loss checks that. Its sliding-window layers pack: transformers
    # masks the window within each packed row (tests/training/test_family_facts.py).
    Family("gemma3", ("gemma3_text", "gemma3"), packable=True, plain_head=True, liger=True, gguf="gemma3", vllm=True,
           batched=False),
    Family("gemma", ("gemma", "gemma2"), liger=True, vllm=True,
           gguf_refusal="gemma and gemma2 have no tested GGUF conversion here"),
    Family("phi3", ("phi3",), packable=True, plain_head=True, liger=True, gguf="phi3", vllm=True),
    Family("glm4", ("glm4",), packable=True, plain_head=True, gguf="glm4", vllm=True),
    # Known to the chunked loss and liger only (no tiny model, no GGUF conversion here).
    Family("mixtral", ("mixtral",), liger=True, moe=True, vllm=True),
    # vLLM serves InternLM2 and Baichuan natively, LoRA included (its supported-models list).
    Family("internlm2", ("internlm2",), plain_head=True, vllm=True),
    Family("yi", ("yi",), plain_head=True),
    Family("baichuan", ("baichuan",), plain_head=True, vllm=True),
    Family("deepseek", ("deepseek_v2", "deepseek_v3"), plain_head=True, moe=True, vllm=True),
    Family("olmo", ("olmo", "olmo2"), plain_head=True, liger=True, vllm=True),
    Family("stablelm", ("stablelm",), plain_head=True, vllm=True, vllm_lora=False),
    Family("starcoder2", ("starcoder2",), plain_head=True, vllm=True),
    Family("granite", ("granite",), liger=True, vllm=True),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
UNKNOWN = Family("unknown", ())


def family_of(model_type: str | None) -> Family:
    """The record of a `config.model_type`; a record with every feature off for a type not listed here (such a
    model still trains, with the padded batches and its own loss, and is refused for GGUF with the reason)."""
    return _BY_TYPE.get(model_type or "", UNKNOWN)


def family_named(name: str) -> Family:
    """The record called `name` (a `TinyRecipe.family`)."""
    return next(f for f in FAMILIES if f.name == name)


def model_types(pred: str) -> set[str]:
    """The model_type values whose family has the boolean feature `pred` ("packable", "plain_head", ...)."""
    return {t for f in FAMILIES if getattr(f, pred) for t in f.model_types}


@dataclass(frozen=True)
class TinyRecipe:
    """How `make-tiny-model --arch NAME` builds a tiny model of a family (training/tiny.py reads it).

    - `config`: the transformers config class; `config_kwargs`: its family-specific settings (layer types,
      experts, window) on top of the sizes of `tiny.SIZES` (head_dim = hidden / heads; a `layer_types` pattern is
      repeated to the number of layers).
    - `tokenizer`: "bytelevel" (byte-level BPE: GPT-2, Qwen, Llama 3, GLM, BLOOM) or "spm" (SentencePiece-style BPE
      with byte fallback and "▁" for spaces: LLaMA-2, Mistral, Gemma, Phi-3). `pre`: the byte-level split regex
      ("gpt2": GPT-2's own, the original tiny models; "qwen2"; "llama3": Qwen2's with digits in groups of three);
      `space_prefix`: an SPM tokenizer prepends "▁" to the text (Gemma's does not).
    - `bos`, `eos`, `pad`, `unk`: the special tokens; `add_bos`: the tokenizer adds BOS by itself;
      `specials`: the other special tokens (chat markers); `added`: added tokens that are not special (Qwen3's
      `<think>`: decoding with skip_special_tokens keeps them); `extra_eos`: more tokens generation stops on
      (generation_config's eos_token_id list, as the family ships it).
    - `template`: where the official chat template comes from, "PACKAGE:NAME": `trl:qwen3` is
      trl/chat_templates/qwen3.jinja, `llama_cpp:MISTRAL_INSTRUCT_CHAT_TEMPLATE` a constant of
      llama_cpp.llama_chat_format; "chatml" is domaintune's own ChatML (the original tiny models).
    - `title`: the family as users name it, for the supported-models table.
    """

    arch: str
    family: str
    title: str
    config: str
    tokenizer: str = "bytelevel"
    pre: str = "qwen2"
    space_prefix: bool = True
    bos: str | None = None
    eos: str = "</s>"
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False
    specials: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    extra_eos: tuple[str, ...] = ()
    template: str = "chatml"
    config_kwargs: dict = field(default_factory=dict)

    @property
    def thinking(self) -> bool:
        """The official template has Qwen3's `enable_thinking` switch (known without reading the template: the
        table needs no package)."""
        return self.template in THINKING_TEMPLATES


# The byte-level split regexes (tokenizer.json's Split step before a ByteLevel(use_regex=false) step), the
# originals from the families' tokenizer.json files as llama.cpp's llama-vocab.cpp quotes them. The tiny
# tokenizers are built with them (TinyRecipe.pre), and the GGUF writer maps them to llama.cpp's pre-tokenizer
# names; "gpt2" is ByteLevel's own regex (no Split step).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"qwen2": _QWEN2_SPLIT,
          "llama3": _QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|"),  # Llama 3: digits in groups of up to three
          "bloom": " ?[^(\\s|[.,!?…。，、।۔،])]+"}

THINKING_TEMPLATES = {"trl:qwen3", "trl:qwen3_5_think", "trl:glm4moe"}
_CHATML = ("<|im_start|>", "<|im_end|>")


def _qwen3(arch: str, family: str, title: str, config: str, template: str, config_kwargs: dict) -> TinyRecipe:
    """Qwen3, Qwen3-MoE and Qwen3.5 share a tokenizer: byte-level, <|im_end|> ends a turn, <think> is not special."""
    return TinyRecipe(arch, family, title, config, pre="qwen2", eos="<|im_end|>", pad="<|endoftext|>",
                      specials=("<|endoftext|>", *_CHATML), added=("<think>", "</think>"),
                      extra_eos=("<|endoftext|>",), template=template, config_kwargs=config_kwargs)


TINY: dict[str, TinyRecipe] = {r.arch: r for r in (
    # The original tiny models: domaintune's ChatML template, a shared set of special tokens.
    TinyRecipe("qwen2", "qwen2", "Qwen2 / Qwen2.5", "Qwen2Config", pre="gpt2", bos="<s>", eos="</s>", pad="<pad>",
               unk="<unk>", specials=_CHATML, config_kwargs={"tie_word_embeddings": True}),
    TinyRecipe("llama", "llama", "LLaMA (LLaMA-2-style tokenizer with BOS)", "LlamaConfig", pre="gpt2", bos="<s>",
               eos="</s>", unk="<unk>", add_bos=True, specials=_CHATML, config_kwargs={"tie_word_embeddings": False}),
    TinyRecipe("bloom", "bloom", "BLOOM / BLOOMZ", "BloomConfig", pre="gpt2", bos="<s>", eos="</s>", pad="<pad>",
               unk="<unk>", specials=_CHATML),
    # The families users pick now, each with its official chat template.
    _qwen3("qwen3", "qwen3", "Qwen3", "Qwen3Config", "trl:qwen3", {"tie_word_embeddings": True}),
    _qwen3("qwen3_moe", "qwen3_moe", "Qwen3-MoE", "Qwen3MoeConfig", "trl:qwen3",
           {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
            "norm_topk_prob": True}),
    _qwen3("qwen3_5", "qwen3_5", "Qwen3.5", "Qwen3_5TextConfig", "trl:qwen3_5_think",
           {"tie_word_embeddings": True, "layer_types": ["linear_attention", "full_attention"],
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16}),
    TinyRecipe("llama3", "llama", "Llama 3", "LlamaConfig", pre="llama3", bos="<|begin_of_text|>",
               eos="<|eot_id|>", add_bos=True, template="trl:llama3",
               specials=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
               extra_eos=("<|end_of_text|>",), config_kwargs={"tie_word_embeddings": True}),
    TinyRecipe("gemma3", "gemma3", "Gemma 3", "Gemma3TextConfig", tokenizer="spm", space_prefix=False, bos="<bos>",
               eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True, template="trl:gemma3",
               specials=("<start_of_turn>", "<end_of_turn>"), extra_eos=("<end_of_turn>",),
               # Gemma 3's own layout, 5 sliding layers then a full one (llama.cpp's gemma3 fixes it; the GGUF
               # export refuses another): the micro model's 2 layers are both sliding.
               config_kwargs={"sliding_window": 8, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}),
    TinyRecipe("mistral", "mistral", "Mistral", "MistralConfig", tokenizer="spm", bos="<s>", eos="</s>",
               unk="<unk>", add_bos=True, template="llama_cpp:MISTRAL_INSTRUCT_CHAT_TEMPLATE",
               config_kwargs={"tie_word_embeddings": False, "sliding_window": None}),
    TinyRecipe("phi3", "phi3", "Phi-3", "Phi3Config", tokenizer="spm", bos="<s>", eos="<|endoftext|>",
               pad="<|endoftext|>", unk="<unk>", template="trl:phi3",
               specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), extra_eos=("<|end|>",),
               config_kwargs={"tie_word_embeddings": False}),
    TinyRecipe("glm4", "glm4", "GLM-4", "Glm4Config", pre="llama3", eos="<|endoftext|>", pad="<|endoftext|>",
               template="trl:glm4moe",
               specials=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
               added=("<think>", "</think>"),
               extra_eos=("<|user|>", "<|observation|>"), config_kwargs={"partial_rotary_factor": 0.5}),
)}
ARCHS = tuple(TINY)


# ------------------------------------------------------------------ the supported-models table
# Each row is what tests/test_families.py proves on the tiny model of `arch` (one parametrised test per column;
# tests/test_families.py::test_table_claims_only_what_the_matrix_proves keeps the two in step). A cell either
# holds what was proven or starts with "refused:" and the reason, which the matrix test checks as a clear error.
COLUMNS = ("template", "train", "thinking", "predict", "serve", "export", "gguf")
COLUMN_TITLES = {"template": "chat template", "train": "train", "thinking": "reasoning data", "predict": "predict",
                 "serve": "serve", "export": "export", "gguf": "GGUF"}


def support(arch: str) -> dict[str, str]:
    """The table row of a tiny arch: column -> what is proven (or "refused: why")."""
    r = TINY[arch]
    f = family_named(r.family)
    package, _, name = r.template.partition(":")
    template = ("domaintune's ChatML" if r.template == "chatml" else f"{name}.jinja (trl)" if package == "trl"
                else f"{name} (llama-cpp-python)")
    return {
        "template": template,
        "train": "✓ multi-turn; the template refuses a system role" if r.arch == "mistral"
        else "✓ multi-turn + system",
        "thinking": "✓ enable_thinking switch" if r.thinking else "✓ inline <think> block",
        "predict": "✓",
        "serve": "✓ batched" if f.batched else "✓ one request at a time",
        "export": "✓ safetensors",
        "gguf": f"✓ {f.gguf}" if f.gguf else f"refused: {f.gguf_refusal}",
    }


def render_table(markdown: bool = True) -> str:
    """The supported-models table (README and `domaintune models`)."""
    head = ["family", "--arch", *(COLUMN_TITLES[c] for c in COLUMNS)]
    rows = [[TINY[a].title, a, *(support(a)[c] for c in COLUMNS)] for a in ARCHS]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
                     for r in [head, *rows]) + "\n"


TABLE_NOTE = ("Each ✓ is proven on the family's tiny model (`domaintune make-tiny-model --arch ARCH`) by "
              "tests/test_families.py, one parametrised test per column. `--engine vllm` takes every family above ("
              + ", ".join(sorted({r.family for r in TINY.values()
                                  if not family_named(r.family).vllm_lora}))
              + ": a merged export, not a LoRA run); it needs a CUDA GPU and is not run by the CPU suite.")
