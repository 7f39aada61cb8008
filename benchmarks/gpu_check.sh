#!/usr/bin/env bash
# Issue 8, item 4: `grokctl bench` on a real-width Grok-1 slice (emb 6144, 48 q / 8 kv heads,
# ffn 32768, 8 experts top-2, vocab 131072) on one GPU, int8 and int4, batch 1 and 8, and int8
# at one decode step per call against the default 4, in one device call; the figures go to
# docs/PERFORMANCE.md ("GPU").
#
# The device image has JAX with CUDA but not dm-haiku (nor its dependency jmp): carry them as
# wheels (.library/device/README.md). Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl dm-haiku==0.0.17 jmp==0.0.4
# then with the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"],
# timeout_s=560). On a CPU it runs too (a smoke test of this script):
#   PRESET=grok-tiny CASES="-p 16 -n 4 -b 1 -r 1" bash benchmarks/gpu_check.sh
#
# Environment: PRESET (grok-1), LAYERS (2), CASES (bench flags), OUT (results; the device
# tool's $OUT comes back), WORK (scratch, /tmp/gpu-check-work).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/gpu-check-work}
PRESET=${PRESET:-grok-1}
LAYERS=${LAYERS:-2}
CASES=${CASES:--p 512 -n 64 -b 1,8 -r 3}
mkdir -p "$OUT" "$WORK"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
g() { "$PY" -m grokctl "$@"; }
step() { echo "== $* ($SECONDS s)"; }

(nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true) | tee "$OUT/device.txt"
"$PY" -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"

step "random checkpoint: $PRESET, $LAYERS layers"
g random-checkpoint "$WORK/$PRESET-int8" --preset "$PRESET" --layers "$LAYERS" --force --json > "$OUT/random.json"
step "quantize to int4"
g quantize "$WORK/$PRESET-int8" "$WORK/$PRESET-int4" --bits 4 --no-eval --force --json > "$OUT/quantize-int4.json"
for precision in int8 int4; do
  step "bench $precision: $CASES"
  # shellcheck disable=SC2086  # CASES is a list of flags
  g bench "$WORK/$PRESET-$precision" $CASES --save "$OUT/bench-$precision.json" | tee "$OUT/bench-$precision.md"
done
step "bench int8 at one decode step per call (the default runs 4: --decode-steps)"
g bench "$WORK/$PRESET-int8" -p 0 -n 64 -b 1 -r 3 --decode-steps 1 --save "$OUT/bench-int8-k1.json" | tee "$OUT/bench-int8-k1.md"
step "done"
