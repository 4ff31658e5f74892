"""`domaintune export RUN --format gguf --out DIR`: one GGUF file for llama.cpp, Ollama and LM Studio, plus
an Ollama `Modelfile` beside it.

- The run is loaded as for the safetensors export (the LoRA adapter merged into the base on the CPU), and
  its tensors are written one at a time, so memory stays at one model plus one tensor.
- Built on `gguf`, llama.cpp's own Python package: `GGUFWriter`, the architecture and key constants, the
  HF-to-GGUF tensor-name maps (`get_tensor_name_map`) and the quantisers (`gguf.quants`). What the package
  does not hold is llama.cpp's converter script (convert_hf_to_gguf.py, not on PyPI from llama.cpp); the
  architecture rules taken from it live in `gguf_arch.py`, one comment each, driven by the family record
  (`families.Family.gguf`): llama (and Mistral), qwen2, bloom, qwen3, qwen3moe, qwen35, gemma3, phi3, glm4.
  Others, and what llama.cpp would compute differently, are refused with the reason before any weights load.
- Tokenizers (`gguf_vocab.py`): byte-level BPE as llama.cpp's "gpt2" tokenizer; SentencePiece-style BPE with
  byte fallback (Mistral, Gemma, Phi-3) as its "llama" tokenizer (`gguf_spm.py`).
- `--quant`: f32, f16 (default), bf16, q8_0. Norms, biases and other 1-D tensors, MoE routers and the linear
  attention's convolution stay F32, as llama.cpp's converter keeps them; a matrix whose rows do not split into
  q8_0 blocks of 32 falls back to f16 (counted and reported). k-quants (Q4_K_M and friends): the `gguf` package
  cannot make them; run llama.cpp's `llama-quantize FILE-f16.gguf FILE-Q4_K_M.gguf Q4_K_M` on the f16 export.
- The GGUF carries the tokenizer (tokens, types, merges and pre-tokenizer, or scores), BOS/EOS/UNK/PAD ids, the
  template's turn-end token as EOT (so llama.cpp stops on it), whether BOS is added, `tokenizer.chat_template` =
  the run's template as Jinja (exactly what `Template.encode` renders, BOS included where the tokenizer adds
  one), and the chat sampling defaults (`general.sampling.*`, from `params.PRESETS["chat"]`).
- `--out` is a folder (the file is `RUN-QUANT.gguf` in it) or a file name ending in `.gguf`; the Modelfile goes
  beside the file. Nothing else in the folder is touched, and an existing GGUF or Modelfile is replaced only
  with `--overwrite`. Both are written whole under temporary names (`NAME.gguf.partial`, `Modelfile.partial`),
  then renamed, GGUF first: an export killed before the GGUF's rename changes nothing, and one killed between
  the renames leaves a pair the next export in that folder completes (`_finish_pair`). A full disk ends in one
  line, the previous files intact.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import console
from ..errors import UserError
from ..jsonl import disk_error, fsync_path
from ..rundir import paths_overlap
from . import gguf_arch
from .export import load_merged
from .gguf_vocab import add_tokenizer, check_tokenizer, general_name

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .loading import RunSource

QUANTS = ("f32", "f16", "bf16", "q8_0")
MODELFILE = "Modelfile"
PARTIAL = ".partial"  # NAME.gguf.partial and Modelfile.partial: written whole, then renamed into place


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf needs llama.cpp's gguf package: pip install 'domaintune[gguf]'") from None
    return gguf


@dataclass
class Planned:
    """One tensor of the file: its GGUF name and type, its shape (PyTorch order) and how to make its data."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray]  # float32, made when written (one tensor in memory at a time)


