"""Name maps: another backend's tensor names -> the canonical tap names (taps.py).

    apply_name_map({"blk.0.attn_norm": a, ...}, {"blk.{i}.attn_norm": "layers.{i}.pre_attn_norm"})

`gemma2-ref compare --name-map` and `golden.write_case(name_map=...)` use it; NumPy-free, standard library only.
"""

from __future__ import annotations

import re


class NameMapError(ValueError):
    """A name map rule that cannot be applied. The message names the rule or the clashing tensors."""


def apply_name_map(activations: dict, name_map=None) -> dict:
    """Rename a backend's tensors to canonical taps.

    `name_map`: a dict {their name or pattern: canonical name or pattern}, or a list of "from=to" strings.
    `{i}` in a pattern stands for a layer number: {"blk.{i}.attn_norm": "layers.{i}.pre_attn_norm"}.
    A pattern ending in "*" maps a prefix: {"model.*": "*"} strips "model.". Unmatched names are kept."""
    if not name_map:
        return dict(activations)
    if not isinstance(name_map, dict):
        pairs = {}
        for rule in name_map:
            if "=" not in rule:
                raise NameMapError(f"name map rule {rule!r} must look like THEIR_NAME=CANONICAL_NAME")
            src, dst = rule.split("=", 1)
            pairs[src] = dst
        name_map = pairs
    rules = []
    for src, dst in name_map.items():
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)")
        if pattern.endswith(r"\*"):
            pattern = pattern[:-2] + "(?P<rest>.*)"
        rules.append((re.compile(pattern + "$"), dst))
    out = {}
    for name, value in activations.items():
        new = name
        for rx, dst in rules:
            m = rx.match(name)
            if m:
                new = dst.replace("{i}", m.groupdict().get("i") or "")
                if dst.endswith("*"):
                    new = new[:-1] + (m.groupdict().get("rest") or "")
                break
        if new in out:
            raise NameMapError(f"name map sends two tensors to {new!r} (one of them is {name!r})")
        out[new] = value
    return out
