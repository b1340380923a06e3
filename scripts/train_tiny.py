"""Train the bundled tiny Gemma 2 the way the Gemma 2 report trains its small models: by distillation.

    python scripts/train_tiny.py              # ~5 min on 2 idle CPU cores; writes gemma2_ref/data/tiny{,-teacher}/
    python scripts/train_tiny.py --quick      # a one-minute smoke run into /tmp (same code path)

1. TEACHER: a larger Gemma 2 (D=192, F=576, 4 layers, same tokenizer and window) trained with ordinary
   next-token cross-entropy on scripts/corpus/python-reference-topics.txt (English prose of the Python
   Language Reference; prose paragraphs unwrapped to one line, see `reflow`), every 10th block of 2048
   tokens held out.
2. STUDENT: the `tiny` preset (D=128, 4 layers), trained only by knowledge distillation from the
   teacher's (bf16, as committed) distributions: minimise sum_x -P_T(x|x_c) log P_S(x|x_c), averaged
   over positions. `kd_loss_torch` is the torch twin of gemma2_ref.distill.distillation_loss and is
   checked equal to it on a real batch before training.

The model in torch is `TorchGemma2`, a compact twin of gemma2_ref/model/gemma2.py with Hugging Face parameter
names (2.5x faster than transformers' Gemma2ForCausalLM on CPU for these sizes). After training, the
saved bf16 checkpoints are loaded three ways -- this twin, transformers' Gemma2ForCausalLM (eager), and
gemma2_ref's NumPy forward -- and their logits must agree: that pins the twin to the real architecture.

Reproducible: fixed seeds, torch.use_deterministic_algorithms, 2 threads. Byte-identical weights are
expected on the same CPU type and torch version (2.13.0); other CPUs may round matmuls differently.
The loss curves, timings and final numbers go to scripts/train_tiny.log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tiny_corpus import BLOCK, CORPUS, HELD_OUT_EVERY, reflow, split_corpus  # noqa: E402,F401  (no torch)

import gemma2_ref as g2  # noqa: E402
from gemma2_ref.checkpoints import save_checkpoint  # noqa: E402
from gemma2_ref.config import Gemma2Config  # noqa: E402
from gemma2_ref.distill import distillation_loss  # noqa: E402

TOKENIZER = ROOT / "gemma2_ref" / "data" / "tiny" / "tokenizer.model"
DATA = ROOT / "gemma2_ref" / "data"
LOG = ROOT / "scripts" / "train_tiny.log.json"

STUDENT = g2.PRESETS["tiny"]
# The teacher: wider and with a wider MLP, same vocabulary, window, layer pattern and context. Like the
# student (and 27B), query_pre_attn_scalar = D / H differs from head_dim. 2.3M parameters (4.6 MB bf16).
TEACHER = STUDENT.replace(hidden_size=192, intermediate_size=576, query_pre_attn_scalar=48)

SEQ_LEN = 128  # > 4 x the window of 32: sliding layers must learn to do without the far past


# -- data -----------------------------------------------------------------------------------------------


def windows(stream: np.ndarray, starts: np.ndarray, bos: int) -> torch.Tensor:
    """(B, SEQ_LEN) windows, each <bos> + SEQ_LEN - 1 tokens: every sequence starts as the model's will."""
    rows = [np.concatenate([[bos], stream[s : s + SEQ_LEN - 1]]) for s in starts]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def held_out_windows(held: np.ndarray, bos: int) -> torch.Tensor:
    """Non-overlapping held-out windows, in order (the same every evaluation)."""
    starts = np.arange(0, len(held) - SEQ_LEN + 1, SEQ_LEN - 1)
    return windows(held, starts, bos)


# -- the model: a torch twin of gemma2_ref/model/gemma2.py, parameters named as in the HF checkpoint ------------


def rms_norm(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def rope(x, cos, sin):  # x (B, heads, S, Dh); half-split layout
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def soft_cap(x, cap):
    return x if cap is None else cap * torch.tanh(x / cap)


class Attention(nn.Module):
    def __init__(self, c: Gemma2Config):
        super().__init__()
        D, H, K, Dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj, self.o_proj = nn.Linear(D, H * Dh, bias=False), nn.Linear(H * Dh, D, bias=False)
        self.k_proj, self.v_proj = nn.Linear(D, K * Dh, bias=False), nn.Linear(D, K * Dh, bias=False)
        self.c = c

    def forward(self, x, cos, sin, mask):
        c, (B, S, _) = self.c, x.shape
        H, K, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = rope(self.q_proj(x).view(B, S, H, Dh).transpose(1, 2), cos, sin)  # (B, H, S, Dh)
        k = rope(self.k_proj(x).view(B, S, K, Dh).transpose(1, 2), cos, sin)  # (B, K, S, Dh)
        v = self.v_proj(x).view(B, S, K, Dh).transpose(1, 2)
        k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)  # each kv head serves H/K
        scores = soft_cap(q @ k.transpose(-1, -2) * c.query_pre_attn_scalar**-0.5, c.attn_logit_softcapping)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), -1).to(q.dtype)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, S, H * Dh))


