"""Exercises: a learner's own Gemma 2 functions, run inside the reference forward and diagnosed.

    gemma2-ref exercise check my_gemma.py              # every function the file has written
    gemma2-ref exercise check my_gemma.py --only rope  # one of them

The template (walkthrough/exercises/my_gemma.py) holds the functions of model/gemma2.py a learner writes,
with the reference's signatures less the tap recorder. For each function the file has written, the tiny
model's forward runs with that one function replaced by the learner's (everything else the reference's),
every default tap is compared with the reference's forward (compare.py, fp32 profile), and a function that
fails is diagnosed (diagnose.py): the first diverging tap, and the known mistake (mistakes.py) that the
activations match, said in the learner's terms with the chapter that explains it. Last, every written
function together: the learner's model. A function whose body still raises NotImplementedError is "not
written yet" and left to the reference.

The input is longer than the tiny model's 32-token window, so the window mistakes show. Substitution is of
the names model/gemma2.py looks up when the forward runs (`substituted`), undone afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..model import gemma2 as G
from ..model.taps import NO_TAPS
from ..model.tokenizer import load_tokenizer
from ..storage.loader import load_model
from .compare import CaseComparison, compare_activations, get_profile
from .diagnose import Diagnosis, diagnose
from .golden import Case
from .suites import run_case

# Chapter 13's golden case (46 tokens: past the 32-token window of tiny).
TEXT = (
    "Assert statements are a convenient way to insert debugging assertions into a program. "
    "The simple form is equivalent to: if debug, if not expression, raise AssertionError."
)


class ExerciseError(ValueError):
    """The learner's file cannot be checked (does not import, lacks a function): one line, exit 2."""


@dataclass(frozen=True)
class Exercise:
    name: str  # the function, as model/gemma2.py and the template name it
    signature: str  # the learner's signature
    chapter: str  # the walkthrough chapter that explains it


EXERCISES = [
    Exercise("embed", "embed(ids, embedding)", "03-embeddings.md"),
    Exercise("rms_norm", "rms_norm(x, w, eps)", "04-rmsnorm.md"),
    Exercise("rope", "rope(x, positions, theta)", "05-rope.md"),
    Exercise("soft_cap", "soft_cap(x, cap)", "07-softcap.md"),
    Exercise("attention_mask", "attention_mask(q_pos, k_pos, window)", "08-local-global.md"),
    Exercise("attention", "attention(q, k, v, q_pos, k_pos, window, scale, softcap)", "06-attention.md"),
    Exercise("gelu_tanh", "gelu_tanh(x)", "09-feedforward.md"),
    Exercise("mlp", "mlp(x, w)", "09-feedforward.md"),
    Exercise("decoder_layer", "decoder_layer(x, w, positions, cfg, layer)", "10-forward.md"),
]
NAMES = [e.name for e in EXERCISES]
CHAPTER = {e.name: e.chapter for e in EXERCISES}

