"""Check: the three training losses agree on the device they run on: the model's own cross-entropy ("plain"),
domaintune's chunked loss (training/loss.py) and, on CUDA with liger-kernel installed, liger's fused linear
cross-entropy, for the loss and for the gradients of the LoRA weights and of the input embeddings.

fp32 weights, tiny bloom / qwen2 / llama models built offline, one padded batch of six sample rows of different
lengths, LoRA on every linear layer with B moved off zero. liger-kernel does not support BLOOM, so BLOOM compares
plain and chunked only. TF32 matrix products are switched off, so the figures compare the algorithms, not the
precision. Exits 1 when a difference exceeds the tolerance (loss: relative 1e-5; gradients: max |a - b| at most
1e-4 x max |b|).

    .venv/bin/python bench/loss_equality.py [--device cpu|cuda] [--no-save]

Results are appended to bench/results/loss_equality-<device>.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

from provenance import load_average, provenance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"
SAMPLE = ROOT / "examples" / "data" / "train.jsonl"
ARCHS = ("bloom", "qwen2", "llama")
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def lora_model(model_dir: Path, device: str):
    import torch

    from domaintune.config import LoraConfig, ModelConfig
    from domaintune.training import model as loader

    torch.manual_seed(0)
    base = loader.load_base_model(ModelConfig(name_or_path=str(model_dir), dtype="fp32"), device=device)
    model = loader.prepare_for_training(base, LoraConfig(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(p.device).manual_seed(1))
    return model


def loss_and_grads(model, batch: dict, kind: str) -> tuple[float, list]:
    """The mean next-token loss over the batch's target tokens and its gradients (input embeddings, LoRA)."""
    import torch

    from domaintune.training.loss import LeanLoss

    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    if kind == "chunked":
        lean = LeanLoss(model)
        try:
            out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False)
            loss = lean(out, batch["labels"])
        finally:
            lean.close()
    else:  # plain, or liger once it has patched the model's forward
        loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                     use_cache=False).loss
    grads = torch.autograd.grad(loss, [embeds, *lora])
    return loss.item(), [g.detach().float() for g in grads]


def compare(want: tuple[float, list], got: tuple[float, list]) -> dict:
    loss_rel = abs(got[0] - want[0]) / max(abs(want[0]), 1e-12)
    grad_rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                   for a, b in zip(got[1], want[1], strict=True))
    return {"loss": got[0], "loss_rel_diff": loss_rel, "grad_max_rel_diff": grad_rel,
            "ok": loss_rel <= LOSS_RTOL and grad_rel <= GRAD_RTOL}


def check_arch(arch: str, device: str, work: Path) -> dict:
    from domaintune.config import build_config
    from domaintune.data.prepare import build_datasets
    from domaintune.data.templates import get_template
    from domaintune.training import model as loader
    from domaintune.training.speed import LIGER_MODELS, make_collator
    from domaintune.training.tiny import make_tiny_model

    model_dir = make_tiny_model(work / arch, arch)
    tok = loader.load_tokenizer(str(model_dir))
    cfg = build_config({"data": {"path": str(SAMPLE), "cutoff_len": 96, "val_size": 0}}, "loss_equality").data
    rows = sorted(build_datasets(cfg, tok, get_template("domain_zh", tok), seed=0).train,
                  key=lambda r: len(r["input_ids"]))
    batch = make_collator("pad", tok, device)([rows[i] for i in (0, 5, 20, 40, 60, -1)])
    batch = {k: v.to(device) for k, v in batch.items()}
    plain = loss_and_grads(lora_model(model_dir, device), batch, "plain")
    out = {"plain_loss": plain[0], "target_tokens": int((batch["labels"][:, 1:] != -100).sum()),
           "chunked": compare(plain, loss_and_grads(lora_model(model_dir, device), batch, "chunked"))}
    if device != "cuda":
        out["liger"] = "skipped: liger-kernel runs on CUDA only"
    elif importlib.util.find_spec("liger_kernel") is None:
        out["liger"] = "skipped: liger-kernel is not installed (pip install 'domaintune[fast]')"
    elif arch not in LIGER_MODELS:
        out["liger"] = f"skipped: liger-kernel does not support {arch}"
    else:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        model = lora_model(model_dir, device)
        _apply_liger_kernel_to_instance(model=model.get_base_model())
        out["liger"] = compare(plain, loss_and_grads(model, batch, "liger"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to compute (default: cpu)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results/")
    args = ap.parse_args()
    load_start = load_average()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory(prefix="dt-loss-eq-") as tmp:
        results = {arch: check_arch(arch, args.device, Path(tmp)) for arch in ARCHS}
    ok = True
    for arch, r in results.items():
        print(f"{arch}: plain loss {r['plain_loss']:.6f} over {r['target_tokens']} target tokens")
        for kind in ("chunked", "liger"):
            v = r[kind]
            if isinstance(v, str):
                print(f"  {kind}: {v}")
                continue
            ok &= v["ok"]
            print(f"  {kind}: loss {v['loss']:.6f} (relative difference {v['loss_rel_diff']:.2e}), gradients' max "
                  f"relative difference {v['grad_max_rel_diff']:.2e}: {'OK' if v['ok'] else 'DIFFERENT'}")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    record = {**provenance(load_start, gpu=gpu, extra_versions=("peft", "liger-kernel")), "device": args.device,
              "command": f"python bench/loss_equality.py --device {args.device}", "results": results, "ok": ok}
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"loss_equality-{args.device}.json"
        old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
        path.write_text(json.dumps(old + [record], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"appended to {path.relative_to(ROOT)}")
    print("all losses agree" if ok else "LOSSES DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
