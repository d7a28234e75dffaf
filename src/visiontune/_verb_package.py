"""A subpackage that is also an API verb of the same name (`visiontune.export`, `visiontune.explain`).

Importing any submodule rebinds the package attribute on `visiontune` to the subpackage, shadowing a plain
function of that name; so the subpackage module itself is made callable and forwards to the API function.
"""

from __future__ import annotations

import sys
import types


def make_callable(module_name: str, verb: str) -> None:
    class _VerbModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            from visiontune import api

            return getattr(api, verb)(*args, **kwargs)

    sys.modules[module_name].__class__ = _VerbModule