# A known mistake (mistakes.known_mistakes' names, up to the first space or "=value") said to the learner.
HINTS = {
    "drop_attn_softcap": (
        "your attention does not soft-cap the scores: Gemma 2 applies softcap * tanh(s / "
        "softcap) to q k^T * scale, before the mask",
        "07-softcap.md",
    ),
    "drop_final_softcap": ("the logits are not soft-capped (30 * tanh(x / 30))", "07-softcap.md"),
    "no_sliding_window": (
        "your mask ignores the window: on a sliding layer a query at i sees only the keys j with i - window < j <= i",
        "08-local-global.md",
    ),
    "window_offset=+1": (
        "your window is one too wide: a query sees `window` keys, itself included (i - window < j), not window + 1",
        "08-local-global.md",
    ),
    "window_offset=-1": (
        "your window is one too narrow: a query sees `window` keys, itself included (i - window < j <= i)",
        "08-local-global.md",
    ),
    "query_scale=head_dim": (
        "your attention scales the scores by head_dim^-0.5: Gemma 2 scales by "
        "query_pre_attn_scalar^-0.5 (the `scale` argument; 32 for tiny, 144 for 27B)",
        "06-attention.md",
    ),
    "query_scale": (
        "your attention scales the scores by the wrong number: use the `scale` argument, query_pre_attn_scalar^-0.5",
        "06-attention.md",
    ),
    "sliding_layers=odd": (
        "the window is on the odd layers: it belongs on layers 0, 2, 4, ... (cfg.window(layer) gives each layer's)",
        "08-local-global.md",
    ),
    "rope_theta": (
        "your rope uses another base: the angles are position * theta^(-2i/head_dim) with the "
        "`theta` argument (rope_theta, 10000)",
        "05-rope.md",
    ),
    "rope_layout=interleaved": (
        "your rope pairs dimension 2i with 2i+1: that is the interleaved layout; Gemma 2 "
        "pairs dimension i with i + head_dim/2 (rotate_half)",
        "05-rope.md",
    ),
    "gqa_mapping=tiled": (
        "your attention gives query head h the kv head h % K: Gemma 2 groups them, query head "
        "h uses kv head h // (H / K) (repeat_interleave, not tile)",
        "06-attention.md",
    ),
    "normalizer_dtype=bfloat16": (
        "your embed multiplies by sqrt(D) rounded to bfloat16: a float32 run multiplies by float32(sqrt(D))",
        "03-embeddings.md",
    ),
    "normalizer_dtype=float64": (
        "your embed multiplies by sqrt(D) in another dtype than the activations'",
        "03-embeddings.md",
    ),
    "embed_unscaled": ("your embed does not multiply the rows by sqrt(D) (D = embedding.shape[1])", "03-embeddings.md"),
    "norm_offset=0": (
        "your rms_norm scales by w: Gemma stores the scale as an offset from 1, multiply by (1 + w)",
        "04-rmsnorm.md",
    ),
    "norm_offset=2": ("your rms_norm scales by (2 + w): the +1 is added twice", "04-rmsnorm.md"),
    "no_post_attn_norm": (
        "your decoder_layer adds the attention output without post_attn_norm: Gemma 2 "
        "normalizes each sub-block's output before adding it",
        "10-forward.md",
    ),
    "no_post_ffw_norm": (
        "your decoder_layer adds the MLP output without post_ffw_norm: Gemma 2 normalizes "
        "each sub-block's output before adding it",
        "10-forward.md",
    ),
    "exact_gelu": (
        "your GELU is the exact erf form: Gemma 2 uses the tanh approximation 0.5 x (1 + "
        "tanh(sqrt(2/pi) (x + 0.044715 x^3)))",
        "09-feedforward.md",
    ),
}


def hint(mistake_name: str) -> tuple[str, str] | None:
    """(what the learner's code does, chapter) for a catalogued mistake's name, or None."""
    exact = mistake_name.split(" ")[0]
    return HINTS.get(exact) or HINTS.get(exact.split("=")[0])


# -- the learner's file -------------------------------------------------------------------------------------


