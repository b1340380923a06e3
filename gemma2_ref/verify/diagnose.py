"""Diagnosis: which known Gemma 2 mistake does a failing candidate look like?

The reference model is re-run once per known mistake (mistakes.py: each a config, weight or input
transform of the correct model), with the taps the candidate holds. Each variant is compared with the
candidate exactly as the reference was. A variant is named when it explains the candidate far better than
the correct model does:

    matches          the candidate passes the profile against the variant: indistinguishable from it, and at
                     the reference's first diverging tap it is >= 2x closer (rel L2) to the variant than to the
                     reference (a variant that barely moves that tap only tips a borderline tolerance over)
    explains the first divergence
                     at the reference's first diverging tap the candidate is >= 10x closer (rel L2) to the
                     variant than to the reference, and the variant's own first divergence comes later
                     (the candidate has this mistake and something else)
    ruled out        it explains the first divergence, but another variant matches and a later tap (the
                     variant's own first divergence) contradicts it: listed with that tap, not named

A mistake of the arithmetic (mistakes.STEP_MISTAKES: RMSNorm's steps in bfloat16) exists only in a low-precision
run, so against a bfloat16 / float16 candidate its variant is re-run with the candidate's rounding after every
operation (the `measured` profile's emulation, forward(round_to=...)); the other variants run in the reference's
dtype, as the reference did. Those RMSNorm mistakes usually stay inside the measured profile, so for such a
candidate a precision stage (rounding.py) also asks which RMSNorm arithmetic reproduces its norm outputs bit for
bit from its own inputs to them: a mistake it reproduces is named ("reproduces its rounding"), even when the
candidate passes the profile.

Nothing about how the candidate was produced is used: only its activations and token ids.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..model.generate import decode_taps
from ..model.taps import tap_names
from . import mistakes as M
from .compare import CaseComparison, Profile, align_positions, comparable, compare_activations, slice_tokens, wrap
from .golden import Case, slice_rows
from .mistakes import FP16_OVERFLOW, Mistake, find, inject, known_mistakes
from .rounding import NORM_ROUNDINGS, RoundingEvidence, format_rounding, norm_cases, rmsnorm_rounding

EXPLAIN_RATIO = 10.0
MATCH_RATIO = 2.0


@dataclass
class VariantResult:
    variant: Mistake  # a variant of the reference model: the model with this one known mistake
    comparison: CaseComparison
    ratio: float  # rel L2 (candidate vs reference) / rel L2 (candidate vs variant) at the first divergence
    verdict: str  # "matches", "explains the first divergence", "overflows float16", "reproduces its rounding", ""
    remains: str | None = None  # for "explains": the looser profile the candidate passes against the variant
    ruled_out_at: str | None = None  # explained the first divergence, but this later tap contradicts it

    def to_dict(self) -> dict:
        first = self.comparison.first_divergence
        if self.verdict == "reproduces its rounding":  # not a re-run variant: the evidence is Diagnosis.rounding
            first = None
        return {
            "variant": self.variant.name,
            "what": self.variant.what,
            "refs": self.variant.refs,
            "verdict": self.verdict,
            "ratio_at_first_divergence": _finite(self.ratio),
            "passes_against_variant": None if self.verdict == "reproduces its rounding" else self.comparison.passed,
            "variant_first_divergence": first.name if first else None,
            "remains": self.remains,
            "ruled_out_at": self.ruled_out_at,
        }


@dataclass
class Diagnosis:
    base: CaseComparison
    results: list[VariantResult] = field(default_factory=list)
    combined: list[VariantResult] = field(default_factory=list)
    passes_profile: str | None = None  # the tightest looser profile the candidate passes, if any
    rounding: RoundingEvidence | None = None  # the precision stage (a bfloat16 / float16 candidate only)

    @property
    def named(self) -> list[VariantResult]:
        hits = [r for r in self.results + self.combined if r.verdict]
        return sorted(hits, key=lambda r: (r.verdict != "matches", -min(r.ratio, 1e30)))

    def to_dict(self) -> dict:
        first = self.base.first_divergence
        return {
            "first_divergence": first.name if first else None,
            "passed": self.base.passed,
            "passes_profile": self.passes_profile,
            "rounding": self.rounding.to_dict() if self.rounding else None,
            "named": [r.to_dict() for r in self.named],
            "ruled_out": [{"variant": r.variant.name, "at": r.ruled_out_at} for r in self.results if r.ruled_out_at],
            "variants": [r.to_dict() for r in self.results + self.combined],
        }


def _finite(x: float):
    return x if math.isfinite(x) else None


def _rel_l2_at(comparison: CaseComparison, name: str) -> float:
    t = next((t for t in comparison.taps if t.name == name), None)
    if t is None or t.status in ("shape", "missing") or t.rel_l2 is None:
        return math.inf
    return t.rel_l2


def decode_of(case: Case) -> dict | None:
    """A decode case's {"prefill": P, "steps": N} (manifest extra.decode), or None."""
    return (case.manifest.get("extra") or {}).get("decode")