def run_export_gguf(run: str | Path, out: str | Path, quant: str = "f16", dtype: str = "auto",
                    overwrite: bool = False, template: str | None = None, allow_pickle: bool = False) -> Path:
    """Write the GGUF and a Modelfile beside it; returns the GGUF path. `out` is a folder (the file is then
    `<run name>-<quant>.gguf` in it) or a path ending in `.gguf`. Nothing but these two files is ever
    replaced, and those only with `overwrite`."""
    from .modelfile import modelfile_text, write_modelfile

    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)} (k-quants such as Q4_K_M: run "
                        "llama.cpp's llama-quantize on the f16 export; see docs/howto/deploy.md)")
    gguf = _gguf()
    out = Path(out)
    run_name = Path(run).resolve().name
    path = out if out.suffix == ".gguf" else out / f"{run_name}-{quant}.gguf"
    if path.parent.is_dir() and not paths_overlap(run, path) and _finish_pair(path.parent) == path and not overwrite:
        print(f"exported {Path(run).resolve()} -> {path} (finished the export an interruption had left without "
              f"its {MODELFILE})")
        return path

    def precheck(src: RunSource, tok: Any) -> None:
        _check_arch(src)
        check_tokenizer(tok)

    m = load_merged(run, dtype, template, allow_pickle, lambda run_path: _check_out(run_path, path, overwrite),
                    precheck=precheck)
    modelfile = modelfile_text(path.name, m.template, m.tokenizer)  # what it cannot hold stops us before writing
    conf = m.model.config.to_dict()
    conf["architectures"] = [type(m.model).__name__]  # the class that was loaded, whatever config.json said
    arch = gguf_arch.check(conf)
    partial, journal = path.with_name(path.name + PARTIAL), path.parent / (MODELFILE + PARTIAL)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fallbacks = _write(gguf, partial, m, arch, conf, quant, run_name)
        fsync_path(partial)
        write_modelfile(journal, modelfile)
        # The pair: from here a kill leaves a state _finish_pair completes (GGUF in place) or undoes (not yet).
        os.replace(partial, path)
        os.replace(journal, path.parent / MODELFILE)
    except BaseException as e:
        if partial.exists():  # the GGUF was not renamed: nothing changed, and nothing of this try is left
            partial.unlink()
            journal.unlink(missing_ok=True)
        kept = f" (the previous {path.name} and {MODELFILE} are unchanged)" if path.exists() else ""
        err = disk_error(e, path, f"Nothing was written{kept}. Free some space (or choose another --out) and run "
                                  "the same command again")
        if err is None:
            raise
        raise err from None
    note = f"; {len(fallbacks)} matrices kept in f16 (rows not a multiple of 32): {', '.join(fallbacks)}" \
        if fallbacks else ""
    print(f"exported {m.run.path} -> {path} ({arch}, {quant}; {m.how}){note}")
    console.note(f"  llama.cpp: llama-server -m {path} --jinja\n"
                 f"  Ollama:    cd {path.parent} && ollama create {run_name.lower()} -f {MODELFILE}")
    return path


def _check_out(run: Path, path: Path, overwrite: bool) -> None:
    if paths_overlap(run, path):
        raise UserError(f"--out '{path}' must be outside the run directory '{run}'")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"--out '{path.parent}' exists and is not a directory")
    taken = [p for p in (path, path.parent / MODELFILE) if p.exists()]
    if taken and not overwrite:
        raise UserError(f"{' and '.join(f'{p}' for p in taken)} already exist{'s' if len(taken) == 1 else ''}: "
                        "choose another --out, or pass --overwrite to replace the GGUF file and the Modelfile "
                        "(nothing else in the folder is touched)")
    if path.is_dir():
        raise UserError(f"--out '{path}' is a directory; give a folder without the .gguf suffix or a new file name")


def _finish_pair(folder: Path) -> Path | None:
    """Complete or undo the GGUF + Modelfile pair a killed export left in `folder`; returns the GGUF when it
    completed one. Modelfile.partial, written whole before the GGUF is renamed, records the pair: when its GGUF
    is in place (no NAME.gguf.partial any more) only the Modelfile's rename was missing, and it is done now;
    otherwise the GGUF never reached its name, and both temporary files are removed."""
    from .modelfile import modelfile_target

    journal = folder / (MODELFILE + PARTIAL)
    if not journal.is_file():
        return None
    target = modelfile_target(journal.read_text(encoding="utf-8", errors="replace"))
    gguf = folder / target if target and "/" not in target else None
    if gguf is not None and gguf.is_file() and not gguf.with_name(gguf.name + PARTIAL).exists():
        os.replace(journal, folder / MODELFILE)
        console.note(f"{gguf}: moved its {MODELFILE} into place, which an interrupted export had left as "
                     f"{journal.name}")
        return gguf
    journal.unlink()
    if gguf is not None:
        gguf.with_name(gguf.name + PARTIAL).unlink(missing_ok=True)
    console.note(f"removed the unfinished files an interrupted export left in '{folder}'")
    return None