def load_solution(path) -> object:
    """The learner's module, imported from its file; ExerciseError (one line) if it cannot be checked."""
    path = Path(path)
    if not path.is_file():
        raise ExerciseError(f"{path}: no such file (copy walkthrough/exercises/my_gemma.py and write in it)")
    spec = importlib.util.spec_from_file_location(f"_gemma2_exercise_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ExerciseError(f"{path}: does not import: SyntaxError at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001  (whatever the learner's module raises on import)
        raise ExerciseError(f"{path}: does not import: {type(e).__name__}: {e}{where(e, path)}") from None
    missing = [n for n in NAMES if not callable(getattr(module, n, None))]
    if missing:
        raise ExerciseError(
            f"{path}: no function {', '.join(missing)} (the template defines {', '.join(NAMES)}: "
            f"keep each, even unwritten)"
        )
    return module


def where(error: BaseException, path: Path) -> str:
    """' (my_gemma.py line 12, in rope)' for the deepest frame of the learner's file in the traceback."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f" ({path.name} line {frames[-1].lineno}, in {frames[-1].name})" if frames else ""


# -- running the learner's functions inside the reference forward -------------------------------------------


class WrongShape(Exception):
    """A learner's function returned another shape than the reference's on the same input."""


def shaped(name, learner_fn, reference_fn):
    """learner_fn, checked to return the reference's shape on the same arguments."""

    def call(*args):
        out = np.asarray(learner_fn(*args))
        expected = np.shape(reference_fn(*args))
        if out.shape != expected:
            raise WrongShape(f"{name} returned shape {out.shape} where {expected} is expected")
        return out

    return call


def adapters(module, names) -> dict:
    """{name in model/gemma2.py: replacement} running the learner's `names` with the reference's call signatures."""
    fn = {n: shaped(n, getattr(module, n), getattr(G, n)) for n in names if n not in ("mlp", "decoder_layer")}
    out = {}
    if "embed" in names:
        out["embed"] = lambda ids, embedding, normalizer=None: fn["embed"](ids, embedding)
    if "rms_norm" in names:  # the reference offers its inner steps to the recorder: the learner's need not
        out["rms_norm"] = lambda x, w, eps, taps=NO_TAPS: fn["rms_norm"](x, w, eps)
    for n in ("rope", "attention_mask"):
        if n in names:
            out[n] = fn[n]
    if "soft_cap" in names:  # both caps: the scores' (attention) and the logits' (forward, in place)
        out["soft_cap"] = fn["soft_cap"]
        out["soft_cap_"] = fn["soft_cap"]
    if "attention" in names:  # every query in one call, all keys in view (not fast.py's query blocks)
        out["attention"] = lambda q, k, v, q_pos, k_pos, window, scale, softcap, taps=NO_TAPS: fn["attention"](
            q, k, v, q_pos, k_pos, window, scale, softcap
        )
        out["attention_in_blocks"] = lambda attend, q, k, v, q_pos, k_pos, window, scale, softcap, taps, **_: attend(
            q, k, v, q_pos, k_pos, window, scale, softcap, taps
        )
    if "gelu_tanh" in names:
        out["ACTIVATION_FUNCTIONS"] = {**G.ACTIVATION_FUNCTIONS, "gelu_pytorch_tanh": fn["gelu_tanh"]}
    if "mlp" in names:
        learner_mlp = shaped("mlp", module.mlp, lambda x, w: x)
        out["mlp"] = lambda x, w, activation=None, taps=NO_TAPS: taps("mlp.out", learner_mlp(x, w))
    if "decoder_layer" in names:
        learner_layer = shaped("decoder_layer", module.decoder_layer, lambda x, *rest: x)
        out["decoder_layer"] = lambda x, w, positions, cfg, layer, taps=NO_TAPS, kv_cache=None: taps(
            "output", learner_layer(taps("input", x), w, positions, cfg, layer)
        )
    return out


@contextlib.contextmanager
def substituted(replacements: dict):
    """model/gemma2.py's names replaced for the duration (the forward looks them up when it runs)."""
    saved = {name: getattr(G, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(G, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(G, name, value)


# -- checking -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One function (or "all together"): its status and, for a failure, where and what."""

    name: str
    status: str  # "ok", "FAIL", "error", "not written yet"
    comparison: CaseComparison | None = None
    diagnosis: Diagnosis | None = None
    error: str | None = None
    named: list[str] = field(default_factory=list)  # the catalogued mistakes its activations match

    @property
    def first_divergence(self) -> str | None:
        first = self.comparison.first_divergence if self.comparison else None
        return first.name if first else None


def case(name: str, ids, activations: dict) -> Case:
    """An in-memory golden case (diagnose reads activations, token ids and the path it prints)."""
    return Case(Path(name), {"input": {"token_ids": np.asarray(ids).tolist()}}, activations)


def check(model, module, names, ids, reference: dict, profile, path: Path, label: str | None = None) -> Result:
    """The forward with the learner's `names` substituted, compared tap by tap with `reference`; diagnosed if
    it fails."""
    label = label or names[0]
    try:
        with substituted(adapters(module, names)):
            acts = run_case(model, ids)
    except NotImplementedError as e:
        return Result(label, "not written yet", error=where(e, path).strip(" ()") or None)
    except WrongShape as e:
        return Result(label, "error", error=str(e))
    except Exception as e:  # noqa: BLE001  (the learner's code, whatever it raises)
        return Result(label, "error", error=f"raised {type(e).__name__}: {e}{where(e, path)}")
    ref = {k: v for k, v in reference.items() if k in acts}
    comparison = compare_activations(ref, acts, profile)
    if comparison.passed:
        return Result(label, "ok", comparison)
    diag = diagnose(model, case("reference", ids, ref), case(str(path), ids, acts), profile, combine=False)
    named = [r.variant.name for r in diag.named if r.verdict == "matches"]
    return Result(label, "FAIL", comparison, diag, named=named)


def check_file(path, only=None, model=None, log=None) -> list[Result]:
    """Each written function of the learner's file on its own, then all of them together."""
    path = Path(path)
    module = load_solution(path)
    unknown = [n for n in (only or []) if n not in NAMES]
    if unknown:
        raise ExerciseError(f"--only {', '.join(unknown)}: not an exercise; the functions are {', '.join(NAMES)}")
    model = model or load_model("tiny", keep_converted=True)  # plain float32 arrays: a learner writes w.T
    ids = np.array(load_tokenizer("tiny").encode(TEXT))
    reference = run_case(model, ids)
    profile = get_profile("fp32")
    results = []
    for name in only or NAMES:
        if log:
            log(f"checking {name}")
        results.append(check(model, module, [name], ids, reference, profile, path))
    written = [r.name for r in results if r.status != "not written yet"]
    if len(written) > 1:
        results.append(check(model, module, written, ids, reference, profile, path, label="all together"))
    return results


def exit_code(results: list[Result]) -> int:
    """0: every written function (and all together) passes, and at least one is written; 1 otherwise."""
    written = [r for r in results if r.status != "not written yet"]
    return 0 if written and all(r.status == "ok" for r in written) else 1


def format_results(results: list[Result], path, tokens: int) -> str:
    lines = [
        f"{Path(path).name}: each function run inside the reference forward of tiny ({tokens} tokens, past "
        f"its 32-token window), every tap compared with the reference's (fp32 profile)"
    ]
    for r in results:
        lines.append(
            f"  {r.name:15} {r.status}"
            + (f" ({r.error})" if r.status == "not written yet" and r.error and r.name not in r.error else "")
        )
        if r.status == "error":
            lines.append(f"      {r.error}")
        if r.status == "FAIL":
            lines += explain_failure(r)
    written = [r for r in results if r.status != "not written yet" and r.name != "all together"]
    ok = sum(r.status == "ok" for r in written)
    todo = sum(r.status == "not written yet" for r in results)
    if not written:
        lines.append("nothing to check yet: write a function of the template and run this again")
    else:
        lines.append(f"{ok} of {len(written)} written functions pass" + (f"; {todo} to write" if todo else ""))
    return "\n".join(lines)


def explain_failure(r: Result) -> list[str]:
    """Where the first difference is, and which known mistake the activations match (or that none does)."""
    first = r.comparison.first_divergence
    size = f"relative L2 error {first.rel_l2:.2g}" if first.rel_l2 is not None else f"status {first.status}"
    lines = [f"      first difference at {first.name} ({size})"]
    for name in r.named:
        said = hint(name)
        if said:
            lines.append(f"      looks like the known mistake {name}: {said[0]}; see walkthrough/{said[1]}")
        else:
            what = next(x.variant.what for x in r.diagnosis.named if x.variant.name == name)
            lines.append(f"      looks like the known mistake {name}: {what}")
    if not r.named:
        chapter = CHAPTER.get(r.name)
        lines.append(
            "      no known Gemma 2 mistake matches: the error is your own; look at what your code "
            f"computes for {first.name}" + (f" (walkthrough/{chapter})" if chapter else "")
        )
    return lines


def main_check(path, only=None, log=None) -> int:
    """`gemma2-ref exercise check`: print the report, return the exit code."""
    results = check_file(path, only, log=log)
    print(format_results(results, path, len(load_tokenizer("tiny").encode(TEXT))))
    sys.stdout.flush()
    return exit_code(results)
