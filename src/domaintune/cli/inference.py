"""Verbs that use a trained model: `predict`, `chat`, `serve`, `export`.

Their sampling flags come from `GenerationParams` with the defaults of the verb's named preset
(inference/params.py): "predict" decodes greedily, "chat" and "serve" sample (temperature 0 = greedy).
"""
from __future__ import annotations

import argparse
import os
from typing import Mapping

from .options import (
    add_model_dir_options,
    add_sampling_options,
    add_thinking_option,
    sampling_params,
    thinking_flag,
)

PREDICT_SAMPLING = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "top_k",
                    "repetition_penalty", "seed")
CHAT_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
SERVE_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")  # seed: per request

SERVE_HELP = ("Serve a run (or an exported / any local model directory) with an OpenAI-compatible API: GET /health, "
              "GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent events), "
              "and a web chat page at /. The model loads in the background after the server starts listening "
              "(/health: 503 while loading, 200 when ready). Concurrent requests are decoded together "
              "(continuous batching: a request joins the running batch at the next step and leaves when it ends, "
              "its answer the same as alone); beyond --max-batch-size they wait in a first-come-first-served "
              "queue of --max-queue places, and beyond that get 429 with Retry-After. A client that disconnects "
              "leaves the batch at the next step. GET /status shows the requests running and queued. "
              "Binds 127.0.0.1 unless --host says otherwise; set an API key (--api-key or "
              "$DOMAINTUNE_API_KEY) before exposing it: an empty or blank key is an error, not 'no key', and "
              "whitespace around a key is dropped (HTTP cannot send it). Without a key, only requests addressed to "
              "localhost, 127.0.0.1, ::1, the --host address or an --allowed-hosts name are answered (others get "
              "403: a defence against DNS rebinding by web pages). Requests that leave sampling parameters out get "
              "the defaults below (the 'serve' preset); temperature 0 means greedy (and so does one below 1e-5). "
              "max_tokens, given or not, is capped by the context the prompt leaves: an answer cut there ends "
              "with finish_reason 'length' (a prompt that fills the context is a 400). 'stop' strings, "
              "presence_penalty, frequency_penalty and logit_bias are honoured; what cannot be (n > 1, logprobs, "
              "tools, tool_choice 'required', response_format json_object/json_schema) is a 400 naming the "
              "field, never ignored.")


EXPORT_HELP = """\
Write a standalone model from a run: a LoRA or QLoRA adapter is merged into its base model (loaded unquantized
on the CPU); a full fine-tuned run is saved again.

--format safetensors (default): a Hugging Face model folder: safetensors weights (sharded above
--max-shard-size), the tokenizer with chat_template set to the run's own template (so apply_chat_template gives
the training prompt), generation_config.json, template.json and a model card (README.md).

--format gguf: one GGUF file for llama.cpp and Ollama, and an Ollama Modelfile beside it (TEMPLATE and stop
tokens from the run's template). --quant: f32, f16 (default), bf16, q8_0; for k-quants such as Q4_K_M run
llama.cpp's llama-quantize on the f16 file. An architecture llama.cpp cannot load this way is refused, with the
reason, before any weights load.

The export is written beside OUT and moved into place when complete, so a failed or killed export leaves nothing
that looks finished. Guide: docs/howto/deploy.md.
"""


def _add_engine_option(p: argparse.ArgumentParser) -> None:
    from ..inference.vllm_engine import ENGINES

    p.add_argument("--engine", choices=ENGINES, default="hf",
                   help="hf: transformers (CPU or GPU; serve batches concurrent requests); vllm: vLLM's engine on a "
                        "CUDA GPU, with the run's adapter and prompt template (pip install 'domaintune[vllm]') "
                        "(default: %(default)s)")


THREADS_CAP = 4  # the default --threads is at most this many (see THREADS_HELP)
THREADS_HELP = ("CPU threads for the model's matrix products (torch.set_num_threads; no effect on GPU work). Why not "
                "every core by default: decoding a small model on a CPU is bound by memory bandwidth, so threads "
                "past about 4 gain little, while threads beyond the cores that are free (this program's own HTTP and "
                "tokenizer work, its clients, other jobs) make every step wait: a loaded server on a small machine "
                "ran 100 tokens in 20 s with every core and in 5.4 s with one. Give 1 when several processes share "
                "the machine, more on a large idle one (default: $OMP_NUM_THREADS if set, else the usable cores "
                "up to 4)")


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def default_threads(environ: Mapping[str, str], usable_cores: int) -> int | None:
    """The thread count to set when --threads is not given: None where $OMP_NUM_THREADS already says it (torch
    reads it itself), else min(usable cores, THREADS_CAP)."""
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return max(1, min(usable_cores, THREADS_CAP))


