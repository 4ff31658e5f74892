"""The fast training path (training/loss.py, training/speed.py): the chunked loss equals the plain cross-entropy,
gradients included; packed and padded batches give each row the loss it gets alone; a step's loss is the mean over
its target tokens however the rows are split into micro-batches. fp32, CPU, tiny bloom / qwen2 / llama, and the
chunked loss against the model's own on the tiny model of every family whose record says plain_head."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from domaintune import families
from domaintune.config import LoraConfig, ModelConfig, build_config
from domaintune.data.encode import IGNORE_INDEX
from domaintune.data.prepare import build_datasets
from domaintune.data.templates import get_template
from domaintune.rundir import RunDir
from domaintune.training import model as loader
from domaintune.training.loss import LeanLoss, causal_lm_loss_sum, linear_cross_entropy
from domaintune.training.speed import choose_batching, choose_loss, make_collator
from domaintune.training.trainer import run_train

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"
ARCHS = ("bloom", "qwen2", "llama")
# every tiny family whose record says its logits are lm_head(hidden) (families.py: plain_head)
PLAIN_HEAD_ARCHS = tuple(a for a in families.ARCHS if families.family_of(families.TINY[a].family).plain_head)


@pytest.fixture(scope="module")
def samples(tiny_model_dir):
    """Six encoded training rows of clearly different lengths per architecture, and its tokenizer (built on first
    use of an architecture)."""
    class Samples(dict):
        def __missing__(self, arch):
            tok = loader.load_tokenizer(str(tiny_model_dir(arch)))
            cfg = build_config({"data": {"path": str(SAMPLE), "cutoff_len": 96, "val_size": 0}}, "t").data
            rows = build_datasets(cfg, tok, get_template("domain_zh", tok), seed=0).train
            rows = sorted(rows, key=lambda r: len(r["input_ids"]))
            self[arch] = (tok, [rows[i] for i in (0, 5, 20, 40, 60, -1)])
            return self[arch]

    return Samples()


def _lora_model(tiny_model_dir, arch: str, seed: int = 0):
    torch.manual_seed(seed)
    base = loader.load_base_model(ModelConfig(name_or_path=str(tiny_model_dir(arch))), device="cpu")
    model = loader.prepare_for_training(base, LoraConfig(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():  # LoRA B starts at zero: move it, so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_the_plain_one_with_gradients(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 301, bias=bias)
    h = torch.randn(53, 24, requires_grad=True)
    y = torch.randint(0, 301, (53,))
    want = torch.nn.functional.cross_entropy(head(h), y, reduction="sum")
    g_h, g_w = torch.autograd.grad(want, (h, head.weight))
    h2 = h.detach().clone().requires_grad_(True)
    got = linear_cross_entropy(h2, head, y, chunk=8)  # 7 chunks, the last one short
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(h2.grad, g_h, atol=1e-5) and torch.allclose(head.weight.grad, g_w, atol=1e-5)
    with torch.no_grad():  # evaluation: the loss only
        assert linear_cross_entropy(h, head, y, chunk=8).item() == pytest.approx(want.item(), rel=1e-6)


def test_chunk_size_keeps_one_chunks_logits_within_the_budget():
    from domaintune.training.loss import LOGITS_BUDGET, chunk_size

    assert chunk_size(250_880) == 267 and 267 * 250_880 * 4 <= LOGITS_BUDGET < 268 * 250_880 * 4
    assert chunk_size(151_936) == 441
    assert chunk_size(10**9) == 16  # never below 16 positions


def test_linear_cross_entropy_in_bf16_matches_the_plain_one_in_bf16():
    """Half-precision weights take the path without the float32 buffer: the logits are upcast per chunk."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 211, bias=False).to(torch.bfloat16)
    h = torch.randn(40, 32, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 211, (40,))
    want = torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")
    (g_want,) = torch.autograd.grad(want, (h,))
    got = linear_cross_entropy(h, head, y, chunk=16)
    (g_got,) = torch.autograd.grad(got, (h,))
    assert got.item() == pytest.approx(want.item(), rel=1e-3)
    assert g_got.dtype == torch.bfloat16 and torch.allclose(g_got.float(), g_want.float(), atol=2e-2)


def test_a_head_with_an_adapter_is_chunked_with_recomputation():
    torch.manual_seed(0)
    inner = torch.nn.Linear(16, 97)

    class Adapted(torch.nn.Module):  # not a plain nn.Linear: the checkpointed path
        def __init__(self):
            super().__init__()
            self.inner, self.extra = inner, torch.nn.Linear(16, 97, bias=False)

        def forward(self, x):
            return self.inner(x) + self.extra(x)

    head = Adapted()
    h = torch.randn(30, 16, requires_grad=True)
    y = torch.randint(0, 97, (30,))
    want = torch.nn.functional.cross_entropy(head(h), y, reduction="sum")
    g = torch.autograd.grad(want, (h, head.extra.weight))
    got = linear_cross_entropy(h, head, y, chunk=7)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(torch.autograd.grad(got, (h, head.extra.weight)), g,
                                                                strict=True))


@pytest.mark.parametrize("arch", PLAIN_HEAD_ARCHS)
def test_chunked_loss_equals_the_models_loss_with_lora_and_input_gradients(tiny_model_dir, samples, arch):
    tok, rows = samples[arch]
    model = _lora_model(tiny_model_dir, arch)
    batch = make_collator("pad", tok, "cpu")(rows)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]

    want = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    want_grads = torch.autograd.grad(want, [embeds, *lora])
    lean = LeanLoss(model)
    try:
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        assert out.logits.shape[1] == 0  # no logits were computed
        got = lean(out, batch["labels"])
    finally:
        lean.close()
    got_grads = torch.autograd.grad(got, [embeds, *lora])
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert model(input_ids=batch["input_ids"][:, :3]).logits.shape[1] == 3  # the hook is gone


