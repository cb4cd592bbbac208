#!/usr/bin/env bash
# Install the fast Mamba kernels (causal-conv1d, mamba-ssm) on the lent Hopper GPU, which has no
# network: build wheels from the sdists carried in .whl/, or reuse wheels built by an earlier call.
#
# Here, once (the sdists are pure source; skip the CUDA build while downloading):
#   MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
#     pip download --no-deps --no-binary :all: --no-build-isolation -d .whl mamba-ssm causal-conv1d
# On the device (run tool, carry [".whl", ...]):
#   bash benchmarks/gpu_setup.sh            # builds or reuses, installs, checks the imports
# If $OUT is set, wheels under 16 MB (or split in <16 MB parts, mamba-ssm at most 2) are copied to
# $OUT/whl/ so that they can be put into .whl/ and carried next time: then no build (seconds, not minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL_DIR=${WHL_DIR:-.whl}
BUILD_DIR=${BUILD_DIR:-/tmp/gpu_setup}
PY=${PYTHON:-python3}
mkdir -p "$BUILD_DIR/wheels"
t0=$(date +%s)

# Reassemble wheels that came back in parts (file.whl.part00, .part01, ...).
for first in "$WHL_DIR"/*.whl.part00; do
  [ -e "$first" ] || continue
  whl=${first%.part00}
  [ -e "$whl" ] || cat "${whl}".part* > "$BUILD_DIR/wheels/$(basename "$whl")"
done
cp "$WHL_DIR"/*.whl "$BUILD_DIR/wheels/" 2>/dev/null || true

build() {  # $1 = distribution file prefix (causal_conv1d | mamba_ssm)
  local name=$1 sdist src
  if ls "$BUILD_DIR/wheels/${name}"-*.whl >/dev/null 2>&1; then
    echo "[gpu_setup] $name: using prebuilt $(basename "$(ls "$BUILD_DIR/wheels/${name}"-*.whl | head -1)")"
    return 0
  fi
  sdist=$(ls "$WHL_DIR/${name}"-*.tar.gz | head -1)
  src="$BUILD_DIR/src_$name"
  rm -rf "$src" && mkdir -p "$src"
  tar xzf "$sdist" -C "$src" --strip-components=1
  # Hopper only: drop every -gencode pair but sm_90 (a full list multiplies the build time by ~8).
  "$PY" - "$src/setup.py" <<'EOF'
import re, sys
path = sys.argv[1]
lines = open(path).read().split("\n")
out, i = [], 0
while i < len(lines):
    line = lines[i]
    nxt = lines[i + 1] if i + 1 < len(lines) else ""
    m = re.search(r'arch=compute_(\d+a?),code=sm_\d+a?', nxt)
    if line.strip() == 'cc_flag.append("-gencode")' and m and m.group(1) != "90":
        indent = line[: len(line) - len(line.lstrip())]
        out += [indent + "pass", indent + "pass"]  # keep any if-block non-empty
        i += 2
        continue
    out.append(line)
    i += 1
open(path, "w").write("\n".join(out))
left = re.findall(r'arch=compute_\d+a?,code=sm_\d+a?', "\n".join(out))
print(f"[gpu_setup] {path}: gencode kept {left}")
EOF
  echo "[gpu_setup] $name: building wheel from $(basename "$sdist")"
  (cd "$src" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} MAMBA_FORCE_BUILD=TRUE \
     CAUSAL_CONV1D_FORCE_BUILD=TRUE "$PY" -m pip wheel --no-build-isolation --no-deps --no-index \
     -w "$BUILD_DIR/wheels" . > "$BUILD_DIR/build_$name.log" 2>&1) \
    || { tail -40 "$BUILD_DIR/build_$name.log"; return 1; }
  echo "[gpu_setup] $name: built in $(( $(date +%s) - t0 )) s since start"
}

if "$PY" -c "import causal_conv1d_cuda, selective_scan_cuda, mamba_ssm, causal_conv1d" 2>/dev/null; then
  # A warm machine keeps what an earlier call installed.
  echo "[gpu_setup] mamba_ssm and causal_conv1d already installed: no build"
else
  # One after the other: measured 15 s + 173 s on an H200, against 418 s when both built at once
  # (the two nvcc job pools fight over the 16 cores and the memory).
  build causal_conv1d || { echo "[gpu_setup] causal_conv1d build failed"; exit 1; }
  build mamba_ssm || { echo "[gpu_setup] mamba_ssm build failed"; exit 1; }
  "$PY" -m pip install -q --no-deps --no-index --no-build-isolation "$BUILD_DIR"/wheels/causal_conv1d-*.whl \
    "$BUILD_DIR"/wheels/mamba_ssm-*.whl
fi
"$PY" - <<'EOF'
import causal_conv1d, mamba_ssm, selective_scan_cuda, causal_conv1d_cuda  # noqa: F401 (compiled parts load)
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
print(f"[gpu_setup] installed mamba_ssm {mamba_ssm.__version__}, causal_conv1d {causal_conv1d.__version__}")
EOF
ls -la "$BUILD_DIR"/wheels/ || true
echo "[gpu_setup] done in $(( $(date +%s) - t0 )) s"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/whl"
  for whl in "$BUILD_DIR"/wheels/*.whl; do
    [ -e "$whl" ] || continue
    [ -e "$WHL_DIR/$(basename "$whl")" ] && continue   # came in carried: nothing to send back
    size=$(stat -c %s "$whl")
    if [ "$size" -lt 16000000 ]; then
      cp "$whl" "$OUT/whl/"
    elif [ "$size" -lt 30000000 ]; then
      split -b 15000000 -d -a 2 "$whl" "$OUT/whl/$(basename "$whl").part"
    else
      echo "[gpu_setup] $(basename "$whl") is $size bytes: too large to send back"
    fi
  done
  ls -la "$OUT/whl"
fi
