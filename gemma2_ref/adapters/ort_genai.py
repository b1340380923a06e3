"""ONNX Runtime GenAI's Gemma 2 -> a golden case under the canonical tap names.

The model is built by the engine's own model builder (`python -m onnxruntime_genai.models.builder -i DIR -p fp32
-e cpu`, its `Gemma2Model` in models/builders/gemma.py), offline, into a cache keyed by the checkpoint's content,
the precision and the builder's version. On CPU the builder offers fp32, int8 and int4 (weight-only MatMulNBits);
fp16 / bf16 are for CUDA, DirectML and TensorRT-RTX only (builder.py's "Valid precision + execution provider
combinations").

Two paths, both the engine's own:
  prefill   the built model.onnx with graph outputs added for the intermediate tensors (onnx), run by
            onnxruntime with an empty cache: every tap below, for one sequence or a padded batch;
  decode    onnxruntime_genai's Generator on the unmodified model: the prompt, then one token per
            append_tokens through its own KV cache (sliding layers in a window cache), logits of every step.

Where each tap is in the built graph (node names `/model/layers.{i}/...`):

    embed                     /model/embed_tokens/Mul             (Gather x the builder's constant sqrt(D))
    layers.{i}.input          embed, or layer i-1's output
    layers.{i}.pre_attn_norm  input_layernorm output 0            ((Skip)SimplifiedLayerNormalization)
    attn.q_proj/k_proj/v_proj attn/qkv_proj output, split          (one packed MatMul: H, K, K heads of Dh)
    attn.k_rope               present.{i}.key (B, K, S, Dh)        (the cache GroupQueryAttention wrote)
    attn.context              attn/GroupQueryAttention output 0
    attn.out                  attn/o_proj output;  post_attn_norm: post_attention_layernorm output 0
    resid_mid                 pre_feedforward_layernorm output 3   (SkipSimplifiedLayerNormalization's sum)
    pre_ffw_norm              pre_feedforward_layernorm output 0
    mlp.gate / mlp.up / mlp.hidden / mlp.out   gate_proj, up_proj, mlp/Mul, down_proj outputs
    post_ffw_norm             post_feedforward_layernorm output 0
    layers.{i}.output         layer i+1's input_layernorm output 3; the last layer's: the final norm's
                              output 3, which the builder leaves unnamed and this adapter names
    final_norm                /model/layers.{L}/final_norm_layernorm output 0
    logits_raw / logits       /lm_head/MatMul output / the graph's logits (after Div, Tanh, Mul by 30)

Not reachable: attn.q_rope, attn.scores, attn.probs: RoPE (do_rotary=1), the scaled and soft-capped scores
and the softmax happen inside the GroupQueryAttention kernel (onnxruntime contrib_ops/cpu/bert/
gqa_attention_base.h), which outputs only the context and the present key / value.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..model.config import load_config
from ..model.taps import taps_of_kinds
from ..storage.loader import resolve_checkpoint
from ..verify.golden import model_info_from_files
from .base import Capabilities, wanted_taps, write_candidate

REACHABLE = (
    "input",
    "pre_attn_norm",
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.k_rope",
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
PRECISIONS = {"float32": "fp32", "int8": "int8", "int4": "int4"}  # --dtype -> the builder's CPU precision
CAPABILITIES = Capabilities(padded_batch=True, decode=True)  # attention_mask input; the Generator's KV cache
LAYER_NODE = re.compile(r"/model/layers\.(\d+)/(.+)/[^/]+$")  # (layer, module path) of a node name


class OrtGenAIError(RuntimeError):
    """The builder or the runtime failed; the message names the command or file."""


def reachable_taps(cfg) -> list[str]:
    """The canonical taps this adapter can capture, in execution order (a prefill; a decode: logits only)."""
    return taps_of_kinds(cfg, REACHABLE)


def precision_of(dtype: str) -> str:
    if dtype not in PRECISIONS:
        raise ValueError(f"onnxruntime-genai on CPU builds {', '.join(PRECISIONS)} (--dtype), not {dtype!r}")
    return PRECISIONS[dtype]


# -- building the model with the engine's own builder ------------------------------------------------------


def build_key(checkpoint: Path, precision: str, info: dict) -> str:
    """What a built model depends on: the checkpoint's files, the precision, the builder's version."""
    import onnxruntime_genai as og

    files = {
        "weights": info["weights"],
        "tokenizer": info["tokenizer"],
        "config.json": hashlib.sha256((checkpoint / "config.json").read_bytes()).hexdigest(),
    }
    blob = json.dumps({"files": files, "precision": precision, "onnxruntime_genai": og.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build(checkpoint, dtype: str = "float32", info: dict | None = None, out_dir=None) -> Path:
    """The directory the model builder writes (model.onnx, model.onnx.data, genai_config.json) for a Hugging
    Face checkpoint; cached under $TMPDIR/gemma2-ref-onnx/ (or out_dir), built once, offline."""
    precision = precision_of(dtype)
    checkpoint = resolve_checkpoint(checkpoint)
    info = info or model_info_from_files(checkpoint, load_config(checkpoint))
    out_dir = Path(out_dir) if out_dir else Path(tempfile.gettempdir()) / "gemma2-ref-onnx"
    out = out_dir / f"{checkpoint.name}-{build_key(checkpoint, precision, info)}-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    partial = out.with_name(out.name + f".{os.getpid()}.partial")
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(checkpoint),
        "-o",
        str(partial),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(partial / "cache"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (partial / "genai_config.json").is_file():
        raise OrtGenAIError(
            f"onnxruntime-genai's model builder failed on {checkpoint} ({' '.join(cmd)}):\n"
            f"{(done.stderr or done.stdout)[-3000:]}"
        )
    try:
        partial.rename(out)
    except OSError:  # another process built the same model meanwhile: keep its copy
        shutil.rmtree(partial, ignore_errors=True)
        if not (out / "genai_config.json").is_file():
            raise
    return out


# -- the tap graph: the built model with its intermediate tensors as graph outputs -------------------------

# (module path under /model/layers.{i}/, op type or None for any) -> [(output index, key)]
LAYER_OUTPUTS = {
    ("input_layernorm", None): [(0, "pre_attn_norm"), (3, "previous.output")],
    ("attn/qkv_proj", None): [(0, "qkv")],
    ("attn", "GroupQueryAttention"): [(0, "attn.context"), (1, "present.key")],
    ("attn/o_proj", None): [(0, "attn.out")],
    ("post_attention_layernorm", None): [(0, "post_attn_norm")],
    ("pre_feedforward_layernorm", None): [(0, "pre_ffw_norm"), (3, "resid_mid")],
    ("mlp/gate_proj", None): [(0, "mlp.gate")],
    ("mlp/up_proj", None): [(0, "mlp.up")],
    ("mlp", "Mul"): [(0, "mlp.hidden")],
    ("mlp/down_proj", None): [(0, "mlp.out")],
    ("post_feedforward_layernorm", None): [(0, "post_ffw_norm")],
}


def graph_tensors(graph, cfg) -> dict[str, str]:
    """{key: tensor name} of the built graph: `embed`, `final_norm`, `logits_raw`, `logits`, and per layer
    `layers.{i}.<kind>` (`qkv` packed, `present.key`), from the builder's node names. The final norm's
    output 3 (the last layer's output) is named here when the builder left it out."""
    L = cfg.num_hidden_layers
    found = {"logits": "logits"}
    for node in graph.node:
        if node.name == "/model/embed_tokens/Mul":
            found["embed"] = node.output[0]
        elif node.name.startswith("/lm_head/") and node.op_type.startswith("MatMul"):
            found["logits_raw"] = node.output[0]
        elif node.name.startswith(f"/model/layers.{L}/final_norm_layernorm/"):
            while len(node.output) < 4:
                node.output.append("")
            node.output[3] = node.output[3] or f"/model/layers.{L}/final_norm_layernorm/output_3"
            found["final_norm"], found[f"layers.{L - 1}.output"] = node.output[0], node.output[3]
        elif m := LAYER_NODE.match(node.name):
            i, module = int(m[1]), m[2]
            for index, key in LAYER_OUTPUTS.get((module, node.op_type), LAYER_OUTPUTS.get((module, None), [])):
                if index < len(node.output) and node.output[index]:
                    found[f"layers.{i - 1}.output" if key == "previous.output" else f"layers.{i}.{key}"] = node.output[
                        index
                    ]
    missing = [k for k in ("embed", "final_norm", "logits_raw") if k not in found]
    if missing:
        raise OrtGenAIError(f"the built graph has no node for {', '.join(missing)}: not a model builder Gemma 2?")
    return found


def tap_graph(model_dir: Path, cfg) -> tuple[Path, dict[str, str]]:
    """model.taps.onnx beside the built model.onnx (same external weights): every tensor of graph_tensors a
    graph output. Written once per built model."""
    import onnx

    model = onnx.load(model_dir / "model.onnx", load_external_data=False)
    found = graph_tensors(model.graph, cfg)
    out = model_dir / "model.taps.onnx"
    if not out.is_file():
        elem = model.graph.output[0].type.tensor_type.elem_type  # the activations' dtype (logits')
        have = {o.name for o in model.graph.output}
        for name in found.values():
            if name not in have:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
                have.add(name)
        partial = out.with_name(f"model.taps.{os.getpid()}.partial")
        onnx.save_model(model, partial)
        partial.replace(out)
    return out, found


def session(path: Path):
    """An onnxruntime CPU session (the runtime onnxruntime-genai drives), one thread per core it may use."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_prefill(sess, found: dict, ids: np.ndarray, attention_mask: np.ndarray | None, cfg) -> dict[str, np.ndarray]:
    """Run the tap graph on ids (B, S) with an empty cache: {key: array} for every key of `found`."""
    B, S = ids.shape
    mask = np.ones((B, S), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask}
    feed |= cache_capacity(sess, cfg, B)
    names = list(found.values())
    values = sess.run(names, feed)
    by_name = dict(zip(names, values))
    return {key: by_name[name] for key, name in found.items()}


def map_to_taps(raw: dict[str, np.ndarray], cfg, wanted: set) -> dict[str, np.ndarray]:
    """The graph's tensors (B, S, ...) under canonical names and shapes: qkv split into heads, the present
    key (B, K, S, Dh) transposed, each layer's input taken from the tensor before it."""
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = {}
    for key, a in raw.items():
        if key.endswith(".qkv"):
            p = key.removesuffix("qkv")
            q, k, v = np.split(a, [H * Dh, (H + K) * Dh], axis=-1)
            out |= {
                p + "attn.q_proj": q.reshape(*q.shape[:-1], H, Dh),
                p + "attn.k_proj": k.reshape(*k.shape[:-1], K, Dh),
                p + "attn.v_proj": v.reshape(*v.shape[:-1], K, Dh),
            }
        elif key.endswith(".present.key"):
            S = raw["embed"].shape[1]  # a sliding layer's cache has the window's slots: the prompt's keys first,
            if a.shape[2] >= S:  # unless the prompt is longer than the window (its ring then lost the oldest)
                out[key.removesuffix("present.key") + "attn.k_rope"] = a[:, :, :S].transpose(0, 2, 1, 3)
        else:
            out[key] = a
    for i in range(cfg.num_hidden_layers):
        source = "embed" if i == 0 else f"layers.{i - 1}.output"
        if source in out:
            out[f"layers.{i}.input"] = out[source]
    return {n: np.asarray(a, np.float32) for n, a in out.items() if n in wanted}


def cache_capacity(sess, cfg, batch: int) -> dict[str, np.ndarray]:
    """Empty past key / value inputs as onnxruntime-genai's runtime gives a first step: a window-sized buffer
    for a sliding layer (its GroupQueryAttention has sliding_window_cache=1 and refuses a smaller one),
    nothing for a global layer."""
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            layer = int(i.name.split(".")[1])
            keys = cfg.sliding_window if cfg.is_sliding(layer) else 0
            past[i.name] = np.zeros((batch, cfg.num_key_value_heads, keys, cfg.head_dim), np.float32)
    return past


def generator_logits(model_dir: Path, ids: np.ndarray, cfg, prefill: int | None = None) -> np.ndarray:
    """The engine's own path: ids (B, S) handed to the Generator, ids[:, :prefill] in one append_tokens, then
    (a decode) one token per append_tokens through its KV cache, teacher-forced (the tokens are ids', not
    sampled). The logits of every position, (B, S, V). A padded batch's padding is <pad>, which the runtime
    turns into its attention mask itself. max_length is at least the sliding window: below it the runtime's
    window cache is too small and GroupQueryAttention refuses the first step ("sliding_window_cache: KV cache
    capacity (20) must be at least local_window_size (32)")."""
    import onnxruntime_genai as og

    B, S = ids.shape
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(max(S, cfg.sliding_window)), do_sample=False, batch_size=int(B))
    gen = og.Generator(model, params)
    prefill = S if prefill is None else prefill
    rows = []
    for s0, s1 in [(0, prefill)] + [(p, p + 1) for p in range(prefill, S)]:
        gen.append_tokens(np.ascontiguousarray(ids[:, s0:s1], np.int32))
        rows.append(np.asarray(gen.get_output("logits"), np.float32))
    return np.concatenate(rows, axis=1)


