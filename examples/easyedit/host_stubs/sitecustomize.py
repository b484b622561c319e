"""Import-only stand-ins for EasyEdit's multimodal dependencies, for CPU-only torch.

``import easyeditor`` imports ``timm`` and ``torchvision`` for its BLIP-2 /
multimodal trainers; the MEMIT-family editing path never uses them. PyPI's Linux
torchvision links the CUDA build of torch and does not load with a CPU-only torch
(``operator torchvision::nms does not exist``). With this folder on ``PYTHONPATH``
(``examples/easyedit/run_recipe.sh`` puts it there after uninstalling torchvision;
the host tests do the same), Python imports this file at start-up. It only acts for
a module that cannot be imported otherwise: it then serves an empty stand-in whose
attributes are inert placeholders. Where the real packages import, it does nothing.

It also processes the plugin's ``.pth`` file exactly as an installed copy would
(``site.addsitedir``) when ``EASYEDIT_REPLAY_TEST_SITEDIR`` names the folder that
holds it, so the tests get the post-import hook without installing the plugin into
the EasyEdit interpreter.
"""

import importlib.abc
import importlib.machinery
import os
import site
import sys
import types

STUBBED = ("timm", "torchvision")


class _Placeholder:
    """Any attribute, call, subscript or iteration gives another placeholder."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        return _Placeholder(f"{self._name}()")

    def __getitem__(self, key):
        return _Placeholder(f"{self._name}[]")

    def __mro_entries__(self, bases):
        return (object,)

    def __repr__(self):
        return f"<stand-in {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in STUBBED:
            return None
        root = fullname.split(".")[0]
        if root not in sys.modules:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                if finder.find_spec(root, None) is not None:
                    return None  # the real package exists: do nothing
        elif not isinstance(sys.modules[root], _StubModule):
            return None
        return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)


sys.meta_path.append(_StubFinder())

if os.environ.get("EASYEDIT_REPLAY_TEST_SITEDIR"):
    site.addsitedir(os.environ["EASYEDIT_REPLAY_TEST_SITEDIR"])