class MLP(nn.Module):
    def __init__(self, c: Gemma2Config):
        super().__init__()
        D, Fi = c.hidden_size, c.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(D, Fi, bias=False), nn.Linear(D, Fi, bias=False)
        self.down_proj = nn.Linear(Fi, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: Gemma2Config):
        super().__init__()
        D = c.hidden_size
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm, self.post_attention_layernorm = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(D))
        self.pre_feedforward_layernorm = nn.Parameter(torch.zeros(D))
        self.post_feedforward_layernorm = nn.Parameter(torch.zeros(D))
        self.eps = c.rms_norm_eps

    def forward(self, x, cos, sin, mask):
        h = x + rms_norm(
            self.self_attn(rms_norm(x, self.input_layernorm, self.eps), cos, sin, mask),
            self.post_attention_layernorm,
            self.eps,
        )
        return h + rms_norm(
            self.mlp(rms_norm(h, self.pre_feedforward_layernorm, self.eps)), self.post_feedforward_layernorm, self.eps
        )


class Backbone(nn.Module):
    def __init__(self, c: Gemma2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.zeros(c.hidden_size))


class TorchGemma2(nn.Module):
    """Gemma 2 in torch for training; `state_dict()` keys are the checkpoint's (norms as `...layernorm.weight`
    after `export`). Output: logits after the final soft-cap, (B, S, V)."""

    def __init__(self, c: Gemma2Config, seed: int):
        super().__init__()
        self.c, self.model = c, Backbone(c)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # N(0, 0.02^2) everywhere (as transformers), norms 0 (scale 1 + 0)
            for p in self.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)

    def forward(self, ids, at=None):
        """Logits (B, S, V); or, given `at` (B,) positions, only each row's logits there (B, V): sampling
        needs one position per row, and the output head is the biggest matmul of this small model."""
        c, (B, S) = self.c, ids.shape
        pos = torch.arange(S, dtype=torch.float32)
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
        angles = pos[:, None] * inv_freq[None]
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos(), angles.sin()
        delta = pos[:, None] - pos[None, :]  # how far back key j is from query i
        causal = delta >= 0
        sliding = causal & (delta < c.sliding_window)
        emb = self.model.embed_tokens.weight
        x = self.model.embed_tokens(ids) * torch.tensor(math.sqrt(c.hidden_size), dtype=emb.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, sliding if c.is_sliding(i) else causal)
        x = rms_norm(x, self.model.norm, c.rms_norm_eps)
        if at is not None:
            x = x[torch.arange(B), at]
        return soft_cap(x @ emb.T, c.final_logit_softcapping)

    def export(self) -> dict[str, np.ndarray]:
        """float32 arrays under the Hugging Face checkpoint names."""
        out = {}
        for name, p in self.state_dict().items():
            if name.startswith("model.layers.") and name.endswith("layernorm") or name == "model.norm":
                name += ".weight"
            out[name] = p.detach().float().numpy().copy()
        return out

    def load_exported(self, tensors: dict[str, np.ndarray]) -> None:
        own = {
            k: torch.from_numpy(np.ascontiguousarray(tensors[k if k in tensors else k + ".weight"]))
            for k in self.state_dict()
        }
        self.load_state_dict(own)


# -- losses ---------------------------------------------------------------------------------------------


def ce_loss(logits, ids):
    """Next-token cross-entropy (nats/token): position t predicts token t + 1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def kd_loss_torch(teacher_logits, student_logits):
    """Torch twin of gemma2_ref.distill.distillation_loss: mean over positions of sum_x -P_T log P_S."""
    p_teacher = torch.softmax(teacher_logits.float(), -1)
    return -(p_teacher * torch.log_softmax(student_logits.float(), -1)).sum(-1).mean()


# -- training -------------------------------------------------------------------------------------------


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))  # cosine down to 10% of the peak


def optimizer(model, lr):
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )


@torch.no_grad()
def update(model, opt, loss) -> None:
    """One optimizer step on `loss`, gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def evaluate(model, held, teacher=None, batch=32):
    """Held-out next-token CE (nats/token) and, given a teacher, the KD loss against it."""
    model.eval()
    ce, kd, n = 0.0, 0.0, 0
    for i in range(0, len(held), batch):
        ids = held[i : i + batch]
        logits = model(ids)
        ce += ce_loss(logits, ids).item() * len(ids)
        if teacher is not None:
            kd += kd_loss_torch(teacher(ids), logits).item() * len(ids)
        n += len(ids)
    model.train()
    out = {"held_out_ce": ce / n, "held_out_ppl": math.exp(ce / n)}
    if teacher is not None:
        out["held_out_kd"] = kd / n
    return out


