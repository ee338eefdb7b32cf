"""Register ``ddf.llm`` when ``dask.dataframe`` is imported, without importing it ourselves.

``import dask.dataframe`` costs about a second (it pulls in dask.array, fsspec and pyarrow's
compute kernels), and every fresh Dask worker would pay it again through ``import
parrot_pandas``. So ``parrot_pandas`` never imports it: :func:`install` registers the
accessor at once if ``dask.dataframe`` is already imported, and otherwise puts a
:class:`PostImportHook` at the front of :data:`sys.meta_path`. The hook finds nothing
itself: when ``dask.dataframe`` is looked up it asks the other finders, wraps the loader they
return, and after the module has executed it takes itself off ``sys.meta_path`` and
registers the accessor. The module keeps its own loader and spec, as if the hook had never
been there.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["PostImportHook", "install"]

DASK_DATAFRAME = "dask.dataframe"
ACCESSOR_MODULE = "parrot_pandas.dask._accessor"


class PostImportHook(importlib.abc.MetaPathFinder):
    """Call ``callback(module)`` once, right after the module called `name` has executed.

    Parameters
    ----------
    name : str
        The module's full name, e.g. ``"dask.dataframe"``.
    callback : callable
        Receives the executed module. An exception in it becomes a warning: the user's
        import must not fail because of us.
    """

    def __init__(self, name: str, callback: Callable[[ModuleType], Any]) -> None:
        self.name = name
        self._callback = callback
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PostImportHook({self.name!r})"

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        if fullname != self.name:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, self)
        return spec

    def remove(self) -> None:
        """Take the hook off :data:`sys.meta_path` (idempotent)."""
        with self._lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)

    def fire(self, module: ModuleType) -> None:
        """Remove the hook, then call the callback; its failure is a warning."""
        self.remove()
        try:
            self._callback(module)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(
                f"parrot_pandas: after importing {self.name}: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )


class _CallbackLoader(importlib.abc.Loader):
    """The real loader, plus a call to the hook once the module has executed."""

    def __init__(self, loader: Any, hook: PostImportHook) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The real loader goes back before executing, so the module (and importlib.resources,
        # reload, pickling by reference) never sees this wrapper, even if executing fails.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._hook.fire(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _register_accessor(_module: ModuleType | None = None) -> None:
    importlib.import_module(ACCESSOR_MODULE)  # registers ddf.llm as it is imported


def install() -> PostImportHook | None:
    """Make ``ddf.llm`` available whenever ``dask.dataframe`` is (or gets) imported.

    Returns
    -------
    PostImportHook or None
        The hook put on :data:`sys.meta_path`; ``None`` if the accessor was registered at
        once, if Dask is not installed, or if a hook is already waiting.
    """
    if sys.modules.get(DASK_DATAFRAME) is not None:
        _register_accessor()
        return None
    if any(isinstance(f, PostImportHook) and f.name == DASK_DATAFRAME for f in sys.meta_path):
        return None
    # Without Dask there is nothing to wait for (looking this up imports nothing).
    if importlib.util.find_spec("dask") is None:
        return None
    hook = PostImportHook(DASK_DATAFRAME, _register_accessor)
    sys.meta_path.insert(0, hook)
    return hook
