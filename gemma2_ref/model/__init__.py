"""The model a learner reads: Gemma 2 as the paper's equations, in NumPy (the bottom layer).

    gemma2.py      the forward: embed, rms_norm, rope, attention, mlp, decoder_layer, forward
    config.py      Gemma2Config, the presets, config.json
    bfloat16.py    bfloat16 rounding in NumPy
    fast.py        the same values with less memory (weight-first linear, blocked attention)
    taps.py        the canonical names of every intermediate, and the recorder
    inputs.py      token ids and positions, checked
    tokenizer.py   Gemma's SentencePiece tokenizer, BOS policy, chat template
    generate.py    the KV cache, sampling, generate
    distill.py     the report's distillation loss

Nothing here imports from storage/, verify/, adapters/ or cli/. `gemma2_ref.model` itself offers the forward's
functions (`from gemma2_ref.model import rms_norm`), as the flat module of that name did.
"""

from .gemma2 import *  # noqa: F401,F403  (the stable `gemma2_ref.model.<function>` names)
