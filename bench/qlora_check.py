"""Check: a short QLoRA run works end to end on CUDA: a tiny Qwen2-style model loaded in 4-bit (bitsandbytes
NF4, double quantization), a LoRA adapter trained for two epochs of the sample data with `domaintune train`,
then `domaintune predict` with the adapter on the 4-bit base.

Passes when every logged loss is finite and the last is below the first, the run holds
adapter_model.safetensors (and no pickle), run_info.json says method "qlora", and every test row has a
prediction. `--device cpu` runs the same steps without quantization (to try the script where there is no GPU).

    python bench/qlora_check.py [--device cuda|cpu] [--no-save]

Results are appended to bench/results/qlora-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import load_average, provenance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"
TEST = ROOT / "examples" / "data" / "test.jsonl"


def domaintune(*args: str) -> None:
    cmd = [sys.executable, "-m", "domaintune", *args]
    print("$ domaintune " + " ".join(args), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where to train (default: cuda)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results/")
    ap.add_argument("--init", default="default", choices=["default", "loftq"],
                    help="lora.init: default, or loftq (the adapter fitted to the 4-bit base; CUDA only) "
                         "(default: default)")
    a = ap.parse_args()
    load_start = load_average()
    quant = "4bit" if a.device == "cuda" else "none"
    from domaintune.training.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="dt-qlora-") as tmp:
        model = make_tiny_model(Path(tmp) / "model", "qwen2")
        run = Path(tmp) / "run"
        overrides = [f"model.name_or_path={model}", f"model.quantization={quant}", f"train.output_dir={run}",
                     "train.num_epochs=2", "train.save_steps=1000", "train.eval_steps=1000", f"lora.init={a.init}"]
        if a.device == "cpu":
            overrides.append("model.dtype=fp32")
        domaintune("train", "configs/quickstart.yaml", *overrides)
        domaintune("predict", str(run), "--data", str(TEST), "--max-new-tokens", "16")
        info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
        losses = [e["loss"] for e in map(json.loads, (run / "log.jsonl").read_text(encoding="utf-8").splitlines())
                  if e.get("loss") is not None]
        preds = [line for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines() if line]
        n_test = sum(1 for line in TEST.read_text(encoding="utf-8").splitlines() if line.strip())
        files = sorted(p.name for p in run.iterdir() if p.is_file())
    facts = {"device": a.device, "quantization": quant, "init": a.init, "method": info.get("method"),
             "train_path": info.get("train", {}).get("path"), "first_loss": losses[0], "last_loss": losses[-1],
             "logged_losses": len(losses), "predictions": len(preds), "test_rows": n_test,
             "pickle_files": [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))],
             "adapter": "adapter_model.safetensors" in files}
    ok = (all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] and facts["adapter"]
          and not facts["pickle_files"] and len(preds) == n_test and facts["method"] == ("qlora" if quant != "none"
                                                                                        else "lora"))
    facts["ok"] = ok
    gpu = None
    if a.device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name()
    facts = {**provenance(load_start, gpu=gpu, extra_versions=("peft", "bitsandbytes")), **facts}
    print(json.dumps(facts, ensure_ascii=False, indent=1))
    if not a.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"qlora-{a.device}.json"
        old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
        path.write_text(json.dumps(old + [facts], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("qlora OK" if ok else "qlora FAILED: see the facts above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
