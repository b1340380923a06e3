"""Files, memory and checkpoints: safetensors weights read memory-mapped (weights.py), checkpoints written in
the Hugging Face layout (checkpoints.py), and `load_model` with its memory policy (loader.py). Imports the
model layer only.
"""