def emulated_dtype(candidate: Case | None = None, profile: Profile | None = None) -> str | None:
    """The low-precision dtype a candidate computed in ("bfloat16", "float16"), from its manifest or else the
    profile it is judged by (measured-bfloat16, bf16, ...); None for a float32 one."""
    if candidate is not None and candidate.compute_dtype in ("bfloat16", "float16"):
        return candidate.compute_dtype
    name = profile.name if profile is not None else ""
    return {"bf16": "bfloat16", "fp16": "float16", "measured-bfloat16": "bfloat16", "measured-float16": "float16"}.get(
        name
    )


def run_variant(
    model,
    mistake: Mistake,
    ids,
    taps,
    positions,
    decode: dict | None,
    candidate: Case | None = None,
    round_to: str | None = None,
):
    """The mistaken model's taps on a case's input and the positions they hold (None: all), or (None, None)
    where the mistake cannot act: a decode-loop mistake runs the case's decode loop (a prefill, then one token
    per forward through the KV cache), and needs a decode case. A prefill keeps only the positions the
    `candidate` stores (variant_trace). `round_to`: a step mistake's low-precision run (module docstring)."""
    if mistake.decode:
        if decode is None:
            return None, None
        return decode_taps(inject(model, mistake), ids, decode["prefill"], taps, decode.get("chunks")), None
    kw = {"round_to": round_to} if mistake.step and round_to else {}
    if candidate is None or candidate.positions is None or candidate.token_ids is None:
        return inject(model, mistake).forward(ids, taps=taps, positions=positions, **kw), None
    seq = candidate.token_ids.shape[-1]
    return variant_trace(inject(model, mistake), ids, taps, positions, candidate, seq, **kw)


def _position(tap, order: list[str]) -> int:
    """Where a first divergence sits in execution order (no divergence: after everything)."""
    return len(order) if tap is None else order.index(tap.name) if tap.name in order else len(order) - 1


FLOAT16_MAX = 65504.0


def fp16_overflow(reference: Case, candidate: Case, base: CaseComparison) -> VariantResult | None:
    """Named when the candidate computed in float16 or holds non-finite values, and the reference itself goes
    beyond float16's range at or before the first divergence: no implementation can be right there in fp16."""
    first = base.first_divergence
    nonfinite = any(not np.isfinite(a).all() for a in candidate.activations.values())
    if first is None or not (nonfinite or candidate.compute_dtype == "float16"):
        return None
    order = reference.tap_names
    for name in order[: order.index(first.name) + 1] if first.name in order else order:
        absmax = float(np.abs(reference.activations[name]).max())
        if absmax > FLOAT16_MAX:
            layer = f" (layer {name.split('.')[1]})" if name.startswith("layers.") else ""
            what = (
                f"{FP16_OVERFLOW.what}: the reference reaches {absmax:.4g} at {name}{layer}, first of its taps "
                f"past 65504: run in bfloat16 or float32"
            )
            return VariantResult(dataclasses.replace(FP16_OVERFLOW, what=what), base, math.inf, "overflows float16")
    return None