def _per_row_losses(model, tok, rows, batching):
    """Each row's summed next-token loss, from one forward pass over a micro-batch of all rows."""
    batch = make_collator(batching, tok, "cpu")(rows)
    labels = batch.pop("labels")
    with torch.no_grad():  # no KV cache: as in training (with one, transformers does not look for packed rows)
        logits = model(**batch, use_cache=False).logits.float()
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                   ignore_index=IGNORE_INDEX, reduction="none")
    if batching == "pack":  # one sequence; rows restart their position ids at 0
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [labels.shape[1]]
        return [token_loss[0, a:b - 1].sum().item() for a, b in zip(starts, starts[1:], strict=False)]
    return token_loss.sum(dim=1).tolist()


@pytest.mark.parametrize("arch,batching", [("qwen2", "pack"), ("llama", "pack"), ("bloom", "pad"), ("qwen2", "pad")])
def test_packed_or_padded_rows_get_the_loss_they_get_alone(tiny_model_dir, samples, arch, batching):
    """Nothing leaks across rows: no attention between packed rows, and padding changes nothing."""
    tok, rows = samples[arch]
    model = _lora_model(tiny_model_dir, arch)
    together = _per_row_losses(model, tok, rows, batching)
    alone = [_per_row_losses(model, tok, [r], "pad")[0] for r in rows]
    assert together == pytest.approx(alone, rel=1e-5, abs=1e-4)
    assert len(set(round(x, 3) for x in alone)) == len(rows)  # the rows really differ


def test_the_fast_path_is_chosen_where_the_architecture_allows(tiny_model_dir):
    for arch, batching in (("qwen2", "pack"), ("llama", "pack"), ("bloom", "pad")):
        model = loader.load_base_model(ModelConfig(name_or_path=str(tiny_model_dir(arch))), device="cpu")
        assert choose_loss("auto", model, "cpu")[0] == "chunked"
        assert choose_batching("auto", model)[0] == batching
        # a GPU-only path falls back, and says so
        assert choose_loss("liger", model, "cpu") == \
            ("chunked", "loss: train.loss is liger but no CUDA device; using the chunked loss instead")


def test_the_sum_over_a_batch_without_targets_is_zero_and_keeps_the_graph():
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    total, n = causal_lm_loss_sum(hidden, head, torch.full((2, 5), IGNORE_INDEX))
    assert (total.item(), n) == (0.0, 0)
    total.backward()
    assert hidden.grad is not None and not hidden.grad.any()


@pytest.mark.parametrize("arch", ["qwen2", "bloom"])
def test_a_steps_loss_is_the_mean_over_its_target_tokens_however_the_rows_are_split(tiny_model_dir, tmp_path, arch):
    """One optimizer step of 4 rows as 1 x 4, 2 x 2 or 4 x 1 micro-batches: the same logged loss (the mean over
    all target tokens of the 4 rows, not a mean of per-micro-batch means) and the same updated adapter."""
    from safetensors.torch import load_file

    rows = [json.loads(x) for x in SAMPLE.read_text(encoding="utf-8").splitlines()[:4]]
    rows[0]["output"] = rows[0]["output"] * 3  # very different target counts per row
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    results = []
    for per_device in (4, 2, 1):
        out = tmp_path / f"run{per_device}"
        cfg = build_config({
            "model": {"name_or_path": str(tiny_model_dir(arch))},
            "lora": {"dropout": 0.0},
            "data": {"path": str(data), "cutoff_len": 256, "val_size": 0},
            # plain SGD: the update is the gradient itself (Adam's first step is the gradient's sign, which turns
            # rounding noise in near-zero gradients into full-size differences)
            "train": {"output_dir": str(out), "batch_size": 4, "per_device_batch_size": per_device, "max_steps": 1,
                      "learning_rate": 1.0, "optim": "sgd", "warmup_ratio": 0.0, "logging_steps": 1,
                      "save_steps": 100, "max_grad_norm": 0.0},
        }, "t")
        run_train(cfg)
        log = [r for r in RunDir(out).read_log() if "loss" in r]
        results.append((log[0]["loss"], load_file(str(out / "adapter_model.safetensors"))))
    losses = [r[0] for r in results]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)
    for _, weights in results[1:]:
        for k, v in weights.items():
            assert torch.allclose(v, results[0][1][k], atol=1e-6), k
    # and that loss is the token mean, computed independently with the plain model loss over all rows at once
    tok = loader.load_tokenizer(str(tiny_model_dir(arch)))
    data_cfg = build_config({"data": {"path": str(data), "cutoff_len": 256, "val_size": 0}}, "t").data
    encoded = build_datasets(data_cfg, tok, get_template("domain_zh", tok), seed=42).train
    model = loader.prepare_for_training(loader.load_base_model(ModelConfig(name_or_path=str(tiny_model_dir(arch))),
                                                               device="cpu"), LoraConfig(dropout=0.0))
    batch = make_collator("pad", tok, "cpu")(encoded)
    with torch.no_grad():  # an adapter at its initial state (B = 0) computes the base model's loss
        want = model(**batch).loss.item()
    assert losses[0] == pytest.approx(want, rel=1e-4)
