"""Adapters: run another Gemma 2 implementation and write its activations as a golden case under the
canonical tap names (README.md's tap table), so `gemma2-ref compare` can check it against ours.

    gemma2_ref.adapters.transformers   Hugging Face transformers' Gemma2ForCausalLM (forward hooks)

Each adapter imports its framework lazily: importing gemma2_ref never imports torch.
For a backend without an adapter, write the case yourself with `gemma2_ref.golden.write_case` (NumPy only).
"""