def capture(
    model_dir: Path, ids, cfg, taps="default", attention_mask=None, prefill: int | None = None, sess=None
) -> dict[str, np.ndarray]:
    """The requested canonical taps the engine exposes for ids (S,) or (B, S), float32; no batch axis for
    1-D ids. A decode case (`prefill`) and a padded batch run the Generator: logits only (the steps, and the
    mask the runtime makes from <pad>, stay inside it; the tap graph's GroupQueryAttention refuses a mask with
    padding: "seqlens_k[1] = 3 is too small for sequence_length 8")."""
    ids2 = np.atleast_2d(np.asarray(ids))
    padded = attention_mask is not None and not np.asarray(attention_mask).all()
    if prefill is not None or padded:
        try:
            acts = {"logits": generator_logits(model_dir, ids2, cfg, prefill)}
        except RuntimeError as e:  # the runtime takes left padding only: a right-padded batch is refused
            if not padded:
                raise
            raise NotImplementedError(f"onnxruntime-genai refuses this padded batch: {e}") from None
    else:
        path, found = tap_graph(model_dir, cfg)
        raw = run_prefill(sess or session(path), found, ids2, None, cfg)
        acts = map_to_taps(raw, cfg, wanted_taps(cfg, taps))
    return acts if np.ndim(ids) == 2 else {n: a[0] for n, a in acts.items()}