def train(name, model, train_stream, held, steps, batch, lr, eval_every, seed, bos, teacher=None):
    """Train `model` for `steps` steps; CE on the next token, or KD from `teacher` when given one."""
    rng = np.random.default_rng(seed)
    opt = optimizer(model, lr)
    warmup = max(1, steps // 20)
    curve, running, t0, c0 = [], [], time.time(), time.process_time()
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(train_stream) - SEQ_LEN, size=batch)
        ids = windows(train_stream, starts, bos)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        logits = model(ids)
        if teacher is None:
            loss = ce_loss(logits, ids)
        else:
            with torch.no_grad():
                teacher_logits = teacher(ids)
            loss = kd_loss_torch(teacher_logits, logits)
        update(model, opt, loss)
        running.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            point = {
                "step": step + 1,
                "tokens": (step + 1) * batch * (SEQ_LEN - 1),
                "train_loss": float(np.mean(running)),
                **evaluate(model, held, teacher),
                "wall_s": round(time.time() - t0, 1),
                "cpu_s": round(time.process_time() - c0, 1),
            }
            curve.append(point)
            running = []
            extra = f"  held-out KD {point['held_out_kd']:.3f}" if teacher is not None else ""
            print(
                f"[{name}] step {step + 1:5d}  train {'KD' if teacher is not None else 'CE'} "
                f"{point['train_loss']:.3f}  held-out CE {point['held_out_ce']:.3f} "
                f"(ppl {point['held_out_ppl']:.1f}){extra}  {point['wall_s']:.0f}s",
                flush=True,
            )
    model.eval()
    return curve


# -- checks after training ------------------------------------------------------------------------------


def bf16_model(cfg, directory: Path) -> TorchGemma2:
    """The saved checkpoint (bf16 values, computed in float32), read by gemma2_ref's loader into the twin."""
    m = TorchGemma2(cfg, seed=0)
    with g2.load_model(directory) as saved:
        m.load_exported({name: np.array(saved.weights.tensor(name)) for name in saved.weights.refs})
    return m.eval()


@torch.no_grad()
def cross_check(cfg, directory: Path, twin: TorchGemma2, ids: torch.Tensor) -> dict:
    """Max |logit difference| between our torch twin, transformers (eager) and gemma2_ref NumPy."""
    from transformers import Gemma2ForCausalLM

    hf = Gemma2ForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    hf_logits = hf(input_ids=ids).logits.numpy()
    twin_logits = twin(ids).numpy()
    with g2.load_model(directory) as m:
        np_logits = m.logits(ids.numpy())
    return {
        "max_abs_twin_vs_transformers": float(np.abs(twin_logits - hf_logits).max()),
        "max_abs_numpy_vs_transformers": float(np.abs(np_logits - hf_logits).max()),
    }


def greedy(directory: Path, prompt: str, n: int = 24) -> str:
    """Greedy continuation with gemma2_ref's NumPy forward (the whole sequence each step: small and plain)."""
    tok = g2.load_tokenizer(directory)
    ids = tok.encode(prompt, bos=True)
    with g2.load_model(directory) as m:
        for _ in range(n):
            ids.append(int(np.argmax(m.logits(np.array(ids))[-1])))
    return tok.decode(ids[1:])


