"""llama.cpp (through llama-cpp-python) running a GGUF -> a golden case under the canonical tap names.

The model runs unmodified: one `llama_decode` of the whole sequence, every position's logits requested, and
llama.cpp's own eval callback (`cb_eval`, ggml's `ggml_backend_sched_eval_callback`) copies each tensor the
moment it is computed. Tensors are read through a ctypes mirror of `struct ggml_tensor` (ggml/include/ggml.h).

Where each canonical tap comes from in llama.cpp's Gemma 2 graph (src/models/gemma2.cpp, the helpers in
src/llama-graph.cpp); ggml shapes are innermost-first, so ne (D, S) is NumPy (S, D):

    embed, layers.0.input     inp_scaled            embedding rows x sqrt(D)
    layers.{i}.input          l_out-{i-1}           (i > 0)
    layers.{i}.pre_attn_norm  attn_norm-{i}
    attn.q_proj / k_proj / v_proj  Qcur-{i} / Kcur-{i} / Vcur-{i}, FIRST of their 3 occurrences (the matmul;
                              the second is its 3-D reshape, the third RoPE's output)
    attn.q_rope / k_rope      Qcur-{i} / Kcur-{i}, LAST occurrence (after ggml_rope_ext)
    attn.scores               kq_scaled_2-{i}       ne (n_kv, S, H): after the soft-cap, before the mask;
                                                    one column per KV-cache cell, padded past S: sliced
    attn.probs                kq_soft_max-{i}       same layout, after mask and softmax
    attn.context              kqv_out-{i}           ne (H*Dh, S)
    attn.out                  (unnamed)             the matmul of blk.{i}.attn_output.weight with kqv_out-{i}
    layers.{i}.post_attn_norm attn_post_norm-{i}
    layers.{i}.resid_mid      sa_out-{i}
    layers.{i}.pre_ffw_norm   ffn_norm-{i}
    mlp.gate / mlp.up         ffn_gate-{i} / ffn_up-{i}
    mlp.hidden                ffn_geglu-{i}         gelu(gate) * up, one fused op
    mlp.out                   ffn_out-{i}
    layers.{i}.post_ffw_norm  ffn_post_norm         tagged layer -1 by gemma2.cpp: the i-th occurrence
    layers.{i}.output         l_out-{i}
    final_norm                result_norm
    logits_raw                (unnamed)             the matmul of token_embd.weight (tied head) with result_norm
    logits                    llama_get_logits      every position, after the final soft-cap

So llama.cpp exposes every canonical tap; `unreachable_taps(cfg)` is empty. Two it computes with no name of
its own (attn.out, logits_raw) are recognised by their operands.

What llama.cpp does differently from the reference, verified in its source (vendor/llama.cpp in the
llama-cpp-python 0.3.36 sdist), and what `compare` then shows:

  * query scale: src/models/gemma2.cpp:25-27 sets `f_attention_scale` to 1/sqrt(n_embd / n_head) when the
    model has 46 layers (27B) and to 1/sqrt(head_dim) otherwise; the GGUF has no key for
    `query_pre_attn_scalar`. A model whose scalar differs from head_dim diverges at `attn.scores`.
  * GELU: ggml's CPU GEGLU looks gelu up in a float16 table (ggml/src/ggml-cpu/vec.h:46 defines
    GGML_GELU_FP16; vec.h:1447-1460), so `mlp.hidden` carries float16-sized rounding even in an f32 GGUF.
  * the KV cache is float16 unless asked otherwise (`kv_cache_type`); this adapter asks for f32 with an
    f32 GGUF, so that the comparison sees llama.cpp's arithmetic rather than its cache.

Converting: without `gguf=`, the checkpoint directory goes through llama.cpp's own `convert_hf_to_gguf.py`
(from the sdist of the installed llama-cpp-python version, see `find_converter`), cached per checkpoint
content and outtype under the temp directory. llama_cpp is imported here only, when a function is called.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from ..model.config import load_config
from ..model.taps import tap_names, taps_of_kinds
from ..verify.golden import model_info_from_files, sha256_file
from .base import Capabilities, wanted_taps, write_candidate

# GGUF outtype (convert_hf_to_gguf.py --outtype) -> the compute dtype the manifest records. llama.cpp's CPU
# matmuls convert activations to the weights' "vec_dot_type" (bf16, f16, q8_0), so that is what they compute in.
OUTTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "q8_0": "q8_0"}
ALIASES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "q8": "q8_0"}
# a GGUF's general.file_type -> outtype
FILE_TYPES = {"ALL_F32": "f32", "MOSTLY_BF16": "bf16", "MOSTLY_F16": "f16", "MOSTLY_Q8_0": "q8_0"}

# ggml/include/ggml.h (GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME) and enum ggml_type
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16 = 0, 1, 30
KV_CACHE_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16}


class LlamaCppError(RuntimeError):
    """llama.cpp could not run or be captured; the message says which file or tensor, and what to do."""


class GGMLTensor(ctypes.Structure):
    """A mirror of `struct ggml_tensor` (ggml/include/ggml.h, llama.cpp as vendored by llama-cpp-python 0.3.36).
    Only read, never written. 336 bytes on a 64-bit platform, as ggml's GGML_TENSOR_SIZE."""


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),  # elements per dimension, innermost first
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),  # strides in bytes
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]
GGML_TENSOR_SIZE = 336  # sizeof(struct ggml_tensor) on 64-bit platforms for the layout above


