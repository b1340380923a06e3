"""Adapters: run another Gemma 2 implementation and write its activations as a golden case under the
canonical tap names (README.md's tap table), so `gemma2-ref compare` can check it against ours.

Every adapter module declares the protocol in base.py: `CAPABILITIES` (padded batches, a KV-cache decode),
`reachable_taps(cfg)`, `backend_options(checkpoint, args)` and `write_golden(checkpoint, ids, out_dir, *, dtype,
taps, text, description, positions, **backend_options)`; `base.write_candidate` writes what it captured.

Each imports its framework lazily: importing gemma2_ref never imports torch, JAX or MLX.
For a backend without an adapter, write the case yourself with `gemma2_ref.golden.write_case` (NumPy only).
"""

from __future__ import annotations

import importlib

from .base import check_protocol

# backend name (as `gemma2-ref golden --backend` takes it) -> the adapter module
BACKENDS = {
    "transformers": "gemma2_ref.adapters.transformers",  # Hugging Face transformers, forward hooks
    "mlx": "gemma2_ref.adapters.mlx",  # mlx-lm's Gemma 2 on MLX (CPU), submodules wrapped by recorders
    "jax-gemma": "gemma2_ref.adapters.jax_gemma",  # DeepMind's gemma (JAX/Flax), HF params converted, sown
    "llama.cpp": "gemma2_ref.adapters.llamacpp",  # llama-cpp-python on a GGUF, ggml's eval callback
    "vllm": "gemma2_ref.adapters.vllm",  # vLLM's CPU engine in-process, torch forward hooks, fusions undone
    "keras-hub": "gemma2_ref.adapters.keras_hub",  # KerasHub's GemmaBackbone (Keras 3, JAX), layer calls recorded
    "onnxruntime-genai": "gemma2_ref.adapters.ort_genai",  # its model builder's ONNX graph, outputs added
    "executorch": "gemma2_ref.adapters.executorch",  # optimum-executorch's .pte, token by token, in its own venv
}

# engines checked without an adapter -> (their page in docs/backends/, why `golden --backend` cannot run them)
WITHOUT_ADAPTER = {
    "mistral.rs": (
        "mistralrs.md",
        "its Python API takes text, not token ids, and returns log-probabilities of the tokens it generates, "
        "no logits: checked by tests/test_adapter_mistralrs.py instead",
    ),
}


# backend name -> the frameworks its adapter imports, the one whose install brings the others last
# (verify/optional.py says which pip install brings each)
NEEDS = {
    "transformers": ("torch", "transformers"),
    "mlx": ("mlx", "mlx_lm"),
    "jax-gemma": ("jax", "gemma"),
    "llama.cpp": ("gguf", "llama_cpp"),
    "vllm": ("torch", "vllm"),
    "keras-hub": ("keras", "keras_hub"),
}


def load_adapter(backend: str):
    """The adapter module for a backend name in BACKENDS, once its frameworks are known to import (a missing
    one: MissingDependency, one line with the pip install that brings it)."""
    from ..verify.optional import check_installed

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; adapters exist for: {', '.join(BACKENDS)}")
    check_installed(NEEDS.get(backend, ()), f"--backend {backend}")
    module = importlib.import_module(BACKENDS[backend])
    check_protocol(module)
    return module