def variant_trace(model, ids, wanted: list[str], positions, candidate: Case, seq: int, **kw):
    """The taps of `model` (a variant) that the candidate can be compared with, and the positions they hold.
    When the candidate stores only some positions and the variant's input keeps the reference's length, only
    those rows are kept as each tap is produced (the forward's sink) and the output head runs only there: a
    variant of a long case costs what the candidate stores, not the whole forward's taps."""
    rows = candidate.positions if np.shape(ids)[-1] == seq else None
    if rows is None:
        return model.forward(ids, taps=wanted, positions=positions, **kw), None
    kept = {}

    def keep(name, value):
        kept[name] = np.array(slice_rows(name, value, rows, candidate.batched, seq), copy=True)

    kept["logits"] = model.forward(ids, taps=wanted, positions=positions, sink=keep, logits_at=rows, **kw)["logits"]
    return kept, rows


def diagnose(model, reference: Case, candidate: Case, profile: Profile, log=None, combine: bool = True) -> Diagnosis:
    """Re-run `model` (the reference's checkpoint) with each known mistake; name the ones the candidate
    resembles (module docstring). `log(str)` receives progress lines."""
    from .compare import PROFILES, compare_cases

    base = compare_cases(reference, candidate, profile)
    diag = Diagnosis(base)
    dtype = emulated_dtype(candidate, profile)
    if dtype is not None:
        diag.rounding = rmsnorm_rounding(model, candidate.activations, dtype)
    if base.passed:
        add_rounding_finding(diag, model.config)
        return diag
    looser = [p for p in ("fp16", "bf16", "q8") if PROFILES[p].rel_l2 > profile.rel_l2]
    diag.passes_profile = next((p for p in looser if compare_cases(reference, candidate, PROFILES[p]).passed), None)
    ref_ids = reference.token_ids
    cand_acts = candidate.activations
    names = set(tap_names(model.config))
    wanted = [n for n in candidate.tap_names if n in names] or ["logits"]
    order = tap_names(model.config)
    base_first = base.first_divergence
    base_err = _rel_l2_at(base, base_first.name) if base_first else math.inf

    def run(variant: Mistake) -> VariantResult | None:
        ids = variant.apply_ids(ref_ids)
        if ids is None:
            return None
        positions = variant.apply_positions(reference.attention_mask)
        if positions is False:
            return None
        trace, rows = run_variant(
            model, variant, ids, wanted, positions, decode_of(reference), candidate, emulated_dtype(candidate, profile)
        )
        if trace is None:
            return None
        trace, cand_view, _ = align_positions(trace, rows, cand_acts, candidate.positions, candidate.batched)
        trace, cand_view = (
            slice_tokens(trace, reference.attention_mask),
            slice_tokens(cand_view, reference.attention_mask),
        )
        cmp = compare_activations(
            trace, cand_view, profile, reference=f"variant {variant.name}", candidate=str(candidate.path)
        )
        if base_first is not None:
            var_err = _rel_l2_at(cmp, base_first.name)
            ratio = (base_err / var_err if var_err > 0 else math.inf) if math.isfinite(var_err) else 0.0
            if not math.isfinite(base_err) and math.isfinite(var_err):
                ratio = math.inf  # the variant fixes a shape mismatch (an input mistake)
        else:
            ratio = 1.0
        later = _position(cmp.first_divergence, order) > _position(base_first, order)
        verdict = ""
        if cmp.passed and (base_first is None or ratio >= MATCH_RATIO):
            verdict = "matches"
        elif ratio >= EXPLAIN_RATIO and later:
            verdict = "explains the first divergence"
        result = VariantResult(variant, cmp, ratio, verdict)
        if verdict == "explains the first divergence":  # what is left once this mistake is accounted for
            result.remains = next(
                (p for p in looser if compare_activations(trace, cand_view, PROFILES[p]).passed), None
            )
        return result

    overflow = fp16_overflow(reference, candidate, base)
    if overflow is not None:
        diag.results.append(overflow)
    for variant in known_mistakes(model.config):
        if log:
            log(f"  variant {variant.name}")
        result = run(variant)
        if result is not None:
            diag.results.append(result)
    rule_out_contradicted(diag.results)
    partial = [r for r in diag.results if r.verdict == "explains the first divergence"]
    if combine and partial and not any(r.verdict == "matches" for r in diag.results):
        # Two mistakes at once: the best partial explanation plus each other single mistake.
        best = max(partial, key=lambda r: r.ratio)
        for other in diag.results:
            if other is best or best.variant.changes() & other.variant.changes():
                continue
            v = M.combine(best.variant, other.variant)
            if log:
                log(f"  variant {v.name}")
            result = run(v)
            if result is not None and result.verdict == "matches":
                diag.combined.append(result)
    add_rounding_finding(diag, model.config)
    return diag


