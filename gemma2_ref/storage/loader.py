"""Loading a model: a checkpoint directory (or a bundled model's name) -> config + memory-mapped weights.

    model = load_model("tiny")                      # or a Hugging Face checkpoint directory
    model.forward(ids, taps="all")                  # model.py's forward with this model's config and weights

How much of the converted model to keep between forwards is a memory decision made here, once:
`keep_converted=False` streams every layer from the memory-mapped files on every forward (least memory),
`True` keeps them all, `"auto"` spends three quarters of the RAM available now on keeping layers: their stored (bf16)
bytes in memory first, then converted ones; a checkpoint whose layers do not all fit is streamed (keep_budget).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import bundled_names, local_or_bundled
from ..model.config import PRESETS, Gemma2Config, load_config
from ..model.gemma2 import LayerWeights, forward
from ..model.generate import KVCache
from ..model.taps import NonFiniteError, Taps, first_non_finite
from .weights import EMBEDDING, FINAL_NORM, HF_LAYER_NAMES, Weights, index_checkpoint

COMPUTE_DTYPES = ("float32", "float64")
AUTO_KEEP_FRACTION = 0.75  # "auto" keeps layers (stored bytes, then converted) within this fraction of the RAM


class Model:
    """A loaded checkpoint: its config, its weights (anything with embedding(), layer(i), final_norm()), the
    compute dtype, and the embedding normalizer when it is not sqrt(D) in the compute dtype (a number:
    model.embed)."""

    def __init__(self, config: Gemma2Config, weights, dtype, path=None, normalizer=None):
        self.config, self.weights, self.dtype, self.path = config, weights, np.dtype(dtype), path
        self.normalizer = normalizer

    def forward(self, ids, taps=None, **kw) -> dict[str, np.ndarray]:
        """{"logits": (S, V) or (B, S, V), **taps}. `taps`: "all", "default", "residual", names or globs.

        Raises NonFiniteError if a recorded tap or the logits hold a NaN or Inf: a reference never hands
        one out. It names the first tap where one appears (re-running with every tap, for a small model).
        Not with `round_to`: that emulates a bfloat16 / float16 backend, which may overflow (measured.py)."""
        out = forward(self.weights, self.config, ids, taps, normalizer=self.normalizer, **kw)
        emulating = kw.get("round_to") or (taps.round_to if isinstance(taps, Taps) else None)
        bad = first_non_finite(out) if emulating is None else None
        if bad is not None:
            cache = kw.get("kv_cache")
            located = taps in ("all", "default")
            if not located and not self.is_large and (cache is None or cache.length == np.shape(ids)[-1]):
                # a prefill: the same values again, with every tap recorded, to see where they start
                rerun = forward(
                    self.weights, self.config, ids, "default", positions=kw.get("positions"), normalizer=self.normalizer
                )
                bad, located = first_non_finite(rerun) or bad, True
            raise self.non_finite_error(bad, located)
        return out

    def non_finite_error(self, bad, located: bool = True) -> NonFiniteError:
        """The error for taps.first_non_finite's finding `bad`; `located`: every tap up to it was looked at."""
        name, index, nan, inf, size = bad
        return NonFiniteError(
            f"{self.path or 'the model'}: the forward produced non-finite values, first at tap {name!r}"
            f"{'' if located else ' (of those recorded)'} index {index} ({nan} NaN and {inf} Inf of its "
            f"{size} values). A checkpoint's NaN or Inf weights are refused as they are converted, so the "
            f"activations overflowed {self.dtype} (or in-memory weights are not finite): check the weights' "
            f"scale and config.json's soft-caps"
        )

    def kv_cache(self, capacity: int | None = None) -> KVCache:
        """The KV cache this model decodes through (generate, decode_taps): global layers `capacity` slots."""
        return KVCache(self.config, capacity)

    def logits(self, ids) -> np.ndarray:
        """Logits after the final soft-cap: (S, V), or (B, S, V) for a batch."""
        return self.forward(ids, None)["logits"]

    @property
    def is_large(self) -> bool:
        """Worth a progress line per layer, and worth asking before re-running it many times."""
        return self.config.parameter_counts()["total"] > 50_000_000

    def close(self) -> None:
        self.weights.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = self.config
        return (
            f"Model({self.path or 'in memory'}: {c.num_hidden_layers} layers, D={c.hidden_size}, "
            f"H={c.num_attention_heads}/K={c.num_key_value_heads}, compute {self.dtype})"
        )


