#!/usr/bin/env bash
# The GPU check of issue 11, in one go (under 8 minutes on one H100/H200-class GPU):
#   1. an environment: the machine's own CUDA torch (system site packages) when it has one,
#      else torch from the package index; freesegdiff and its test runner on top;
#   2. the CUDA-marked tests (pytest -m cuda);
#   3. `freesegdiff bench` on CUDA in float16 at batch sizes 1 and 8 (real-architecture
#      random weights in Hub-layout folders, written once first: true shapes, FLOPs, memory
#      and loading), each writing its JSON figures;
#   4. issue 22's throughput targets: `paper` and `extended` streamed (`bench --stream`, 32
#      images in batches of 8, the CRF pool one process per core but one), printing the
#      steady-state images per second of each (targets: paper >= 12, extended >= 30).
# Everything lands in $OUT (default benchmarks/results/gpu): nvidia-smi.txt, cuda-tests.txt,
# bench-cuda-float16-b{1,8}.json, stream-{paper,extended}.json and their .txt.
# Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
start=$(date +%s)

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || { echo "no nvidia-smi: is this a GPU machine?"; exit 2; }

venv=.venv-gpu
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
py="$venv/bin/python"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  "$py" -m pip install -q "torch>=2.1,<3" || { echo "no CUDA torch here and none installable"; exit 2; }
fi
# Where no package index can be reached, the machine's own packages must do (--no-deps).
"$py" -m pip install -q -e ".[crf-reference]" pytest hypothesis scikit-image \
  || "$py" -m pip install -q --no-deps --no-build-isolation -e .
"$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" \
  | tee -a "$OUT/nvidia-smi.txt"

timeout 180 "$py" -m pytest -q -m cuda tests 2>&1 | tee "$OUT/cuda-tests.txt" || true

# the bench's random-weight models in their Hub layouts, written once (about a minute, 4.8 GB)
timeout 240 "$py" -m freesegdiff.bench.hub_layouts CompVis/stable-diffusion-v1-4 \
  openai/clip-vit-base-patch32 openai/clip-vit-base-patch16 Salesforce/blip-image-captioning-base

for batch in 1 8; do
  timeout 150 "$venv/bin/freesegdiff" bench --device cuda --dtype float16 \
    --batch-size "$batch" --images 16 --json "$OUT/bench-cuda-float16-b$batch.json" \
    2>&1 | tee "$OUT/bench-cuda-float16-b$batch.txt" || true
done

for preset in paper extended; do
  timeout 200 "$venv/bin/freesegdiff" bench --preset "$preset" --device cuda --dtype float16 \
    --batch-size 8 --images 32 --stream --json "$OUT/stream-$preset.json" \
    2>&1 | tee "$OUT/stream-$preset.txt" || true
done
for preset in paper extended; do
  "$py" -c "import json, sys; r = json.load(open(sys.argv[1])); s = r['stream']; print(f'{sys.argv[2]}: streamed {s[\"steady_images_per_second\"]:.1f} images/s (serial {r[\"images_per_second\"]:.1f}); busy {s[\"busy\"]}')" \
    "$OUT/stream-$preset.json" "$preset" 2>/dev/null || echo "$preset: no stream figures"
done
echo "gpu_check: $(( $(date +%s) - start )) s; figures in $OUT"