def add_rounding_finding(diag: Diagnosis, cfg) -> None:
    """The precision stage's mistake, named unless a re-run variant already names it."""
    name = diag.rounding.named if diag.rounding else None
    if name and name not in {r.variant.name for r in diag.named}:
        diag.results.append(VariantResult(find(cfg, name), diag.base, math.inf, "reproduces its rounding"))


def rule_out_contradicted(results: list[VariantResult]) -> None:
    """When a variant matches, a partial explanation is contradicted by a later tap, its own first divergence
    (there the candidate leaves it, while the match holds everywhere): no longer named, listed as ruled out."""
    if not any(r.verdict == "matches" for r in results):
        return
    for r in results:
        if r.verdict == "explains the first divergence":
            first = r.comparison.first_divergence
            r.verdict, r.ruled_out_at, r.remains = "", first.name if first else "-", None


def format_diagnosis(diag: Diagnosis) -> str:
    rounding = [wrap("  " + format_rounding(diag.rounding), 6)] if diag.rounding else []
    if diag.base.passed:
        if not diag.named:
            return "\n".join(["diagnosis: the candidate passes; nothing to diagnose"] + rounding)
        lines = [f"diagnosis: the candidate passes the {diag.base.profile.name} profile, but:"]
        lines += [format_rounding_finding(r) for r in diag.named] + rounding
        return "\n".join(lines)
    first = diag.base.first_divergence
    lines = [
        f"diagnosis (each known mistake re-run from the reference model; first divergence "
        f"{first.name if first else 'none'}):"
    ]
    named = diag.named
    if not named:
        lines.append("  no known Gemma 2 mistake explains the candidate better than the correct model.")
        if diag.passes_profile:
            lines.append(
                f"  The candidate passes the looser {diag.passes_profile} profile: its errors look like "
                f"{diag.passes_profile} precision, not a mistake. Compare with --profile "
                f"{diag.passes_profile} if that is the precision it computes in."
            )
        else:
            lines.append(
                "  It fails every looser profile too: an unknown mistake, or a combination of more "
                "than two. Look at the first diverging tap."
            )
    for r in named:
        if r.verdict == "overflows float16":
            lines.append(wrap(f"  OVERFLOWS FLOAT16: {r.variant.name}: {r.variant.what} [{r.variant.refs}]", 6))
            continue
        if r.verdict == "reproduces its rounding":
            lines.append(format_rounding_finding(r))
            continue
        first_v = r.comparison.first_divergence
        evidence = (
            f"candidate vs this variant passes the {r.comparison.profile.name} profile"
            if r.comparison.passed
            else f"vs this variant the first divergence moves to {first_v.name if first_v else 'none'}"
        )
        if r.verdict == "explains the first divergence":
            evidence += (
                f", and what remains passes the {r.remains} profile: precision, not another mistake"
                if r.remains
                else ", and what remains fails every looser profile: another mistake (or more) is left"
            )
        at = first.name if first else "-"
        if first is not None and first.status == "shape":
            closer = f"only this variant reproduces the candidate's shape at {at}"
        elif not math.isfinite(r.ratio):
            closer = f"at {at} the candidate equals this variant exactly"
        else:
            closer = f"at {at} the candidate is {r.ratio:.3g}x closer to this variant than to the reference (rel L2)"
        lines.append(wrap(f"  {r.verdict.upper()}: {r.variant.name}: {r.variant.what} [{r.variant.refs}]", 6))
        lines.append(wrap(f"      evidence: {closer}; {evidence}", 16))
    lines += rounding
    ruled = [r for r in diag.results if r.ruled_out_at]
    if ruled:
        lines.append(
            wrap(
                "  ruled out (they explain the first divergence, but a later tap contradicts them while "
                "the match holds there): " + ", ".join(f"{r.variant.name} at {r.ruled_out_at}" for r in ruled),
                6,
            )
        )
    others = [r for r in diag.results if not r.verdict and not r.ruled_out_at]
    if others:
        lines.append(
            wrap(
                "  not matching (at the first divergence, how many times closer the candidate is to the "
                "variant than to the reference; shape mismatch = 0): "
                + ", ".join(
                    f"{r.variant.name} {('inf' if not math.isfinite(r.ratio) else f'{r.ratio:.2g}')}" for r in others
                ),
                6,
            )
        )
    return "\n".join(lines)


