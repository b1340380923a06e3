"""Run an exported ExecuTorch program (.pte) token by token: the part of the ExecuTorch adapter (executorch.py)
that runs in the venv holding the engine, as a script, never imported by gemma2_ref:

    PY -I executorch_run.py versions                      -> JSON: executorch, optimum-executorch, transformers, torch
    PY -I executorch_run.py metadata PTE                  -> JSON: the program's constant methods (sliding_window, ...)
    PY -I executorch_run.py logits PTE IDS.npy OUT.npy    -> OUT.npy (B, S, V) float32

`-I` keeps this file's folder off sys.path (it holds gemma2_ref's executorch.py, which would shadow the engine).
The exported `forward(input_ids (1, 1), cache_position (1,))` takes one token per call (static shapes); each
row of IDS is fed position by position into a freshly loaded method, so it starts from the program's initial,
empty KV cache and every position after the first reads its keys and values from that cache.
"""

import json
import sys


def versions() -> dict:
    import importlib.metadata as m

    names = ("executorch", "optimum-executorch", "transformers", "torch")
    return {n: m.version(n) for n in names if _installed(n)}


def _installed(name: str) -> bool:
    import importlib.metadata as m

    try:
        m.version(name)
    except m.PackageNotFoundError:
        return False
    return True


def metadata(pte: str) -> dict:
    """The program's constant methods (optimum-executorch writes the config there: get_max_seq_len, ...)."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(pte)
    out = {}
    for name in sorted(program.method_names - {"forward"}):
        values = [v.item() if hasattr(v, "item") else v for v in program.load_method(name).execute([])]
        out[name] = values[0] if len(values) == 1 else values  # get_eos_id: a list
    return out


def logits(pte: str, ids_path: str, out_path: str) -> None:
    """The logits of every position of every row of ids (B, S), one forward per token through the cache."""
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    ids = np.load(ids_path)
    program = Runtime.get().load_program(pte)
    rows = []
    for row in ids:
        forward = program.load_method("forward")  # a new method: the initial (empty) KV cache
        steps = []
        for position, token in enumerate(row):
            token_t = torch.tensor([[int(token)]], dtype=torch.long)  # (1, 1)
            position_t = torch.tensor([position], dtype=torch.long)  # (1,)
            (out,) = forward.execute([token_t, position_t])  # (1, 1, V)
            steps.append(out.to(torch.float32).numpy().reshape(-1))
        rows.append(np.stack(steps))  # (S, V)
    np.save(out_path, np.stack(rows))  # (B, S, V)


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "versions":
        print(json.dumps(versions()))
    elif command == "metadata":
        print(json.dumps(metadata(*args)))
    elif command == "logits":
        logits(*args)
    else:
        print(f"executorch_run.py: unknown command {command!r} (versions, metadata, logits)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