# -- which llama.cpp tensor is which canonical tap ----------------------------------------------------------

# per-layer tensors named "{name}-{layer}" by llama.cpp's graph callback (src/llama-context.cpp graph_get_cb)
LAYER_NAMES = {
    "attn_norm": "pre_attn_norm",
    "kq_scaled_2": "attn.scores",  # cap * tanh(kq / cap): the soft-capped scores (llama-graph.cpp build_attn_mha)
    "kq_soft_max": "attn.probs",
    "kqv_out": "attn.context",
    "attn_post_norm": "post_attn_norm",
    "sa_out": "resid_mid",
    "ffn_norm": "pre_ffw_norm",
    "ffn_gate": "mlp.gate",
    "ffn_up": "mlp.up",
    "ffn_geglu": "mlp.hidden",
    "ffn_out": "mlp.out",
    "l_out": "output",
}
# named three times per layer (matmul, its 3-D reshape, RoPE's output for Q and K): first and last occurrence
REPEATED = {
    "Qcur": ("attn.q_proj", "attn.q_rope"),
    "Kcur": ("attn.k_proj", "attn.k_rope"),
    "Vcur": ("attn.v_proj", None),
}
GLOBAL_NAMES = {"inp_scaled": "embed", "result_norm": "final_norm"}
POST_FFW_NORM = "ffn_post_norm"  # tagged layer -1 (src/models/gemma2.cpp): the i-th one is layer i's
ALL_LAYER_TAPS = (
    "input",
    "pre_attn_norm",
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.q_rope",
    "attn.k_rope",
    "attn.scores",
    "attn.probs",
    "attn.context",
    "attn.out",
    "post_attn_norm",
    "resid_mid",
    "pre_ffw_norm",
    "mlp.gate",
    "mlp.up",
    "mlp.hidden",
    "mlp.out",
    "post_ffw_norm",
    "output",
)
LAYER_NAME_RE = re.compile(r"(.+)-(\d+)")


CAPABILITIES = Capabilities()  # one sequence per llama_decode; no padded batch, no decode case here


def reachable_taps(cfg) -> list[str]:
    """The canonical taps this adapter can capture, in execution order: all of them."""
    return taps_of_kinds(cfg, ALL_LAYER_TAPS)


def unreachable_taps(cfg) -> list[str]:
    """Canonical taps llama.cpp cannot expose (none: see the module docstring's table)."""
    reachable = set(reachable_taps(cfg))
    return [n for n in tap_names(cfg) if n not in reachable]


# -- reading ggml tensors -----------------------------------------------------------------------------------