def format_rounding_finding(r: VariantResult) -> str:
    return wrap(
        f"  REPRODUCES ITS ROUNDING: {r.variant.name}: {r.variant.what} [{r.variant.refs}]; evidence: the "
        f"RMSNorm rounding below",
        6,
    )


def load_reference_model(reference: Case, model_path=None, log=None, verify: bool = True):
    """The checkpoint the reference golden was made from: `model_path` if given, else the one its manifest
    names (a bundled model by name, a directory by path). Its files' sha256 must match the manifest."""
    from ..storage.loader import load_model
    from .golden import GoldenError

    info = reference.manifest.get("model") or {}
    source = model_path or (info.get("name") if info.get("bundled") else info.get("path"))
    if not source:
        raise GoldenError(f"{reference.path}: the manifest names no model; pass --model CHECKPOINT_DIR")
    dtype = reference.compute_dtype if reference.compute_dtype in ("float32", "float64") else "float32"
    try:
        model = load_model(source, dtype=dtype)
    except FileNotFoundError:
        raise GoldenError(
            f"{reference.path} was made from {source}, which is not here; pass --model "
            f"CHECKPOINT_DIR (its files must have the sha256s the manifest records)"
        ) from None
    if verify:
        verify_reference_model(model, reference, log)
    return model


def verify_reference_model(model, reference: Case, log=None) -> None:
    """Refuse a model whose weight files are not the ones the golden records (sha256 of each file)."""
    from .golden import GoldenError
    from .hashes import weights_sha256

    recorded = (reference.manifest.get("model") or {}).get("weights") or {}
    found = weights_sha256(model.weights.files, progress=log is not None)
    if recorded and found != recorded:
        differ = sorted(set(found) ^ set(recorded) | {k for k in found if recorded.get(k) != found[k]})
        raise GoldenError(
            f"{model.path}: weight files differ from the ones {reference.path} was made from "
            f"({', '.join(differ)}): the diagnosis would re-run a different model. Regenerate "
            f"the golden, or pass --model with the original checkpoint"
        )


