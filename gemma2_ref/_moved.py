"""The flat module names of before the layers (issue 32) keep working: `import gemma2_ref.golden` gives the
module `gemma2_ref.verify.golden` itself (one module object, so monkeypatching either name patches both).
Imported lazily: `import gemma2_ref` still loads only what it needs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {  # old name -> where the module lives now
    "gemma2_ref.adapters.names": "gemma2_ref.verify.names",
    "gemma2_ref.bfloat16": "gemma2_ref.model.bfloat16",
    "gemma2_ref.check_config": "gemma2_ref.verify.check_config",
    "gemma2_ref.checkpoints": "gemma2_ref.storage.checkpoints",
    "gemma2_ref.commands": "gemma2_ref.cli.commands",
    "gemma2_ref.compare": "gemma2_ref.verify.compare",
    "gemma2_ref.config": "gemma2_ref.model.config",
    "gemma2_ref.diagnose": "gemma2_ref.verify.diagnose",
    "gemma2_ref.distill": "gemma2_ref.model.distill",
    "gemma2_ref.fast": "gemma2_ref.model.fast",
    "gemma2_ref.generate": "gemma2_ref.model.generate",
    "gemma2_ref.golden": "gemma2_ref.verify.golden",
    "gemma2_ref.inputs": "gemma2_ref.model.inputs",
    "gemma2_ref.loader": "gemma2_ref.storage.loader",
    "gemma2_ref.measured": "gemma2_ref.verify.measured",
    "gemma2_ref.mistakes": "gemma2_ref.verify.mistakes",
    "gemma2_ref.options": "gemma2_ref.cli.options",
    "gemma2_ref.plot": "gemma2_ref.verify.plot",
    "gemma2_ref.suites": "gemma2_ref.verify.suites",
    "gemma2_ref.taps": "gemma2_ref.model.taps",
    "gemma2_ref.testing": "gemma2_ref.verify.testing",
    "gemma2_ref.tokenizer": "gemma2_ref.model.tokenizer",
    "gemma2_ref.weights": "gemma2_ref.storage.weights",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the module at its new place."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import machinery sets the alias's spec on it: put it back
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # already executed under its new name


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())  # before an editable install's finder, which knows the old files
