#!/usr/bin/env bash
# Build llama.cpp's programs from the source that ships inside PyPI's llama-cpp-python source
# distribution, into third_party/llama.cpp (ignored by git; nothing from llama.cpp is committed).
#   bash tools/build_llama_cpp.sh            CPU build
#   CUDA=1 bash tools/build_llama_cpp.sh     GPU build (sm_90, for the H100/H200)
#   bash tools/build_llama_cpp.sh --pack     also write .carry/llama.cpp-src.tar.gz (ignored by
#                                            git): the tree without models/docs/tests/examples/
#                                            benches and GPU backends other than CUDA, to carry to a
#                                            host without network (experiments/gpu_campaign.sh
#                                            unpacks it there into third_party/)
#   bash tools/build_llama_cpp.sh --pack-only  the same archive, without building here
#   bash tools/build_llama_cpp.sh --pack-binaries DIR  after building, write the built programs
#                                            and their libraries as DIR/llama-bin-<flavour>-<version>
#                                            .tar.xz.part-aa, -ab, ... (15 MiB each: the GPU host
#                                            returns files of at most 16 MiB; xz: the CUDA build's
#                                            ~42 MiB, where gzip takes 48, fits beside the tree and
#                                            the source in the 64 MiB a call carries). Parts put into
#                                            .carry/ are unpacked instead of building, when they run
#                                            there: a fresh GPU host then skips the ~5-minute build.
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
# what the pack leaves out: what the llama-server/llama-bench build (CPU or CUDA) never reads
# (tests, examples, benchmarks; other GPU backends), so the pack leaves room in the 64 MiB a GPU
# call carries for the prebuilt programs (~42 MiB)
UNUSED=(build tests benches examples pocs tools/ui/tests)
for backend in cann et hexagon metal opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do
  UNUSED+=("ggml/src/ggml-$backend")
done
if [ "${1:-}" = "--pack" ] || [ "${1:-}" = "--pack-only" ]; then
  mkdir -p .carry
  tar -czf .carry/llama.cpp-src.tar.gz -C third_party "${UNUSED[@]/#/--exclude=llama.cpp/}" llama.cpp
  ls -la .carry/llama.cpp-src.tar.gz
  [ "$1" = "--pack-only" ] && exit 0
fi
FLAVOUR=cpu
[ "${CUDA:-0}" = "1" ] && FLAVOUR=cuda
BIN="$DEST/build/bin"
PREBUILT=".carry/llama-bin-$FLAVOUR-$VERSION.tar.xz"
works() { "$BIN/llama-server" --version >/dev/null 2>&1 && "$BIN/llama-bench" --help >/dev/null 2>&1; }
if [ ! -f "$DEST/build/CMakeCache.txt" ] && compgen -G "$PREBUILT.part-*" >/dev/null; then
  mkdir -p "$BIN"
  # parts missing or damaged fail the unpack (xz's check): then build, as when they do not run
  if cat "$PREBUILT".part-* | tar -xJf - -C "$BIN" && works; then
    echo "llama.cpp: prebuilt $FLAVOUR programs from $PREBUILT.part-* (no build)"
    ls -la "$BIN/llama-server" "$BIN/llama-bench"
    exit 0
  fi
  echo "llama.cpp: the prebuilt programs in $PREBUILT.part-* do not unpack or run here; building" >&2
  rm -rf "$DEST/build"
fi
flags=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
if [ "${CUDA:-0}" = "1" ]; then
  flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
fi
cmake -S "$DEST" -B "$DEST/build" "${flags[@]}" >/dev/null
cmake --build "$DEST/build" --target llama-server llama-bench -j"$(nproc)"
ls -la "$DEST/build/bin/llama-server" "$DEST/build/bin/llama-bench"
if [ "${1:-}" = "--pack-binaries" ] && compgen -G "$PREBUILT.part-*" >/dev/null \
  && cat "$PREBUILT".part-* | xz -t 2>/dev/null; then
  # each part takes one of the few files a GPU call returns: none for what .carry/ already holds
  echo "llama.cpp: $PREBUILT.part-* already hold a whole set; not packed again"
elif [ "${1:-}" = "--pack-binaries" ]; then
  out="${2:?--pack-binaries needs a folder}"
  mkdir -p "$out"
  name="$(basename "$PREBUILT")"
  rm -f "$out/$name".part-*
  # the programs and the shared libraries beside them (llama.cpp builds its libraries shared)
  tar -cf - -C "$BIN" . | xz -T0 -6 | split -b 15M - "$out/$name.part-"
  ls -la "$out/$name".part-*
fi
