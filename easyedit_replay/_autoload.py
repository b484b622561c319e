"""Post-import hook: register with EasyEdit as soon as ``import easyeditor`` finishes.

Activated at interpreter start-up by the ``easyedit_replay_autoload.pth`` file that
``pip install`` places in site-packages (see ``setup.py``); disabled by
``EASYEDIT_REPLAY_AUTOLOAD=0``. Start-up cost is this module and the package's
``__init__`` (no torch, no EasyEdit, no logging): a meta-path finder is put first
on ``sys.meta_path``; it answers only for the top-level ``easyeditor`` by asking
the other finders for the spec and wrapping its loader, whose ``exec_module``
runs the real one and then :func:`easyedit_replay.easyedit.register`. The
finder removes itself once it has fired. Works for an EasyEdit clone on
``sys.path`` and for an installed one alike.
"""

import os
import sys

ENV = "EASYEDIT_REPLAY_AUTOLOAD"
HOST = "easyeditor"


def enabled() -> bool:
    """False when ``EASYEDIT_REPLAY_AUTOLOAD`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class _RegisteringLoader:
    """Delegates to the real loader of ``easyeditor``; registers after ``exec_module``."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        remove()
        try:
            from .easyedit import register

            register(import_host=False)
        except Exception as exc:  # never break the user's import of EasyEdit
            import warnings

            warnings.warn(f"easyedit-replay: registration with EasyEdit failed: {exc!r}", RuntimeWarning)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class PostImportFinder:
    """Meta-path finder that only wraps the loader of the top-level ``easyeditor``."""

    def find_spec(self, fullname, path=None, target=None):
        """For ``easyeditor`` (``HOST``) only: the spec the next finder on ``sys.meta_path``
        gives, its loader wrapped so the plugin registers once the host module has run;
        None for every other module (and when no other finder knows ``easyeditor``)."""
        if fullname != HOST:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, PostImportFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def remove() -> None:
    """Take every plugin finder off ``sys.meta_path``."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PostImportFinder)]


def install() -> bool:
    """Arrange for registration when ``easyeditor`` is imported (idempotent).

    Imports nothing heavy. If ``easyeditor`` is already imported, registers now.
    Returns False (and does nothing) when disabled by ``EASYEDIT_REPLAY_AUTOLOAD=0``.
    """
    if not enabled():
        return False
    if HOST in sys.modules:
        from .easyedit import register

        register(import_host=False)
        return True
    if not any(isinstance(f, PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PostImportFinder())
    return True


def _from_pth() -> None:
    """Entry of the ``.pth`` line: never raise at interpreter start-up."""
    try:
        install()
    except Exception as exc:  # pragma: no cover - defensive
        sys.stderr.write(f"easyedit-replay: import hook not installed: {exc!r}\n")