def tensor_name(t: GGMLTensor) -> str:
    return t.name.decode("utf-8", "replace")


def src_name(t: GGMLTensor, k: int) -> str | None:
    return tensor_name(t.src[k].contents) if t.src[k] else None


def read_tensor(t: GGMLTensor) -> np.ndarray:
    """A copy of a computed ggml tensor as a float32 NumPy array shaped ne reversed (outermost first).

    Views and permutations are honoured through the byte strides nb. CPU tensors only: their data is host
    memory."""
    if not t.data:
        raise LlamaCppError(
            f"ggml tensor {tensor_name(t)!r} has no data in host memory (a GPU buffer?); "
            "build llama-cpp-python for the CPU or run it with n_gpu_layers=0"
        )
    dtypes = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_BF16: np.uint16}
    if t.type not in dtypes:
        raise LlamaCppError(
            f"ggml tensor {tensor_name(t)!r} has ggml type {t.type}, not f32/f16/bf16: "
            "an activation in a quantised type cannot be read by this adapter"
        )
    dtype = np.dtype(dtypes[t.type])
    shape = tuple(int(n) for n in reversed(t.ne))
    strides = tuple(int(s) for s in reversed(t.nb))
    nbytes = sum((n - 1) * s for n, s in zip(shape, strides)) + dtype.itemsize
    raw = np.ndarray(shape, dtype, buffer=(ctypes.c_char * nbytes).from_address(t.data), strides=strides).copy()
    if t.type == GGML_TYPE_BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class Capture:
    """The eval callback's state: every wanted tensor of one graph evaluation, by name, in order.

    llama.cpp asks `callback(t, ask=True)` before computing a node ("do you want to see it?") and, when we said
    yes, calls `callback(t, ask=False)` once it is computed. Unnamed nodes are kept under a role derived from
    their operands (attn.out's and logits_raw's matmuls)."""

    def __init__(self, want_scores: bool, want_probs: bool):
        skip = set()
        if not want_scores:
            skip.add("kq_scaled_2")
        if not want_probs:
            skip.add("kq_soft_max")
        self.names = (set(LAYER_NAMES) - skip) | set(REPEATED) | set(GLOBAL_NAMES) | {POST_FFW_NORM}
        self.seen: dict[str, list[np.ndarray]] = {}
        self.error: Exception | None = None  # an exception inside the callback, raised after llama_decode

    def role(self, t: GGMLTensor) -> str | None:
        """The key under which to keep t, or None for a tensor we do not want."""
        name = tensor_name(t)
        m = LAYER_NAME_RE.fullmatch(name)
        if (m and m.group(1) in self.names) or name in self.names:
            return name
        w = src_name(t, 0)
        if w is not None and t.src[1]:
            x = src_name(t, 1)
            m = re.fullmatch(r"blk\.(\d+)\.attn_output\.weight", w)
            if m and x == f"kqv_out-{m.group(1)}":
                return f"attn_out-{m.group(1)}"  # o_proj: wo @ kqv_out
            if w == "token_embd.weight" and x == "result_norm":
                return "logits_raw"  # the tied output head before the final soft-cap
        return None

    def __call__(self, t_ptr, ask: bool, user_data) -> bool:
        try:
            t = ctypes.cast(t_ptr, ctypes.POINTER(GGMLTensor)).contents
            role = self.role(t)
            if role is None:
                return False
            if not ask:
                self.seen.setdefault(role, []).append(read_tensor(t))
            return True
        except Exception as e:  # an exception must not cross into C: record it, stop the evaluation
            self.error = e
            return False


