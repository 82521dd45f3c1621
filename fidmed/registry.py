"""One registration per extension: the registries of extractors, metrics, augmentations and dataset preparers.

Every extension point of fidmed is a :class:`Registry`. A member registers itself, with its intrinsic facts, in the
module that implements it (as timm's ``@register_model`` with its ``default_cfgs``)::

    from fidmed.features.registry import EXTRACTORS

    @EXTRACTORS.register("my_net", info=ExtractorInfo(feature_dim=512, input_size=224, ...))
    def build(setup, weights_path): ...

and everything that lists members (the evaluator, the results table, ``fidmed`` command-line help, the Hydra
config groups) reads the registry; nothing lists them by hand.

Discovery is the same for every registry: the first time a registry is asked for its members, every module of
its built-in packages is imported (``pkgutil``), and so is every module that an installed distribution names
under the entry-point group ``fidmed.plugins`` (one mechanism for fidmed's own members and third-party ones). A
test or notebook can also register a member from its own module: registering is importing.

Registry names are protocol identifiers: they are recorded with results and hashed into training fingerprints,
so they never change with the module that happens to implement a member.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from fidmed.errors import ConfigError

T = TypeVar("T")

PLUGIN_GROUP = "fidmed.plugins"  # entry points: importable modules that register members of any registry


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered member: its name, the object (builder, function or class), its facts and its config schema."""

    name: str
    obj: T
    info: Any = None  # intrinsic facts (a dataclass the registry's kind defines)
    config: type | None = None  # structured-config schema of the member's options (a dataclass), if any
    module: str = ""  # where it was registered (for messages only; never a protocol identifier)


_discovered: set[str] = set()  # packages and plugin modules already imported (process-wide)


def _import_package(package: str) -> None:
    """Import ``package`` and every module below it, once."""
    if package in _discovered:
        return
    _discovered.add(package)
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), prefix=f"{package}."):
        importlib.import_module(info.name)


def _import_plugins() -> None:
    """Import the modules installed distributions declare under the ``fidmed.plugins`` entry-point group."""
    if PLUGIN_GROUP in _discovered:
        return
    _discovered.add(PLUGIN_GROUP)
    for ep in entry_points(group=PLUGIN_GROUP):
        importlib.import_module(ep.value.split(":", 1)[0])


class Registry(Generic[T]):
    """Name -> :class:`Entry` for one kind of extension (``kind`` names it in messages)."""

    def __init__(self, kind: str, packages: tuple[str, ...], hint: str = "") -> None:
        self.kind = kind
        self.packages = packages
        self.hint = hint  # how a user selects a member, e.g. "extractor=[a,b]"
        self._entries: dict[str, Entry[T]] = {}

    # ------------------------------------------------------------------------------------------------ registering
    def register(self, name: str, *, info: Any = None, config: type | None = None) -> Callable[[T], T]:
        """Decorator registering ``obj`` as ``name`` with its ``info`` and options schema ``config``."""

        def deco(obj: T) -> T:
            self.add(name, obj, info=info, config=config)
            return obj

        return deco

    def add(self, name: str, obj: T, *, info: Any = None, config: type | None = None) -> Entry[T]:
        """Register ``obj`` as ``name`` (the non-decorator form)."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{self.kind} name {name!r}: use letters, digits, '_' or '-'")
        old = self._entries.get(name)
        module = getattr(obj, "__module__", "") or ""
        if old is not None and (
            old.obj is not obj
            and (old.module, getattr(old.obj, "__qualname__", None)) != (module, getattr(obj, "__qualname__", None))
        ):
            raise ValueError(f"{self.kind} {name!r} is registered twice ({old.module} and {module})")
        entry = Entry(name, obj, info, config, module)
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests that register temporary members clean up with this)."""
        self._entries.pop(name, None)

    # ------------------------------------------------------------------------------------------------ reading
    def discover(self) -> Registry[T]:
        for package in self.packages:
            _import_package(package)
        _import_plugins()
        return self

    def get(self, name: str) -> Entry[T]:
        """The entry called ``name``; an unknown name raises a :class:`ConfigError` listing the known ones."""
        if name not in self._entries:
            self.discover()
        if name not in self._entries:
            hint = f" ({self.hint})" if self.hint else ""
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}{hint}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self.discover()._entries)

    def entries(self) -> list[Entry[T]]:
        self.discover()
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self.discover()._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


@dataclass
class _Registries:
    """Every registry by kind (filled by the modules that define them)."""

    by_kind: dict[str, Registry[Any]] = field(default_factory=dict)


REGISTRIES = _Registries()


def new_registry(kind: str, packages: tuple[str, ...], hint: str = "") -> Registry[Any]:
    """Create (once) the registry of ``kind``."""
    if kind in REGISTRIES.by_kind:
        return REGISTRIES.by_kind[kind]
    reg: Registry[Any] = Registry(kind, packages, hint)
    REGISTRIES.by_kind[kind] = reg
    return reg
