"""Time per 1000 corpus tokens for Gemma 2 9B and 27B shapes, side by side with llama-perplexity on f32 / bf16
GGUFs of the same checkpoints, and what a wikitext-2-sized corpus then takes on this machine.

    python benchmarks/corpus_full_shapes.py OUT_DIR [--models 9b,27b] [--ctx 512] [--chunks 2]

A full 9B / 27B does not fit this machine's budget (~8 GiB per process), so each is measured in parts, all at the
real widths (D, H, K, Dh, F of the preset):
  layers    random bf16 checkpoints of 1 and 2 layers with the bundled 2048-id tokenizer. Ours: the 2-layer one,
            each chunk's forward timed layer by layer (its progress callback) and whole (with score_rows):
            per layer = the layers' mean, the rest = the chunk - 2 x per layer (embedding, final norm, the 2048-id
            head, scoring), all from one run, so a load change between runs cannot bias the split (it did: at a
            load average of 12 to 23, a 2-layer run once took less than a 1-layer one). llama-perplexity:
            "seconds per pass" on an f32 GGUF of each (--gguf-types f32,bf16 for both kinds; each conversion takes
            minutes), per layer = t(2) - t(1), the rest = t(1) - per layer
  head      the real 256000-id output head of the scored rows (ctx/2 per chunk), as our forward runs it (a float32
            matmul with the embedding, soft-cap) timed on a 32000-id slice and scaled by 256000/32000 (the matmul
            is linear in the ids), plus `score_rows` (log-softmax, top-256, target) on (ctx/2, 256000) logits
  a chunk   = L x per layer + rest + head; per 1000 tokens = a chunk x 1000 / ctx
llama.cpp's head is not measured here (its chunk time is L x its per layer + its rest, the head at V=2048): its
rows are a lower bound. The checkpoints and GGUFs are deleted at the end. Writes
benchmarks/corpus_full_shapes.json (with --write) and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from corpus_speed import llama_perplexity  # noqa: E402
from measure_corpus_kld import corpus_arguments  # noqa: E402

import gemma2_ref as g2  # noqa: E402
from gemma2_ref.verify import corpus as C  # noqa: E402
from gemma2_ref.verify.corpus_text import encode_corpus_text  # noqa: E402

LAYERS = {"9b": 42, "27b": 46}
REAL_VOCAB, SLICE = 256000, 32000
WIKITEXT2_WORDS = (
    245_569  # wikitext-2's test split (Merity et al. 2016, table 1): the corpus llama-perplexity users run
)
JSON = ROOT / "benchmarks" / "corpus_full_shapes.json"


def checkpoint(preset: str, layers: int, out: Path) -> Path:
    from llamacpp_random_checkpoint import released_token_files

    from gemma2_ref.checkpoints import build_random_checkpoint
    from gemma2_ref.model.config import alternating_layer_types

    cfg = g2.PRESETS[preset].replace(
        num_hidden_layers=layers, layer_types=alternating_layer_types(layers), vocab_size=2048
    )
    d = build_random_checkpoint(out / f"{preset}-{layers}", cfg, seed=5, log=lambda *a: None)
    shutil.copy(g2.bundled_path("tiny") / "tokenizer.model", d / "tokenizer.model")
    return released_token_files(d)


def ours_layer_seconds(ckpt: Path, ctx: int, chunks: int) -> dict:
    """Our forward of `chunks` chunks on the checkpoint, timed layer by layer (forward's progress callback) and
    whole (the forward of the scored rows' logits, then score_rows as run_shard does): {"layers": [s per chunk of
    each layer], "chunk": s per chunk}. One run holds both, so a load change between runs cannot bias the split."""
    from gemma2_ref.model.tokenizer import BOS

    model = g2.load_model(str(ckpt), "float32")
    tokens = C.chunk_corpus(np.array(encode_corpus_text(ckpt, C.BUNDLED_CORPUS.read_text()), "int64"), ctx, chunks, "")
    layers, whole = np.zeros(model.config.num_hidden_layers), 0.0
    for ids in tokens:
        run = ids.astype(np.int64)
        run[0] = BOS
        stamps = []
        t0 = time.perf_counter()
        logits = model.forward(
            run,
            None,
            logits_at=(ctx // 2, ctx - 1),
            progress=lambda done, total: stamps.append(time.perf_counter()),  # noqa: B023 (this forward)
        )["logits"]
        C.score_rows(logits, ids[ctx // 2 + 1 :], C.DEFAULT_TOP_K, None)
        whole += time.perf_counter() - t0
        layers += np.diff([t0, *stamps])[: len(layers)]
    return {"layers": (layers / len(tokens)).tolist(), "chunk": whole / len(tokens)}


def llama_seconds(ckpt: Path, outtype: str, text: Path, ctx: int, chunks: int) -> float | None:
    """llama-perplexity's "seconds per pass" x chunks on a GGUF of the checkpoint (made by llama.cpp's converter)."""
    from gemma2_ref.adapters.llamacpp import convert

    binary = llama_perplexity()
    if binary is None:
        return None
    gguf = convert(ckpt, outtype, out_dir=ckpt.parent / "gguf")
    cmd = [str(binary), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", "2"]
    done = subprocess.run([*cmd, "-b", str(ctx)], capture_output=True, text=True)
    gguf.unlink()
    per_pass = re.search(r"([\d.]+) seconds per pass", done.stderr + done.stdout)
    return float(per_pass.group(1)) * chunks if per_pass else None


def head_seconds(preset: str, ctx: int) -> float:
    """The 256000-id head of one chunk's scored rows (module docstring): matmul + soft-cap, then score_rows."""
    cfg = g2.PRESETS[preset]
    rng = np.random.default_rng(0)
    rows = ctx // 2
    x = rng.standard_normal((rows, cfg.hidden_size), dtype=np.float32)
    w = rng.standard_normal((SLICE, cfg.hidden_size), dtype=np.float32) * 0.02
    t0 = time.perf_counter()
    logits = np.tanh((x @ w.T) / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
    matmul = (time.perf_counter() - t0) * REAL_VOCAB / SLICE
    del w, logits
    full = rng.standard_normal((rows, REAL_VOCAB), dtype=np.float32)
    targets = rng.integers(0, REAL_VOCAB, rows)
    t0 = time.perf_counter()
    C.score_rows(full, targets, C.DEFAULT_TOP_K, None)
    return matmul + time.perf_counter() - t0


def cached(path: Path, key: str, compute):
    """A timing from OUT/timings.json, or computed and added to it (a run stopped half-way resumes)."""
    found = json.loads(path.read_text()) if path.is_file() else {}
    if key not in found:
        found[key] = compute()
        path.write_text(json.dumps(found, indent=1))
    return found[key]


def measure(preset: str, out: Path, ctx: int, chunks: int, text: Path, outtypes: list[str]) -> dict:
    """Ours: per layer and the rest from one run of the 2-layer checkpoint; llama-perplexity: t(2) - t(1)."""
    store = out / "timings.json"
    t = {}
    for layers in (1, 2):
        keys = [f"{preset}/{layers}/{o}" for o in outtypes] + ([f"{preset}/2/ours"] if layers == 2 else [])
        if all(k in (json.loads(store.read_text()) if store.is_file() else {}) for k in keys):
            t.update({k: cached(store, k, None) for k in keys})
            continue
        ckpt = checkpoint(preset, layers, out)
        for o in outtypes:
            t[f"{preset}/{layers}/{o}"] = cached(
                store,
                f"{preset}/{layers}/{o}",
                lambda: per_chunk(ckpt, o, text, ctx, chunks),  # noqa: B023 (called at once)
            )
        if layers == 2:
            t[f"{preset}/2/ours"] = cached(
                store,
                f"{preset}/2/ours",
                lambda: ours_layer_seconds(ckpt, ctx, chunks),  # noqa: B023 (called at once)
            )
        shutil.rmtree(ckpt)
        print(
            f"{preset} {layers} layer(s): {json.dumps({k: v for k, v in t.items() if f'/{layers}/' in k})}", flush=True
        )
    head = cached(store, f"{preset}/head", lambda: head_seconds(preset, ctx))
    row = {"model": preset, "layers": LAYERS[preset], "ctx": ctx, "head_seconds_per_chunk": head}
    ours = t[f"{preset}/2/ours"]
    per_layer = float(np.mean(ours["layers"]))
    row["ours"] = engine_row(ours["chunk"] - per_layer, ours["chunk"], per_layer, LAYERS[preset], head, ctx)
    for o in outtypes:
        one, two = t[f"{preset}/1/{o}"], t[f"{preset}/2/{o}"]
        if one is not None and two is not None:
            row[o] = engine_row(one, two, two - one, LAYERS[preset], 0.0, ctx)
    return row


def per_chunk(ckpt: Path, outtype: str, text: Path, ctx: int, chunks: int) -> float | None:
    s = llama_seconds(ckpt, outtype, text, ctx, chunks)
    return None if s is None else s / chunks


def engine_row(one: float, two: float, per_layer: float, layers: int, head: float, ctx: int) -> dict:
    """A chunk of the full depth: layers x per layer + the rest (t(1) - per layer) + the head."""
    chunk = layers * per_layer + (one - per_layer) + head
    return {
        "seconds_per_chunk_1_layer": one,
        "seconds_per_chunk_2_layers": two,
        "per_layer": per_layer,
        "rest": one - per_layer,
        "seconds_per_chunk": chunk,
        "seconds_per_1000_tokens": chunk * 1000 / ctx,
    }


def gemma_tokens(words: int = WIKITEXT2_WORDS) -> int:
    """wikitext-2's test split in Gemma-tokenizer tokens, at the bundled tokenizer's tokens per whitespace word on the
    bundled corpus (1.99): its 2048-id vocabulary splits finer than Gemma's 256000 ids, so an upper bound."""
    text = C.BUNDLED_CORPUS.read_text(encoding="utf-8")
    per_word = len(g2.load_tokenizer("tiny").encode(text)) / len(text.split())
    return int(words * per_word)


def main() -> None:
    ap = corpus_arguments(__doc__, "9b,27b", 2, ctx=512)
    ap.add_argument("--write", action="store_true", help=f"write {JSON.name}")
    ap.add_argument("--gguf-types", default="f32", help="GGUFs llama-perplexity runs: f32 and/or bf16 (default f32)")
    ap.add_argument("--table-only", action="store_true", help=f"print the table of the committed {JSON.name}")
    args = ap.parse_args()
    if args.table_only:
        print(table(json.loads(JSON.read_text())))
        return
    if args.out is None:
        ap.error("give OUT_DIR (or --table-only)")
    args.out.mkdir(parents=True, exist_ok=True)
    text = args.out / "corpus.txt"
    text.write_text(C.BUNDLED_CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    load = os.getloadavg()[0]
    outtypes = args.gguf_types.split(",")
    rows = [measure(m, args.out, args.ctx, args.chunks, text, outtypes) for m in args.models.split(",")]
    result = {"load_average": [load, os.getloadavg()[0]], "cpus": os.cpu_count()}
    result["rows"] = rows
    if args.write:
        JSON.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(result: dict) -> str:
    """The Markdown table of a result; wikitext-2's hours at gemma_tokens() (derived here, not stored)."""
    tokens = gemma_tokens()
    lines = [
        "| shape | engine | s / chunk, 1 layer | 2 layers | per layer | rest | head (256000 ids) | s / 1000 tokens "
        f"| wikitext-2 test ({tokens:,} tokens) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"ours": "gemma2-ref reference (float32)", "f32": "llama-perplexity f32", "bf16": "llama-perplexity bf16"}
    for r in result["rows"]:
        for engine, name in names.items():
            e = r.get(engine)
            if e is None:
                continue
            head = f"{r['head_seconds_per_chunk']:.1f}" if engine == "ours" else "not measured"
            hours = e["seconds_per_1000_tokens"] * tokens / 1000 / 3600
            lines.append(
                f"| {r['model']} ({r['layers']} layers) | {name} | {e['seconds_per_chunk_1_layer']:.1f} | "
                f"{e['seconds_per_chunk_2_layers']:.1f} | {e['per_layer']:.2f} | {e['rest']:.2f} | {head} | "
                f"{e['seconds_per_1000_tokens']:.0f} | {hours:.1f} h |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
