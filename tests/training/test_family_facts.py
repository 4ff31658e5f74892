"""The training facts of each family record (families.py) hold for the tiny model of every family (fp32, CPU):

- `packable`: a packed micro-batch (training/speed.py's collator: one sequence, position_ids restarting per row)
  gives every row the logits it gets alone; where it does not (BLOOM's ALiBi, Qwen3.5's linear-attention
  recurrence and convolution, which run across the row boundaries), the flag is off and `train.batching: pack`
  is a UserError. Gemma 3's sliding-window layers pack correctly: transformers' masks combine the window with
  the packed rows (the rows here are longer than the tiny model's window of 8, and the window changes them).
- `plain_head`: the chunked loss (training/loss.py) equals the model's own loss, gradients included: for every
  plain-head family in tests/training/test_loss.py; here, why Gemma 3 keeps its own loss (soft-capped logits).
- `moe`: with `output_router_logits`, the loss the Trainer optimises includes the router's auxiliary loss, as the
  model's own loss does, in value and gradient; without it nothing changes.
- Every family trains (2 LoRA steps, ChatML), choosing the loss and batching its record says, and its first two
  losses are pinned at the fixed seed (1e-4 relative) to catch silent drift.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from domaintune.config import ModelConfig
from domaintune.errors import UserError
from domaintune.families import ARCHS, TINY, family_named, family_of
from domaintune.rundir import RunDir
from domaintune.training import model as loader
from domaintune.training.loss import LeanLoss
from domaintune.training.speed import choose_batching, choose_loss, make_collator
from domaintune.training.trainer import run_train

# What was proven here, per tiny family: (packable, plain_head, moe). The README's supported-models table and
# families.py must agree with it.
PROVEN = {
    "qwen2": (True, True, False), "llama": (True, True, False), "bloom": (False, True, False),
    "qwen3": (True, True, False), "qwen3_moe": (True, True, True), "qwen3_5": (False, True, False),
    "llama3": (True, True, False), "gemma3": (True, True, False), "mistral": (True, True, False),
    "phi3": (True, True, False), "glm4": (True, True, False),
}
# The first two logged losses of a 2-step LoRA run per family (tiny_train_config, data.template=chatml, seed 42).
# None: the family's tiny tokenizer is not yet the same from one process to the next (training/tiny.py's
# SentencePiece-like tokenizers: BpeTrainer's limit_alphabet breaks frequency ties in hash order), so neither are
# its losses; those runs are checked for a loss near ln(vocab) (a random model) until the tokenizer is reproducible.
PINNED = {
    "qwen2": (7.637415, 7.607025), "llama": (7.634922, 7.601078), "bloom": (7.627306, 7.626126),
    "qwen3": (7.654511, 7.665856), "qwen3_moe": (7.653562, 7.637099), "qwen3_5": (7.628193, 7.642457),
    "llama3": (7.631978, 7.638798), "gemma3": (7.631611, 7.625007),
    "mistral": (7.630600, 7.610092), "phi3": (7.647678, 7.616393), "glm4": (7.620883, 7.597470),
}
LENGTHS = (5, 13, 29, 40)  # longer than the tiny Gemma 3's sliding window (8)


def _model_type(path) -> str:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))["model_type"]


def _random_model(path, **config):
    """The tiny model with re-drawn weights (a fresh one mostly echoes its input: leaks would hide)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _rows(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * 2 + ids[2:]})
    return out


def _collate(model, rows: list[dict], batching: str = "pad") -> dict:
    """The training collator's micro-batch of `rows` (speed.make_collator)."""
    return make_collator(batching, loader.load_tokenizer(model.name_or_path), "cpu")(rows)


def _row_logits(model, rows, batching: str) -> list[torch.Tensor]:
    """Each row's logits from one forward pass over the micro-batch the training collator makes of `rows`."""
    batch = _collate(model, rows, batching)
    batch.pop("labels")
    with torch.no_grad():  # no KV cache, as in training
        logits = model(**batch, use_cache=False).logits
    if batching == "pack":
        starts = [0, *torch.tensor([len(r["input_ids"]) for r in rows]).cumsum(0).tolist()]
        return [logits[0, a:b] for a, b in zip(starts, starts[1:], strict=False)]
    return [logits[i, :len(r["input_ids"])] for i, r in enumerate(rows)]