def _check_arch(src: RunSource) -> None:
    """Refuse an unsupported architecture before loading any weights (the run's or its base's config.json)."""
    from ..training.model import base_config_dict
    from ..training.rope import with_scaling

    conf = base_config_dict(src.weights_source, src.base.revision if src.adapter and src.base else None)
    if conf:
        # An adapter's base loads with the run's RoPE scaling (model.rope_scaling); a full run's config.json has it.
        scaling = src.base.rope_scaling if src.adapter and src.base else None
        gguf_arch.check(with_scaling(conf, scaling))


def _write(gguf: Any, path: Path, m: Any, arch: str, conf: dict, quant: str, name: str) -> list[str]:
    """The whole file: metadata, then tensor infos, then each tensor's data. Returns the f16 fallbacks."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name(general_name(m.tokenizer, name))
    w.add_type(gguf.GGUFType.MODEL)
    license_ = m.run.run_info().get("license")
    if license_:
        w.add_license(str(license_))
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_arch.add_hparams(gguf, w, arch, conf, m.tokenizer)
    add_tokenizer(gguf, w, m.tokenizer, m.template, conf["vocab_size"])
    _add_sampling(w)

    planned, fallbacks = _plan(gguf, m.model, arch, conf, quant)
    for t in planned:
        w.add_tensor_info(t.name, t.shape, _np().float32, _nbytes(gguf, t.shape, t.qtype), raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with console.Progress(f"writing {path.name.removesuffix('.partial')}", len(planned), unit="tensor",
                          label="export") as bar:
        for t in planned:
            w.write_tensor_data(_encode(gguf, t.data(), t.qtype))
            bar.update()
    w.close()
    return fallbacks


def _np() -> Any:
    import numpy

    return numpy


def _nbytes(gguf: Any, shape: tuple[int, ...], qtype: Any) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * type_size


def _encode(gguf: Any, arr: np.ndarray, qtype: Any) -> np.ndarray:
    np = _np()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(arr.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


# ------------------------------------------------------------------ metadata
def _add_sampling(w: Any) -> None:
    """llama.cpp reads `general.sampling.*` as the model's default sampling; they come from the one home of
    sampling defaults, the chat preset (the Modelfile carries the same numbers)."""
    from .params import PRESETS

    p = PRESETS["chat"]
    w.add_sampling_temp(p.temperature)
    w.add_sampling_top_p(p.top_p)
    if p.top_k:
        w.add_sampling_top_k(p.top_k)
    w.add_sampling_penalty_repeat(p.repetition_penalty)


# ------------------------------------------------------------------ tensors
def _plan(gguf: Any, model: Any, arch: str, conf: dict, quant: str) -> tuple[list[Planned], list[str]]:
    T = gguf.GGMLQuantizationType
    want = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[quant]
    planned, fallbacks = [], []
    for name, tensor, layout in gguf_arch.tensors(gguf, model, arch, conf):
        shape = tuple(layout(tensor.to("meta")).shape if layout else tensor.shape)
        # As llama.cpp's converter (prepare_tensors): 1-D tensors (norms, biases, rope factors), the MoE router
        # and the linear-attention convolution stay F32.
        keep = len(shape) == 1 or name.endswith(("ffn_gate_inp.weight", "ssm_conv1d.weight"))
        qtype = T.F32 if keep else want
        if qtype == T.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
            qtype = T.F16
            fallbacks.append(name)
        planned.append(Planned(name, qtype, shape, _as_numpy(tensor, layout)))
    return planned, fallbacks


def _as_numpy(t: torch.Tensor, layout: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[], np.ndarray]:
    """The tensor's float32 data, reordered when it is written (no reordered copy waits in memory)."""
    return lambda: (layout(t) if layout else t).detach().to("cpu").float().contiguous().numpy()