def _apply_threads(a: argparse.Namespace) -> None:
    """Set torch's CPU threads from --threads (or the default) before any model loads."""
    from ..errors import UserError

    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads must be at least 1, got {a.threads}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = a.threads if a.threads is not None else default_threads(os.environ, cores)
    if n is not None:
        import torch

        torch.set_num_threads(n)


def register(sub: argparse._SubParsersAction) -> None:
    _register_predict(sub)
    _register_chat(sub)
    _register_serve(sub)
    _register_export(sub)


def _register_predict(sub: argparse._SubParsersAction) -> None:
    from ..inference.predict import FORMATS

    p = sub.add_parser("predict", help="generate answers for a test file with a trained run, then score them",
                       description="Generate an answer for every row of a test file (JSON lines or a JSON array, "
                                   "alpaca or messages format) with RUN's model and prompt template; write "
                                   "predictions.jsonl (resumable: rerun the same command after an interruption) and "
                                   "metrics.json.")
    p.add_argument("run", metavar="RUN",
                   help="run directory made by `domaintune train` (or a model directory with --template)")
    p.add_argument("--data", required=True, metavar="TEST",
                   help="test file (required); each row's last assistant turn / output is its target")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="predictions file (default: %(default)s = RUN/predictions.jsonl, or "
                        "RUN/predictions.base.jsonl with --base-only)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: %(default)s)")
    _add_engine_option(p)
    add_sampling_options(p, "predict", PREDICT_SAMPLING, zero_is_greedy=False)
    add_model_dir_options(p, base_only="use the base model without the run's adapter, for a before/after comparison",
                          template="prompt template (domain_zh, alpaca, chatml, tokenizer or a .json) instead of the "
                                   "run's template.json (default: %(default)s = the run's)", device=False)
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="json-array also writes [{input, predict, target}, ...] as .json next to the predictions "
                        "(default: %(default)s)")
    p.add_argument("--no-eval", action="store_true", help="only predict; do not compute metrics.json (default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing predictions file instead of resuming it (default: off)")
    p.add_argument("--limit", type=int, default=None,
                   help="predict only the first N rows (default: %(default)s = all)")
    add_thinking_option(p)
    _add_threads_option(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(a: argparse.Namespace) -> int:
    from ..inference.predict import run_predict

    _apply_threads(a)
    params = sampling_params(a, "predict", PREDICT_SAMPLING, zero_is_greedy=False)
    run_predict(a.run, a.data, out=a.out, params=params, batch_size=a.batch_size, base_only=a.base_only,
                template=a.template, fmt=a.format, evaluate=not a.no_eval, limit=a.limit, overwrite=a.overwrite,
                allow_pickle=a.allow_pickle, engine_kind=a.engine, thinking=thinking_flag(a))
    return 0


def _register_chat(sub: argparse._SubParsersAction) -> None:
    from ..inference import chat

    p = sub.add_parser("chat", help="chat with a run (or an exported / local model) in the terminal, streaming",
                       description=chat.__doc__.split("\n\n", 1)[1] + "\n" + chat.HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, exported model or local model directory (required)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's default)")
    add_sampling_options(p, "chat", CHAT_SAMPLING, zero_is_greedy=True)
    p.add_argument("--context", type=int, default=None,
                   help="token budget for history + answer (default: the model's context length)")
    add_model_dir_options(p, base_only="talk to the base model, without the run's adapter")
    add_thinking_option(p)
    _add_threads_option(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(a: argparse.Namespace) -> int:
    from ..inference.chat import run_chat

    _apply_threads(a)
    params = sampling_params(a, "chat", CHAT_SAMPLING, zero_is_greedy=True)
    return run_chat(a.run, base_only=a.base_only, template=a.template, params=params, system=a.system,
                    context_len=a.context, device=a.device, dtype=a.dtype, allow_pickle=a.allow_pickle,
                    thinking=thinking_flag(a))


def _register_serve(sub: argparse._SubParsersAction) -> None:
    from ..inference.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE
    from ..inference.serve.server import ENV_KEY

    p = sub.add_parser("serve", help="OpenAI-compatible API server + web chat page for a run or model directory",
                       description=SERVE_HELP)
    p.add_argument("run", help="run directory (adapter or full model), exported model, or local model directory "
                               "(required)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind; 0.0.0.0 exposes the server (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/*; printable ASCII, not empty (default: "
                        f"${ENV_KEY} if set, else no key)")
    p.add_argument("--allowed-hosts", action="append", default=None, metavar="HOSTS",
                   help="without an API key, also answer requests addressed to these host names or addresses "
                        "(comma-separated, repeatable; '*' = any host, which turns the DNS-rebinding check off) "
                        "(default: none: only the bound address, localhost, 127.0.0.1 and [::1])")
    p.add_argument("--model-name", default=None,
                   help="model id clients must send (default: the directory's name, '-base' added with --base-only)")
    add_sampling_options(p, "serve", SERVE_SAMPLING, zero_is_greedy=True, flag_names={"max_new_tokens": "--max-tokens"},
                         prefix="for a request that leaves it out: ")
    _add_engine_option(p)
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help="requests decoded together; more memory for the attention cache, more throughput "
                        "(default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests admitted beyond the batch, waiting for a place; past it the server answers 429 "
                        "with Retry-After (0: no waiting) (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted; larger ones get 413 (default: %(default)s)")
    add_model_dir_options(p, base_only="serve the base model without the run's adapter")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: %(default)s)")
    _add_threads_option(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    from ..inference.serve.server import run_serve

    _apply_threads(a)
    defaults = sampling_params(a, "serve", SERVE_SAMPLING, zero_is_greedy=True)
    allowed_hosts = [h for value in a.allowed_hosts or [] for h in value.split(",")]
    return run_serve(a.run, host=a.host, port=a.port, api_key=a.api_key, model_name=a.model_name,
                     base_only=a.base_only, template=a.template, defaults=defaults, max_body_bytes=a.max_body_bytes,
                     device=a.device, dtype=a.dtype, log_level=a.log_level, allowed_hosts=allowed_hosts,
                     allow_pickle=a.allow_pickle, max_batch_size=a.max_batch_size, max_queue=a.max_queue,
                     engine_kind=a.engine)


def _register_export(sub: argparse._SubParsersAction) -> None:
    from ..inference import gguf_export
    from ..training.precision import DTYPES

    p = sub.add_parser("export", help="merge LoRA into the base model and save a standalone model directory "
                                      "(transformers) or a GGUF file + Ollama Modelfile (llama.cpp, Ollama)",
                       description=EXPORT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (LoRA, QLoRA or full fine-tuning) (required)")
    p.add_argument("--out", required=True, help="output directory, new or empty; for --format gguf also a file "
                                                "name ending in .gguf (default name: RUN-QUANT.gguf) (required)")
    p.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                   help="safetensors: a Hugging Face model directory; gguf: one .gguf file for llama.cpp/Ollama/"
                        "LM Studio and an Ollama Modelfile (needs the gguf extra) (default: %(default)s)")
    p.add_argument("--quant", choices=gguf_export.QUANTS, default=None,
                   help="--format gguf: tensor type of the weight matrices; norms and biases stay f32. For "
                        "k-quants (Q4_K_M ...) run llama.cpp's llama-quantize on the f16 file (default: f16)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype the model is loaded and the adapter merged in, and the weight dtype of a "
                        "safetensors export; auto = the base checkpoint's dtype, fp32 if unstated "
                        "(default: %(default)s)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="--format safetensors: split weights into shards of at most this size "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export: safetensors replaces the --out folder (one with "
                        "config.json or template.json); gguf replaces the .gguf file and the Modelfile beside "
                        "it, and never touches other files (default: off)")
    add_model_dir_options(p, template="template for a run without template.json (default: the run's "
                                      "template.json)", device=False)
    p.set_defaults(func=cmd_export)


def cmd_export(a: argparse.Namespace) -> int:
    if a.format == "gguf":
        from ..inference.gguf_export import run_export_gguf

        run_export_gguf(a.run, a.out, a.quant or "f16", a.dtype, a.overwrite, a.template, allow_pickle=a.allow_pickle)
        return 0
    from ..errors import UserError
    from ..inference.export import run_export

    if a.quant is not None:
        raise UserError("--quant applies to --format gguf; a safetensors export takes --dtype")
    run_export(a.run, a.out, a.dtype, a.max_shard_size, a.overwrite, a.template, allow_pickle=a.allow_pickle)
    return 0