PROMPTS = ["The value of the", "A function definition", "If the object is", "The following example"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a one-minute smoke run (few steps), into --out")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output data dir (default gemma2_ref/data; /tmp/gemma2-tiny-quick with --quick)",
    )
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--student-steps", type=int, default=None)
    ap.add_argument("--log", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or (Path("/tmp/gemma2-tiny-quick") if args.quick else DATA)
    log_path = args.log or (out / "train_tiny.log.json" if args.quick else LOG)
    teacher_steps = args.teacher_steps or (30 if args.quick else 500)
    student_steps = args.student_steps or (30 if args.quick else 500)
    eval_every = 10 if args.quick else 50

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    t_start, c_start, load_start = time.time(), time.process_time(), os.getloadavg()

    tok = g2.load_tokenizer(TOKENIZER)
    ids = np.array(tok.encode(reflow(CORPUS.read_text()), bos=False), dtype=np.int64)
    train_stream, held_stream = split_corpus(ids)
    bos = tok.bos_id
    held = held_out_windows(held_stream, bos)
    print(
        f"corpus: {len(ids)} tokens; train {len(train_stream)}, held out {len(held_stream)} "
        f"({len(held)} windows of {SEQ_LEN})",
        flush=True,
    )

    # 1. teacher: next-token cross-entropy
    teacher = TorchGemma2(TEACHER, seed=1)
    teacher_curve = train(
        "teacher",
        teacher,
        train_stream,
        held,
        teacher_steps,
        batch=16,
        lr=3e-3,
        eval_every=eval_every,
        seed=11,
        bos=bos,
    )
    teacher_dir = out / "tiny-teacher"
    save_checkpoint(teacher_dir, TEACHER, teacher.export(), dtype="BF16", tokenizer=TOKENIZER)
    teacher = bf16_model(TEACHER, teacher_dir)  # distil from exactly the committed (bf16) teacher
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_final = evaluate(teacher, held)
    print(f"[teacher] saved bf16: held-out CE {teacher_final['held_out_ce']:.3f}", flush=True)

    # 2. student: distillation only; the torch loss is checked against the NumPy one first
    student = TorchGemma2(STUDENT, seed=2)
    with torch.no_grad():
        t_logits, s_logits = teacher(held[:4]), student(held[:4])
    kd_torch = kd_loss_torch(t_logits, s_logits).item()
    kd_numpy = distillation_loss(t_logits.numpy(), s_logits.numpy())
    assert abs(kd_torch - kd_numpy) <= 1e-5 * abs(kd_numpy), (kd_torch, kd_numpy)
    print(f"KD loss twin check: torch {kd_torch:.6f}  numpy {kd_numpy:.6f}", flush=True)
    student_init = evaluate(student, held, teacher)
    student_curve = train(
        "student",
        student,
        train_stream,
        held,
        student_steps,
        batch=16,
        lr=3e-3,
        eval_every=eval_every,
        seed=22,
        bos=bos,
        teacher=teacher,
    )
    student_dir = out / "tiny"
    save_checkpoint(student_dir, STUDENT, student.export(), dtype="BF16", tokenizer=TOKENIZER)
    student_bf16 = bf16_model(STUDENT, student_dir)
    student_final = evaluate(student_bf16, held, teacher)
    train_time, train_cpu = time.time() - t_start, time.process_time() - c_start

    # 3. checks on the saved files, and what the model says
    checks = {
        "student": cross_check(STUDENT, student_dir, student_bf16, held[:2]),
        "teacher": cross_check(TEACHER, teacher_dir, teacher, held[:2]),
    }
    print(f"cross-check of the saved checkpoints: {json.dumps(checks)}", flush=True)
    samples = {p: greedy(student_dir, p) for p in PROMPTS}
    for s in samples.values():
        print(f"greedy: {s!r}", flush=True)

    log = {
        "command": "python scripts/train_tiny.py" + (" --quick" if args.quick else ""),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "training_wall_s": round(train_time, 1),
        "training_cpu_s": round(train_cpu, 1),
        "corpus": {
            "file": str(CORPUS.relative_to(ROOT)),
            "tokens": int(len(ids)),
            "train_tokens": int(len(train_stream)),
            "held_out_tokens": int(len(held_stream)),
            "seq_len": SEQ_LEN,
            "held_out": f"every {HELD_OUT_EVERY}th block of {BLOCK} tokens",
        },
        "teacher": {
            "config": TEACHER.to_hf_dict(),
            "params": TEACHER.parameter_counts()["total"],
            "steps": teacher_steps,
            "batch": 16,
            "peak_lr": 3e-3,
            "loss": "next-token cross-entropy",
            "curve": teacher_curve,
            "final_bf16": teacher_final,
        },
        "student": {
            "config": STUDENT.to_hf_dict(),
            "params": STUDENT.parameter_counts()["total"],
            "steps": student_steps,
            "batch": 16,
            "peak_lr": 3e-3,
            "loss": "distillation: mean over positions of sum_x -P_T(x|x_c) log P_S(x|x_c)",
            "kd_twin_check": {"torch": kd_torch, "numpy": kd_numpy},
            "init": student_init,
            "curve": student_curve,
            "final_bf16": student_final,
        },
        "cross_check": checks,
        "greedy": samples,
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    print(
        f"wrote {student_dir}, {teacher_dir}, {log_path}; training {train_time:.0f}s wall, {train_cpu:.0f}s CPU",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
