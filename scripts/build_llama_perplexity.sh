#!/bin/sh
# Build llama.cpp's own `llama-perplexity` from the llama.cpp vendored in the llama-cpp-python sdist of the
# installed version (the same llama.cpp the llama.cpp adapter runs), for tests/test_corpus_llamacpp.py.
#
#   scripts/build_llama_perplexity.sh            # prints the binary's path; builds once, then cached
#
# Cache: $GEMMA2_REF_LLAMA_PERPLEXITY_DIR, default ${XDG_CACHE_HOME:-~/.cache}/gemma2-ref/llama-perplexity-VERSION.
# The sdist: $LLAMA_CPP_SDIST (a downloaded llama_cpp_python-VERSION.tar.gz) or `pip download`.
# Only the llama-perplexity tool: against the wheel's own libllama-common / libllama / libggml when it ships them
# (the same llama.cpp, built by pip), else the llama-perplexity target with cmake (-DGGML_NATIVE=OFF); niced.
set -eu
PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_VERSION:-$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}
CACHE=${GEMMA2_REF_LLAMA_PERPLEXITY_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma2-ref/llama-perplexity-$VERSION}
BIN=$CACHE/bin/llama-perplexity
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE"
WORK=$CACHE/build  # kept until the binary is in place: an interrupted build resumes where it stopped
mkdir -p "$WORK"
SRC=$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null || true)
if [ -z "$SRC" ]; then
  SDIST=${LLAMA_CPP_SDIST:-}
  if [ -z "$SDIST" ]; then
    "$PY" -m pip download --no-deps --no-binary :all: -q -d "$WORK" "llama-cpp-python==$VERSION" >&2
    SDIST=$(ls "$WORK"/llama_cpp_python-*.tar.gz)
  fi
  tar xzf "$SDIST" -C "$WORK"
  SRC=$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp)
fi
start=$(date +%s)
mkdir -p "$CACHE/bin"
# Fast path: llama-cpp-python's wheel ships libllama-common, libllama and libggml of this very llama.cpp (built by
# pip from the same sources): compile only the tool's two files against them (2 units instead of ~130).
LIB=$("$PY" -c 'import llama_cpp, pathlib; p = pathlib.Path(llama_cpp.__file__).parent.parent / "lib"; print(p)' \
      2>/dev/null || true)
if [ -n "$LIB" ] && [ -e "$LIB/libllama-common.so" ] && [ -z "${GEMMA2_REF_LLAMA_PERPLEXITY_CMAKE:-}" ]; then
  # main.cpp plus the one line it lacks: common_log_main() is leaked on purpose (common/log.cpp:452-457, llama.cpp
  # #22142), so without a flush the last lines (the final statistics) are lost when the process exits.
  printf '%s\n' '#include "log.h"' 'int llama_perplexity(int argc, char ** argv);' \
    'int main(int argc, char ** argv) { int r = llama_perplexity(argc, argv); common_log_flush(common_log_main()); return r; }' \
    > "$WORK/main.cpp"
  nice -n 10 ${CXX:-g++} -std=c++17 -O2 -I"$SRC/common" -I"$SRC/include" -I"$SRC/ggml/include" -I"$SRC/vendor" \
    "$SRC/tools/perplexity/perplexity.cpp" "$WORK/main.cpp" -L"$LIB" -lllama-common -lllama \
    -lggml -lggml-base -lpthread -Wl,--disable-new-dtags,-rpath,"$LIB" -o "$BIN.partial"
  mv "$BIN.partial" "$BIN"
  rm -rf "$WORK"
  echo "built in $(( $(date +%s) - start )) s (against $LIB)" >&2
  echo "$BIN"
  exit 0
fi
nice -n 10 cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DBUILD_SHARED_LIBS=OFF >&2
nice -n 10 cmake --build "$WORK/build" --target llama-perplexity -j "${JOBS:-2}" >&2
mkdir -p "$CACHE/bin"
cp "$WORK/build/bin/llama-perplexity" "$BIN.partial" && mv "$BIN.partial" "$BIN"
rm -rf "$WORK"
echo "built in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
