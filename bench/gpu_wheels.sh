#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that bench/gpu_check.sh installs on a GPU machine without
# internet: the versions of the training stack this checkout's .venv runs (its image may hold older ones),
# pydantic (the config layer), and the optional liger-kernel (domaintune[fast]), bitsandbytes
# (domaintune[qlora]), trl and deepspeed (domaintune[deepspeed]). Target: CPython 3.12 on x86-64 Linux (override with PYVER=3.11 etc.).
#
#   bash bench/gpu_wheels.sh            # then carry .whl (and .bench-data) to the GPU machine
#
# Prints the total size: what travels with the working tree may be limited (64 MiB on some machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
MAX_MIB=${MAX_MIB:-60}
mkdir -p .whl
ver() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
get() {  # NAME==VERSION ...
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plat[@]}" -d .whl "$@"
}
pins=()
for name in transformers huggingface-hub tokenizers safetensors peft accelerate pydantic pydantic-core \
            annotated-types typing-inspection httpx2 httpcore2 truststore click regex hf-xet; do
  pins+=("$name==$(ver "$name")")
done
get "${pins[@]}"
get "liger-kernel>=0.5"
# trl (the preference stages) and deepspeed (train.distributed: deepspeed; a source package: built here into a
# pure-Python wheel, its CUDA ops compile on first use where the GPU machine has nvcc, else ZeRO's Python paths).
get "trl==$(ver trl)"
"$PY" -m pip wheel -q --no-deps -w .whl "deepspeed>=0.16" || echo "deepspeed: no wheel built (the ZeRO steps will say so)"
size() { du -sm .whl | cut -f1; }
# bitsandbytes ships one ~20 MiB library per CUDA version; keep those of CUDA 13 (the GPU image's torch is
# cu130) and the CPU one, so that it travels (KEEP_CUDA=12 etc. for another machine).
KEEP_CUDA=${KEEP_CUDA:-13}
rm -f .whl/bitsandbytes-*.whl
if get "bitsandbytes>=0.43"; then
  "$PY" - "$KEEP_CUDA" .whl/bitsandbytes-*.whl <<'PYEOF'
import re, sys, zipfile
from pathlib import Path
keep, path = sys.argv[1], Path(sys.argv[2])
drop = re.compile(r"libbitsandbytes_(cuda(?!%s)\d+|rocm\d+)\.(so|dll|dylib)$" % keep)
tmp = path.with_suffix(".tmp")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if drop.search(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(line for line in data.decode().splitlines(True)
                           if not drop.search(line.split(",")[0])).encode()
        dst.writestr(info, data)
tmp.replace(path)
print(f"bitsandbytes trimmed to CUDA {keep}.x: {path.stat().st_size / 2**20:.1f} MiB")
PYEOF
else
  echo "bitsandbytes: no wheel for this platform (QLoRA will be skipped)"
fi
if [ "$(size)" -gt "$MAX_MIB" ]; then
  echo "warning: .whl is $(size) MiB > MAX_MIB=$MAX_MIB; it may not travel"
fi
echo "wheels in .whl: $(ls .whl | wc -l), $(size) MiB"
ls -1 .whl
