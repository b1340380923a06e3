"""What several test modules share: the transformers reference (hf_reference), the backend requirement
(backends), the llama.cpp cases (llamacpp_cases), numeric helpers (numerics), scripts loaded as modules
(scripts)."""