def backend_options(checkpoint, args) -> dict:
    """`gemma2-ref golden --backend onnxruntime-genai [--dtype float32|int8|int4]`: build once for a suite."""
    return {"model_dir": build(checkpoint, args.dtype)}


def write_golden(
    checkpoint,
    ids,
    out_dir,
    *,
    dtype: str = "float32",
    taps="default",
    text: str | None = None,
    description: str | None = None,
    positions=None,
    model_dir=None,
    attention_mask=None,
    prefill: int | None = None,
) -> Path:
    """Build (or reuse) the engine's model of a checkpoint and write a golden case (producer:
    onnxruntime-genai). dtype: float32, or int8 / int4 (weight-only quantized MatMuls, float32 activations)."""
    import onnxruntime
    import onnxruntime_genai as og

    checkpoint = resolve_checkpoint(checkpoint)
    cfg = load_config(checkpoint)
    info = model_info_from_files(checkpoint, cfg)
    model_dir = Path(model_dir) if model_dir else build(checkpoint, dtype, info)
    acts = capture(model_dir, ids, cfg, taps, attention_mask, prefill)
    producer = {
        "name": "onnxruntime-genai",
        "version": og.__version__,
        "onnxruntime": onnxruntime.__version__,
        "precision": precision_of(dtype),
        "execution_provider": "cpu",
        "model_dir": str(model_dir),
        "path": "onnxruntime, tap graph" if "layers.0.input" in acts or "embed" in acts else "Generator",
    }
    return write_candidate(
        out_dir,
        acts,
        ids,
        checkpoint=checkpoint,
        cfg=cfg,
        producer=producer,
        adapter=__name__,
        compute_dtype="float32" if dtype == "float32" else dtype,
        text=text,
        description=description,
        positions=positions,
        attention_mask=attention_mask,
        prefill=prefill,
        model=info,
    )
