#!/usr/bin/env bash
# Build llama.cpp's programs from the source that ships inside PyPI's llama-cpp-python source
# distribution, into third_party/llama.cpp (ignored by git; nothing from llama.cpp is committed).
#   bash tools/build_llama_cpp.sh            CPU build
#   CUDA=1 bash tools/build_llama_cpp.sh     GPU build (sm_90, for the H100/H200)
#   bash tools/build_llama_cpp.sh --pack     also write .carry/llama.cpp-src.tar.gz (ignored by
#                                            git): the tree without models/docs, to carry to a
#                                            host without network (experiments/gpu_campaign.sh
#                                            unpacks it there into third_party/)
#   bash tools/build_llama_cpp.sh --pack-only  the same archive, without building here
# Targets: llama-server (what baselines/llama_cpp.py runs) and llama-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST=third_party/llama.cpp
PYTHON="${PYTHON:-python3}"
if [ ! -f "$DEST/convert_hf_to_gguf.py" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$work"
  tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
  mkdir -p third_party
  mv "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST"
  rm -rf "$DEST/models" "$DEST/docs" "$DEST/media"
fi
if [ "${1:-}" = "--pack" ] || [ "${1:-}" = "--pack-only" ]; then
  mkdir -p .carry
  tar -czf .carry/llama.cpp-src.tar.gz -C third_party --exclude=llama.cpp/build llama.cpp
  ls -la .carry/llama.cpp-src.tar.gz
  [ "$1" = "--pack-only" ] && exit 0
fi
flags=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
if [ "${CUDA:-0}" = "1" ]; then
  flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
fi
cmake -S "$DEST" -B "$DEST/build" "${flags[@]}" >/dev/null
cmake --build "$DEST/build" --target llama-server llama-bench -j"$(nproc)"
ls -la "$DEST/build/bin/llama-server" "$DEST/build/bin/llama-bench"