def blind_spots(model, reference: Case, profile: Profile) -> list[str]:
    """The known mistakes this case cannot show under this profile: each mistaken model's taps pass against
    the reference (a window mistake on a prompt shorter than the window; a small one under a loose profile)."""
    wanted = [n for n in reference.tap_names if n in set(tap_names(model.config))] or ["logits"]
    blind = []
    dtype = emulated_dtype(profile=profile)
    bit_level = dtype is not None and bool(norm_cases(model, reference.activations))
    for mistake in known_mistakes(model.config):
        if mistake.normalizer == "float64":
            continue  # float32(sqrt(D)) vs float64: a rounding, never named against a float32 reference
        if bit_level and mistake.step in NORM_ROUNDINGS:
            continue  # the precision stage sees it in the candidate's own norm outputs (rounding.py)
        ids = mistake.apply_ids(reference.token_ids)
        if ids is None or np.shape(ids) != np.shape(reference.token_ids):
            continue  # another input: the token ids themselves differ, which compare always reports
        positions = mistake.apply_positions(reference.attention_mask)
        if positions is False:
            continue
        trace, _ = run_variant(
            model, mistake, ids, wanted, positions, decode_of(reference), round_to=emulated_dtype(profile=profile)
        )
        if trace is None:
            continue
        ref_view, trace, _ = comparable(reference, trace)
        if compare_activations(ref_view, trace, profile).passed:
            blind.append(mistake.name)
    return blind


def compare_and_diagnose(
    reference, candidate, profile, diagnose_failures: bool | None = None, model_path=None, log=None
) -> tuple[list[CaseComparison], dict[str, Diagnosis], str | None]:
    """Compare two goldens (cases or suites), then diagnose the failing cases: always (True), never (False),
    or (None, the default) when the reference's model is at hand and small enough to re-run ~20 times. With
    the model at hand and small, a passing case also says which known mistakes it could not have seen
    (`CaseComparison.blind_spots`): a PASS is only as strong as the case and the profile.

    Returns the comparisons, {reference case path: Diagnosis}, and why no diagnosis ran (or None)."""
    from .compare import compare_goldens
    from .golden import Suite, case_pairs

    pairs, suites = case_pairs(reference, candidate), isinstance(reference, Suite)
    results = compare_goldens(reference, candidate, profile, log)
    failed = [r for r in results if not r.passed and not r.not_checked]
    if diagnose_failures is False:
        return results, {}, None
    refs = {str(r.path): r for r, _, _ in pairs}
    cands = {str(c.path): c for _, c, _ in pairs if c is not None}
    first_ref = next(iter(refs.values()))
    try:
        model = load_reference_model(first_ref, model_path, verify=False)
        if diagnose_failures or not model.is_large:  # hashing a large checkpoint takes a while: only if used
            verify_reference_model(model, first_ref, log=log if model.is_large else None)
    except (ValueError, FileNotFoundError) as e:
        if diagnose_failures:
            raise
        return results, {}, f"no diagnosis: {e}" if failed else None
    if model.is_large and not diagnose_failures:
        return (
            results,
            {},
            (
                f"diagnosis skipped for a large model: it re-runs the model about "
                f"{len(known_mistakes(model.config))} times; ask for it explicitly"
            )
            if failed
            else None,
        )
    if not model.is_large and (diagnose_failures or not suites):  # a suite's passing cases: only if asked
        for r in results:
            if r.passed and r.reference in refs:
                r.blind_spots = blind_spots(model, refs[r.reference], r.profile)
    diagnoses = {}
    for r in results:  # a passing low-precision case: the precision stage alone (cheap: a few norms re-computed)
        cand = cands.get(r.candidate)
        asked = not model.is_large and (diagnose_failures or not suites)  # as for the blind spots
        if asked and r.passed and r.reference in refs and cand is not None and emulated_dtype(cand, r.profile):
            diag = diagnose(model, refs[r.reference], cand, r.profile)
            if diag.named:
                diagnoses[r.reference] = diag
    for r in failed:
        if r.reference in refs and r.candidate in cands:
            if log is not None:
                log(
                    f"case {Path(r.reference).name} fails: diagnosing (re-running {len(known_mistakes(model.config))} "
                    f"known mistakes)"
                )
            diagnoses[r.reference] = diagnose(
                model, refs[r.reference], cands[r.candidate], r.profile, log=log if model.is_large else None
            )
    return results, diagnoses, None