def test_the_family_records_say_what_was_proven():
    assert set(PROVEN) == set(ARCHS) == set(PINNED)
    for arch, (packable, plain_head, moe) in PROVEN.items():
        fam = family_named(TINY[arch].family)
        assert fam.name == TINY[arch].family
        assert (fam.packable, fam.plain_head, fam.moe) == (packable, plain_head, moe), arch


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_get_the_logits_they_get_alone_exactly_where_the_family_packs(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    model = _random_model(path)
    rows = _rows(min(model.config.vocab_size, 1000))
    alone = [_row_logits(model, [r], "pad")[0] for r in rows]
    packed = _row_logits(model, rows, "pack")
    worst = max(float((a - b).abs().max()) for a, b in zip(packed, alone, strict=True))
    fam = family_of(_model_type(path))
    if fam.packable:
        assert worst < 1e-4, worst
        assert choose_batching("auto", model)[0] == "pack"
    else:  # rows would see each other: the flag must stay off, and asking for packing is refused
        assert worst > 1e-2, worst
        assert choose_batching("auto", model) == ("pad", f"batches: padded, length-grouped ({_model_type(path)} "
                                                          "cannot pack rows)")
        with pytest.raises(UserError, match=rf"train.batching: pack needs an architecture .*; {_model_type(path)} "
                                            r"is not one of them. Set train.batching: auto"):
            choose_batching("pack", model)
    assert choose_batching("pad", model)[0] == "pad"


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_packing_keeps_a_sliding_window(tiny_model_dir, arch):
    """The windows really act on these rows (a window of 8 and one of 4096 give different logits), and packed
    rows equal their solo logits under either: transformers masks the window within each packed row."""
    path = tiny_model_dir(arch)
    got = {}
    for window in (8, 4096):
        model = _random_model(path, sliding_window=window)
        rows = _rows(1000)
        alone = [_row_logits(model, [r], "pad")[0] for r in rows]
        packed = _row_logits(model, rows, "pack")
        assert max(float((a - b).abs().max()) for a, b in zip(packed, alone, strict=True)) < 1e-4
        got[window] = alone
    assert float((got[8][-1] - got[4096][-1]).abs().max()) > 1e-2  # the 40-token row crossed the window


def _lean_and_own(model, batch: dict, params: list, **kw) -> tuple[tuple, tuple]:
    """((loss, grads) of the model's own loss, (loss, grads) of LeanLoss) on `batch`."""
    want = model(**batch, **kw).loss
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    labels = {k: v for k, v in batch.items() if k != "labels"}
    lean = LeanLoss(model)
    try:
        got = lean(model(**labels), batch["labels"], kw.get("num_items_in_batch"))
    finally:
        lean.close()
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    return (want, want_grads), (got, got_grads)


def test_a_gemma3_that_soft_caps_its_logits_keeps_its_own_loss(tiny_model_dir):
    """Gemma 3 without a soft-cap (its released configs) takes the chunked loss (test_loss.py proves it equal to
    the model's own); a config with final_logit_softcapping keeps the model's loss, which the chunked one is not."""
    path = tiny_model_dir("gemma3")
    model = loader.load_base_model(ModelConfig(name_or_path=str(path)), device="cpu")
    assert model.config.final_logit_softcapping is None
    assert choose_loss("auto", model, "cpu")[0] == "chunked"
    capped = _random_model(path, final_logit_softcapping=5.0)
    assert choose_loss("auto", capped, "cpu")[0] == "model"
    with pytest.raises(UserError, match="train.loss: chunked supports models whose logits are lm_head"):
        choose_loss("chunked", capped, "cpu")
    batch = _collate(capped, _rows(1000))
    params = [capped.get_output_embeddings().weight]
    (want, _), (got, _) = _lean_and_own(capped, batch, params)
    assert abs(want.item() - got.item()) > 0.1  # lm_head(hidden) is not what this model is trained on


def _moe(tiny_model_dir, **config):
    return _random_model(tiny_model_dir("qwen3_moe"), **config)


@pytest.mark.parametrize("tokens", [None, 97])  # the Trainer passes num_items_in_batch (tokens of the whole step)
def test_the_moe_router_loss_joins_the_chunked_loss_as_it_joins_the_models_own(tiny_model_dir, tokens):
    model = _moe(tiny_model_dir, output_router_logits=True, router_aux_loss_coef=0.5)
    batch = _collate(model, _rows(1000))
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {} if tokens is None else {"num_items_in_batch": torch.tensor(tokens)}
    (want, want_grads), (got, got_grads) = _lean_and_own(model, batch, params, **kw)
    aux = model(**{k: v for k, v in batch.items() if k != "labels"}).aux_loss
    assert aux is not None and 0.5 * aux.item() > 0.1  # the term is large enough to matter
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    router = [i for i, (n, _) in enumerate(model.named_parameters()) if n.endswith("mlp.gate.weight")]
    assert router and all(want_grads[i] is not None and want_grads[i].abs().max() > 0 for i in router)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_without_router_logits_the_moe_loss_is_the_cross_entropy_alone(tiny_model_dir):
    model = _moe(tiny_model_dir, router_aux_loss_coef=0.5)
    assert model.config.output_router_logits is False
    batch = _collate(model, _rows(1000))
    params = [p for p in model.parameters() if p.requires_grad]
    (want, want_grads), (got, got_grads) = _lean_and_own(model, batch, params)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and got.item() == pytest.approx(ce.item(), rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got_grads, want_grads, strict=True)
               if a is not None)