class ArrayWeights:
    """Plain in-memory arrays as a weights provider (the three methods `forward` calls): for a REPL, or for
    weights made in code. `from_tensors` takes checkpoint-named arrays, e.g. checkpoints.random_weights."""

    def __init__(self, embedding: np.ndarray, layers: list, final_norm: np.ndarray):
        self._embedding, self.layers, self._final_norm = embedding, layers, final_norm

    @classmethod
    def from_tensors(cls, cfg: Gemma2Config, tensors: dict, dtype=np.float32) -> ArrayWeights:
        def t(name):
            return np.asarray(tensors[name], dtype=dtype)

        layers = [
            LayerWeights(**{ours: t(f"model.layers.{i}.{hf}") for ours, hf in HF_LAYER_NAMES.items()})
            for i in range(cfg.num_hidden_layers)
        ]
        return cls(t(EMBEDDING), layers, t(FINAL_NORM))

    def embedding(self) -> np.ndarray:
        return self._embedding

    def layer(self, i: int) -> LayerWeights:
        return self.layers[i]

    def final_norm(self) -> np.ndarray:
        return self._final_norm

    def close(self) -> None:
        pass


def available_memory() -> int | None:
    """Bytes of memory this process may still take now, or None where that cannot be read: the system's
    MemAvailable, lowered by an address-space limit (`ulimit -v`, RLIMIT_AS: the limit less what the process
    has mapped) and by the memory limits of the cgroups the process is in (cgroup_headroom)."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        limits.append(int(info["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            limits.append(max(0, soft - mapped))
    except (ImportError, OSError, StopIteration, ValueError):
        pass
    headroom = cgroup_headroom()
    if headroom is not None:
        limits.append(headroom)
    return min(limits) if limits else None


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """The least (limit - usage) over the memory-limited cgroups this process is in, or None without one.

    cgroup v2 (`0::/path`): memory.max less memory.current of the process's group and each group above it;
    cgroup v1 (`N:memory:/path`, older Docker hosts): memory.limit_in_bytes less memory.usage_in_bytes.
    Usage counts the group's page cache: its inactive file pages, which the kernel reclaims first, are taken
    back out (as `docker stats` does). Inside a container the path is usually `/`: the container's own limit
    sits at the root of `root`."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    groups = []  # (controller directory, the process's group path in it, limit file, usage file)
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and controllers == "":
            groups.append((root, path, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            groups.append((root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    if not groups:
        groups = [
            (root, "/", "memory.max", "memory.current"),
            (root / "memory", "/", "memory.limit_in_bytes", "memory.usage_in_bytes"),
        ]
    headroom = []
    for base, path, limit_file, usage_file in groups:
        parts = [p for p in path.strip("/").split("/") if p]
        for depth in range(len(parts), -1, -1):  # the group itself, then each parent up to the root
            group = base.joinpath(*parts[:depth])
            try:
                text = (group / limit_file).read_text().strip()
                limit = None if text == "max" else int(text)
                usage = int((group / usage_file).read_text()) - inactive_file(group)
            except (OSError, ValueError):
                continue
            if limit is not None and limit < 1 << 60:  # v1 writes "no limit" as ~2^63
                headroom.append(max(0, limit - usage))
    return min(headroom) if headroom else None


def inactive_file(group: Path) -> int:
    """Bytes of inactive file cache a cgroup's usage includes (memory.stat: v1 total_inactive_file, v2
    inactive_file), 0 where not given."""
    try:
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return 0
    return int(stat.get("total_inactive_file", stat.get("inactive_file", 0)))


def keep_budget(
    cfg: Gemma2Config, dtype, keep_converted, stored_layer_bytes: int | None = None
) -> tuple[int | None, int]:
    """(bytes of converted layers to keep, bytes of stored layer bytes to keep resident): (0, 0) streams,
    (None, 0) keeps every layer converted, "auto" splits what the RAM available now allows.

    "auto" spends AUTO_KEEP_FRACTION of the available memory, less the converted embedding (always kept: it
    is the output head), on layers: first every layer's stored bytes as far as they fit (half the bytes of
    float32 for bf16, and nothing read from disk again), then what is left on keeping layers 0, 1, ...
    converted, each in place of its stored bytes (a 2B in 12 GiB: every layer resident as bf16, some
    converted). When not every layer's stored bytes fit (a 9B or 27B in 24 GiB), nothing is kept: the layers
    stream from the files and the OS page cache keeps what it can of them (see below)."""
    if keep_converted is True:
        return None, 0
    if keep_converted is False:
        return 0, 0
    if keep_converted != "auto":
        raise ValueError(f"keep_converted must be True, False or 'auto', not {keep_converted!r}")
    available = available_memory()
    itemsize = np.dtype(dtype).itemsize
    embedding = cfg.vocab_size * cfg.hidden_size * itemsize
    budget = 2 << 30 if available is None else max(0, int(AUTO_KEEP_FRACTION * available) - embedding)
    layers, per_layer = cfg.num_hidden_layers, cfg.parameter_counts()["per_layer"]
    stored = per_layer * 2 if stored_layer_bytes is None else stored_layer_bytes
    converted = per_layer * itemsize
    if budget < layers * stored:
        # The checkpoint is larger than the budget: stream it all and leave the RAM to the OS page cache. A
        # resident copy of some layers saves no more reading than the page cache holding as many bytes does,
        # and measured no faster: a 9B in a 12 GiB cgroup decoded at 15.1 s per token with 14 of 42 layers
        # resident (10.1 GiB, prefill 80 s) and 15.2 s streamed (4.7 GiB, prefill 34 s); a 27B in 24 GiB at
        # 70.6 s per token with 11 of 46 resident (18.4 GiB) and 64.4 s streamed (6.9 GiB).
        return 0, 0
    if converted <= stored:
        return 0, budget
    upgraded = min(layers, (budget - layers * stored) // (converted - stored))
    return upgraded * converted, (layers - upgraded) * stored


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """A checkpoint directory, or the name of a bundled model ("tiny"), as a directory path."""
    name = str(path_or_name)
    found = local_or_bundled(name)
    if found is not None:
        return found
    if name in PRESETS:
        raise ValueError(
            f"{name!r} is a config preset without weights: pass a checkpoint directory "
            f"(config.json + *.safetensors), e.g. a download of google/gemma-2-{name}. "
            f"Bundled models: {', '.join(bundled_names())}"
        )
    raise FileNotFoundError(f"{name}: not a directory, nor a bundled model ({', '.join(bundled_names())})")


def load_model(path_or_preset: str | Path, dtype: str = "float32", keep_converted=False) -> Model:
    """Load a Gemma 2 checkpoint (Hugging Face layout) or a bundled model by name.

    Every tensor's presence, shape and dtype is checked against config.json before anything is returned;
    the weights stay memory-mapped in their stored dtype and are converted to `dtype` ("float32" or
    "float64") one layer at a time. `keep_converted`: False (stream), True (keep all), "auto" (keep what fits
    in 3/4 of the available RAM): see the module docstring."""
    if str(dtype) not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, not {dtype!r}")
    path = resolve_checkpoint(path_or_preset)
    cfg = load_config(path)
    refs = index_checkpoint(path, cfg)
    stored = sum(ref.nbytes for name, ref in refs.items() if name.startswith("model.layers.0."))
    keep, resident = keep_budget(cfg, dtype, keep_converted, stored)
    return Model(cfg, Weights(refs, cfg, np.dtype(dtype), keep, resident), dtype, path)