def as_shape(name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reshape a captured tensor to its canonical shape; llama.cpp's extra unit dims are dropped."""
    if a.size != int(np.prod(shape)):
        raise LlamaCppError(
            f"llama.cpp tensor {name!r} has shape {a.shape} ({a.size} values), the canonical tap "
            f"needs {shape}: is this GGUF the same model as the checkpoint's config.json?"
        )
    return a.reshape(shape)


def cache_columns(name: str, a: np.ndarray, heads: int, seq: int) -> np.ndarray:
    """(H, S, n_kv) attention columns -> (H, S, S): cache cells 0..S-1 hold positions 0..S-1 (an empty cache
    filled by one batch); the cells past S are padding and must carry no probability."""
    a = a.reshape(heads, seq, -1)
    if a.shape[-1] < seq:
        raise LlamaCppError(
            f"llama.cpp tensor {name!r} has {a.shape[-1]} KV columns for {seq} tokens: the KV "
            "cache was too small for one full-sequence batch"
        )
    return a[..., :seq]


def map_to_taps(seen: dict[str, list[np.ndarray]], cfg, seq: int) -> dict[str, np.ndarray]:
    """Captured llama.cpp tensors -> {canonical tap: array in the README tap table's shape}."""
    S, D, F = seq, cfg.hidden_size, cfg.intermediate_size
    H, K, Dh, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    shapes = {
        "pre_attn_norm": (S, D),
        "attn.context": (S, H * Dh),
        "post_attn_norm": (S, D),
        "resid_mid": (S, D),
        "pre_ffw_norm": (S, D),
        "mlp.gate": (S, F),
        "mlp.up": (S, F),
        "mlp.hidden": (S, F),
        "mlp.out": (S, D),
        "output": (S, D),
        "attn.out": (S, D),
        "attn.q_proj": (S, H, Dh),
        "attn.q_rope": (S, H, Dh),
        "attn.k_proj": (S, K, Dh),
        "attn.k_rope": (S, K, Dh),
        "attn.v_proj": (S, K, Dh),
        "post_ffw_norm": (S, D),
    }
    out: dict[str, np.ndarray] = {}
    if "inp_scaled" in seen:
        out["embed"] = as_shape("inp_scaled", seen["inp_scaled"][0], (S, D))
        out["layers.0.input"] = out["embed"]
    if "result_norm" in seen:
        out["final_norm"] = as_shape("result_norm", seen["result_norm"][-1], (S, D))
    if "logits_raw" in seen:
        out["logits_raw"] = as_shape("logits_raw", seen["logits_raw"][-1], (S, cfg.vocab_size))
    posts = seen.get(POST_FFW_NORM, [])
    if posts and len(posts) != L:
        raise LlamaCppError(f"llama.cpp named {len(posts)} tensors {POST_FFW_NORM!r}, expected one per layer ({L})")
    for i in range(L):
        p = f"layers.{i}."
        for llama_name, tap in LAYER_NAMES.items():
            got = seen.get(f"{llama_name}-{i}")
            if not got:
                continue
            if tap in ("attn.scores", "attn.probs"):
                out[p + tap] = cache_columns(f"{llama_name}-{i}", got[-1], H, S)
            else:
                out[p + tap] = as_shape(f"{llama_name}-{i}", got[-1], shapes[tap])
        for llama_name, (first, last) in REPEATED.items():
            got = seen.get(f"{llama_name}-{i}")
            if not got:
                continue
            out[p + first] = as_shape(f"{llama_name}-{i}", got[0], shapes[first])
            if last is not None:
                if len(got) < 2:
                    raise LlamaCppError(f"llama.cpp named {llama_name}-{i} once; expected it before and after RoPE")
                out[p + last] = as_shape(f"{llama_name}-{i}", got[-1], shapes[last])
        if f"attn_out-{i}" in seen:
            out[p + "attn.out"] = as_shape(f"blk.{i}.attn_output matmul", seen[f"attn_out-{i}"][-1], (S, D))
        if posts:
            out[p + "post_ffw_norm"] = as_shape(POST_FFW_NORM, posts[i], (S, D))
        if i > 0 and f"l_out-{i - 1}" in seen:
            out[p + "input"] = as_shape(f"l_out-{i - 1}", seen[f"l_out-{i - 1}"][-1], (S, D))
    return out


# -- running a GGUF ----------------------------------------------------------------------------------------


def quiet_llama_logs() -> None:
    """llama.cpp logs every metadata key and tensor on load, through llama-cpp-python's Python logger
    "llama-cpp-python"; unless the caller configured that logger, let only errors through."""
    import logging

    logger = logging.getLogger("llama-cpp-python")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


def run_gguf(
    gguf_path, ids, cfg, taps="default", kv_cache_type: str = "f32", n_threads: int | None = None
) -> dict[str, np.ndarray]:
    """Evaluate token ids (S,) or (B, S) with llama.cpp on a GGUF; {canonical tap: float32 array}.

    One fresh context per sequence: its KV cache starts empty, the whole sequence is one batch (n_batch =
    n_ubatch >= S), every position outputs logits, flash attention is off (it would fuse away kq and
    kq_soft_max)."""
    import llama_cpp

    quiet_llama_logs()
    if ctypes.sizeof(GGMLTensor) != GGML_TENSOR_SIZE:
        raise LlamaCppError(
            f"the ctypes mirror of struct ggml_tensor is {ctypes.sizeof(GGMLTensor)} bytes, "
            f"ggml's is {GGML_TENSOR_SIZE} on 64-bit platforms: this platform's layout differs"
        )
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise LlamaCppError(f"{gguf_path}: no such GGUF file")
    if kv_cache_type not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache_type must be one of {list(KV_CACHE_TYPES)}, not {kv_cache_type!r}")
    ids = np.asarray(ids)
    wanted = wanted_taps(cfg, taps)
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    if not model:
        raise LlamaCppError(f"{gguf_path}: llama.cpp could not load this GGUF (see its error above)")
    try:
        rows = [run_one(llama_cpp, model, row, cfg, wanted, kv_cache_type, n_threads) for row in np.atleast_2d(ids)]
    finally:
        llama_cpp.llama_model_free(model)
    if ids.ndim == 1:
        return rows[0]
    return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


def run_one(
    llama_cpp, model, ids: np.ndarray, cfg, wanted: set, kv_cache_type: str, n_threads: int | None
) -> dict[str, np.ndarray]:
    S = len(ids)
    n_ctx = max(256, -(-S // 256) * 256)
    capture = Capture(
        want_scores=any(n.endswith("attn.scores") for n in wanted),
        want_probs=any(n.endswith("attn.probs") for n in wanted),
    )
    callback = llama_cpp.ggml_backend_sched_eval_callback(capture)  # keep a reference while C may call it
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = n_threads or min(2, os.cpu_count() or 1)
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cparams.type_k = cparams.type_v = KV_CACHE_TYPES[kv_cache_type]
    cparams.cb_eval = callback
    cparams.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise LlamaCppError("llama.cpp could not create a context (see its error above)")
    batch = llama_cpp.llama_batch_init(S, 0, 1)
    try:
        batch.n_tokens = S
        for p, tok in enumerate(ids.tolist()):
            batch.token[p], batch.pos[p], batch.n_seq_id[p], batch.logits[p] = tok, p, 1, 1
            batch.seq_id[p][0] = 0
        status = llama_cpp.llama_decode(ctx, batch)
        if capture.error is not None:
            raise LlamaCppError(f"reading a tensor in llama.cpp's eval callback failed: {capture.error}")
        if status != 0:
            raise LlamaCppError(f"llama_decode returned {status} for {S} tokens")
        V = cfg.vocab_size
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(S * V,)).reshape(S, V).copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    check_padding_columns(capture.seen, cfg, S)
    acts = map_to_taps(capture.seen, cfg, S)
    acts["logits"] = logits
    return {n: a for n, a in acts.items() if n in wanted}


def check_padding_columns(seen: dict, cfg, seq: int) -> None:
    """The KV columns past the sequence must get no probability: else cell j is not position j."""
    for i in range(cfg.num_hidden_layers):
        probs = seen.get(f"kq_soft_max-{i}")
        if probs and probs[-1].reshape(cfg.num_attention_heads, seq, -1)[..., seq:].any():
            raise LlamaCppError(
                f"kq_soft_max-{i}: probability on KV cells past the {seq} tokens: the cache "
                "columns are not positions 0..S-1, so the adapter's mapping does not hold"
            )


# -- converting a Hugging Face checkpoint with llama.cpp's own converter -----------------------------------


def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma2-ref"


def find_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from the same llama.cpp the installed llama-cpp-python runs.

    The wheel does not ship it; the sdist does, under vendor/llama.cpp/ (with its `conversion` package and
    gguf-py). In order: $GEMMA2_REF_LLAMA_CPP (a llama.cpp source tree), an earlier extraction in
    ~/.cache/gemma2-ref/llama.cpp-VERSION/, then the sdist: $LLAMA_CPP_SDIST (a downloaded
    llama_cpp_python-VERSION.tar.gz) or `pip download --no-binary :all: --no-deps llama-cpp-python==VERSION`."""
    source = os.environ.get("GEMMA2_REF_LLAMA_CPP")
    if source:
        script = Path(source) / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise LlamaCppError(
                f"$GEMMA2_REF_LLAMA_CPP={source}: no convert_hf_to_gguf.py there; point it at a "
                "llama.cpp source tree, or unset it to extract the converter from the sdist"
            )
        return script
    import llama_cpp

    version = llama_cpp.__version__
    target = cache_home() / f"llama.cpp-{version}"
    script = target / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdist = os.environ.get("LLAMA_CPP_SDIST")
    with tempfile.TemporaryDirectory() as tmp:
        if not sdist:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-q",
                "-d",
                tmp,
                f"llama-cpp-python=={version}",
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if done.returncode != 0 or not found:
                raise LlamaCppError(
                    f"could not download the llama-cpp-python {version} sdist for its "
                    f"convert_hf_to_gguf.py ({' '.join(cmd)}):\n{done.stderr[-2000:]}\n"
                    "Set $LLAMA_CPP_SDIST to a downloaded sdist or $GEMMA2_REF_LLAMA_CPP to a "
                    "llama.cpp checkout, or pass gguf= a converted file"
                )
            sdist = found[0]
        extract_converter(Path(sdist), target)
    return script


def extract_converter(sdist: Path, target: Path) -> None:
    """Unpack vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/} of an sdist into target."""
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rest>
            if (
                len(parts) == 4
                and parts[1:3] == ["vendor", "llama.cpp"]
                and parts[3].startswith(keep)
                and (m.isfile() or m.isdir())
            ):
                m.name = parts[3]
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise LlamaCppError(
                f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside: not a llama-cpp-python sdist?"
            )
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
        tar.extractall(partial, members=members, **safe)
    partial.rename(target)


def conversion_key(checkpoint: Path, outtype: str, model_info: dict) -> str:
    """What a converted GGUF depends on: the checkpoint's files' content, the outtype, the converter's version."""
    import llama_cpp

    files = {
        "weights": model_info["weights"],
        "tokenizer": model_info["tokenizer"],
        "config.json": hashlib.sha256((checkpoint / "config.json").read_bytes()).hexdigest(),
    }
    for extra in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "added_tokens.json"):
        if (checkpoint / extra).is_file():
            files[extra] = hashlib.sha256((checkpoint / extra).read_bytes()).hexdigest()
    blob = json.dumps({"files": files, "outtype": outtype, "llama_cpp": llama_cpp.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def convert(checkpoint, outtype: str = "f32", model_info: dict | None = None, out_dir=None) -> Path:
    """A GGUF of a Hugging Face checkpoint directory, made by llama.cpp's convert_hf_to_gguf.py.

    Cached: the same checkpoint content, outtype and llama.cpp version give the same file path under
    $TMPDIR/gemma2-ref-gguf/ (or out_dir), converted once."""
    outtype = normalise_outtype(outtype)
    checkpoint = Path(checkpoint)
    info = model_info or model_info_from_files(checkpoint, load_config(checkpoint))
    out_dir = Path(out_dir) if out_dir else Path(tempfile.gettempdir()) / "gemma2-ref-gguf"
    out = out_dir / f"{checkpoint.name}-{conversion_key(checkpoint, outtype, info)}-{outtype}.gguf"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.partial")
    cmd = [sys.executable, str(find_converter()), str(checkpoint), "--outfile", str(partial), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise LlamaCppError(f"llama.cpp's converter failed on {checkpoint} ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    partial.replace(out)
    return out


def normalise_outtype(dtype: str) -> str:
    dtype = ALIASES.get(str(dtype), str(dtype))
    if dtype not in OUTTYPES:
        raise ValueError(f"llama.cpp dtype (GGUF outtype) must be one of {list(OUTTYPES)}, not {dtype!r}")
    return dtype


def gguf_type(path: Path) -> str:
    """The GGUF's general.file_type as a name (ALL_F32, MOSTLY_BF16, MOSTLY_Q8_0, ...), read with gguf-py."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    return gguf.LlamaFileType(value).name if value in gguf.LlamaFileType._value2member_map_ else str(value)


def backend_options(checkpoint, args) -> dict:
    """`gemma2-ref golden --backend llama.cpp [--gguf FILE] [--dtype f32|bf16|f16|q8_0]`: the given GGUF, or
    None: each case then converts through the cache, so a suite converts once."""
    return {"gguf": getattr(args, "gguf", None)}


def write_golden(
    checkpoint,
    ids,
    out_dir,
    *,
    dtype: str = "f32",
    taps="default",
    text: str | None = None,
    description: str | None = None,
    positions=None,
    gguf=None,
    kv_cache_type: str | None = None,
) -> Path:
    """Run llama.cpp on a checkpoint (converted to a GGUF of outtype `dtype`, or the given `gguf`, whose own
    file type then decides the compute dtype) and write a golden case (producer: llama.cpp).
    `kv_cache_type`: f32 (default for an f32 GGUF) or f16 (llama.cpp's default, used for the others)."""
    import llama_cpp

    checkpoint = Path(checkpoint)
    outtype = ALIASES.get(str(dtype), str(dtype)) if gguf else normalise_outtype(dtype)  # a given GGUF: any type
    cfg = load_config(checkpoint)
    info = model_info_from_files(checkpoint, cfg)
    gguf_path = Path(gguf) if gguf else convert(checkpoint, outtype, info)
    if gguf:
        outtype = FILE_TYPES.get(gguf_type(gguf_path), outtype)
    kv_cache_type = kv_cache_type or ("f32" if outtype == "f32" else "f16")
    file_type = gguf_type(gguf_path)
    acts = run_gguf(gguf_path, ids, cfg, taps, kv_cache_type)
    producer = {
        "name": "llama.cpp",
        "version": llama_cpp.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": str(gguf_path.resolve()),
        "gguf_file_type": file_type,
        "converted_here": not gguf,
        "kv_cache_type": kv_cache_type,
        "flash_attn": False,
        "unreachable_taps": unreachable_taps(cfg),
    }
    return write_candidate(
        out_dir,
        acts,
        ids,
        checkpoint=checkpoint,
        cfg=cfg,
        producer=producer,
        adapter=__name__,
        compute_dtype=OUTTYPES.get(outtype, outtype),  # a quantized GGUF: its type (q4_0, q4_k_m, ...)
        text=text,
        description=description,
        positions=positions,
        model=info,
    )


# -- corpus goldens (verify/corpus.py): a GGUF's logits of a chunk's scored rows, as llama-perplexity runs it --

# llama.cpp's quantizer (llama_model_quantize, what the llama-quantize tool calls) from the f32 GGUF
QUANTIZED = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def quantize(f32_gguf: Path, ftype: str) -> Path:
    """`llama-quantize F32.gguf OUT.gguf TYPE` through llama.cpp's C API, cached next to its input."""
    import llama_cpp

    out = f32_gguf.with_name(f32_gguf.stem.removesuffix("-f32") + f"-{ftype}-quantized.gguf")
    if out.is_file():
        return out
    quiet_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[ftype]
    params.nthread = min(2, os.cpu_count() or 1)
    partial = out.with_suffix(f".{os.getpid()}.partial")
    status = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise LlamaCppError(f"llama.cpp's quantizer failed on {f32_gguf} to {ftype} (status {status})")
    partial.replace(out)
    return out


def corpus_gguf(checkpoint, dtype: str | None, gguf=None) -> Path:
    """The GGUF a corpus candidate runs: the given one, or MODEL converted (f32 / bf16 / f16) and quantized."""
    if gguf is not None:
        if not Path(gguf).is_file():
            raise LlamaCppError(f"--gguf {gguf}: no such file")
        return Path(gguf)
    from ..storage.loader import resolve_checkpoint

    dtype = ALIASES.get(dtype or "f32", dtype or "f32")
    checkpoint = resolve_checkpoint(checkpoint)
    if dtype in ("f32", "bf16", "f16"):
        return convert(checkpoint, dtype)
    if dtype not in QUANTIZED:
        raise ValueError(f"--dtype {dtype}: llama.cpp runs f32, bf16, f16 or a quantization: {', '.join(QUANTIZED)}")
    return quantize(convert(checkpoint, "f32"), dtype)


def corpus_backend(checkpoint, dtype: str | None, gguf=None) -> dict:
    """The candidate record of `gemma2-ref corpus --backend llama.cpp`: the GGUF (made here once), its type."""
    import llama_cpp

    path = corpus_gguf(checkpoint, dtype, gguf)
    return {
        "dtype": dtype or FILE_TYPES.get(gguf_type(path), gguf_type(path)),
        "gguf": str(path.resolve()),
        "gguf_sha256": sha256_file(path),
        "gguf_file_type": gguf_type(path),
        "kv_cache_type": "f16",
        "flash_attn": "auto",
        "producer": {
            "name": "llama.cpp",
            "llama_cpp_python": llama_cpp.__version__,
            "adapter": "gemma2_ref.adapters.llamacpp",
        },
    }


class CorpusEngine:
    """A GGUF loaded once with one context of n_ctx = ctx, llama.cpp's defaults otherwise (f16 KV cache, flash
    attention auto), as llama-perplexity runs it; closed with the process."""

    def __init__(self, gguf: Path, ctx: int, n_threads: int | None = None):
        import llama_cpp

        quiet_llama_logs()
        llama_cpp.llama_backend_init()
        self.lib = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise LlamaCppError(f"{gguf}: llama.cpp could not load this GGUF (see its error above)")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = ctx, ctx, min(512, ctx), 1
        cparams.n_threads = cparams.n_threads_batch = n_threads or min(2, os.cpu_count() or 1)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise LlamaCppError("llama.cpp could not create a context (see its error above)")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(ctx, 0, 1)

    def logits(self, ids: np.ndarray, start: int, stop: int) -> np.ndarray:
        lib, S = self.lib, len(ids)
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)  # a fresh cache per chunk (:1785)
        b = self.batch
        b.n_tokens = S
        for p, tok in enumerate(ids.tolist()):
            b.token[p], b.pos[p], b.n_seq_id[p], b.logits[p] = tok, p, 1, int(start <= p < stop)
            b.seq_id[p][0] = 0
        status = lib.llama_decode(self.ctx, b)
        if status != 0:
            raise LlamaCppError(f"llama_decode returned {status} for a chunk of {S} tokens")
        n = stop - start
        return (
            np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(n * self.n_vocab,))
            .reshape(n, self.n_vocab)
            .copy()
        )


def corpus_model(checkpoint, dtype: str, gguf=None, ctx: int | None = None) -> CorpusEngine:
    return CorpusEngine(Path(gguf) if gguf else corpus_gguf(checkpoint, dtype), ctx)


def corpus_logits(engine: CorpusEngine, ids, start: int, stop: int) -> np.ndarray:
    """(stop - start, V) float32 logits of rows [start, stop) of one chunk (<bos> already first)."""
    return engine.logits(np.asarray(ids), start, stop)