def test_a_moe_run_asking_for_the_router_loss_trains_the_same_with_the_chunked_and_the_models_loss(tiny_model_dir,
                                                                                                  tiny_train_config,
                                                                                                  tmp_path):
    """End to end through the Trainer: one step with the chunked loss and one with the model's own give the same
    logged loss (router term included) and the same adapter."""
    from safetensors.torch import load_file

    src = tiny_model_dir("qwen3_moe")
    base = shutil.copytree(src, tmp_path / "moe")
    cfg = json.loads((base / "config.json").read_text(encoding="utf-8"))
    cfg.update(output_router_logits=True, router_aux_loss_coef=0.5)
    (base / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    out = {}
    for loss in ("chunked", "model"):
        run = tmp_path / loss
        run_train(tiny_train_config(run, "qwen3_moe", f"model.name_or_path={base}", "data.template=chatml",
                                    "train.max_steps=1", f"train.loss={loss}", "train.optim=sgd",
                                    "train.batching=pad"))
        log = [r for r in RunDir(run).read_log() if "loss" in r]
        out[loss] = (log[0]["loss"], load_file(str(run / "adapter_model.safetensors")))
    plain = tmp_path / "plain"  # the same run without the router loss logs a different (lower) loss
    run_train(tiny_train_config(plain, "qwen3_moe", "data.template=chatml", "train.max_steps=1", "train.optim=sgd",
                                "train.batching=pad"))
    without = [r for r in RunDir(plain).read_log() if "loss" in r][0]["loss"]
    assert out["chunked"][0] == pytest.approx(out["model"][0], rel=1e-5)
    assert out["chunked"][0] > without + 0.1
    for k, v in out["model"][1].items():
        assert torch.allclose(out["chunked"][1][k], v, atol=1e-6), k


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_trains_two_lora_steps_with_the_path_its_record_names(tiny_train_config, tmp_path, arch,
                                                                           capsys):
    run = tmp_path / "run"
    run_train(tiny_train_config(run, arch, "data.template=chatml", "train.max_steps=2"))
    err = capsys.readouterr().err
    packable, plain_head, _ = PROVEN[arch]
    assert ("loss: chunked" if plain_head else "loss: the model's own") in err
    assert ("batches: packed" if packable else "batches: padded") in err
    losses = [r["loss"] for r in RunDir(run).read_log() if "loss" in r][:2]
    assert losses == pytest.approx(PINNED[arch], rel=1e-4)
    assert (run / "adapter_model.safetensors").is_file()

