"""What a preparer is: the :class:`Preparer` base class, the registry ``PREPARERS`` and the facts a preparer
registers with (:class:`PreparerInfo`).

A preparer (one per source dataset: ``fidmed prepare NAME`` runs the preparer registered as NAME) says which
*sources* a raw folder holds (a file, or for DICOM a series of files) and turns one source into 2-D uint8 images;
:func:`fidmed.data.prepare.runner.run_prepare` does the rest (output, resume, workers, manifest). One module
holds one preparer and registers it, with its facts and its command-line options; nothing else lists it::

    @PREPARERS.register("ct", info=PreparerInfo(help="SLIVER07 .mhd volumes -> ...", description="...",
                                                 example="--src SLIVER07/scan --out data/ct", version="ct-1"))
    @dataclass(frozen=True)
    class CTPreparer(Preparer):
        constant: Literal["skip", "zero"] = "skip"        # the parameters: recorded in the manifest

        @classmethod
        def add_arguments(cls, parser): parser.add_argument("--constant", ...)   # one option per field
        def steps(self): ...
        def discover(self, src): ...
        def convert(self, src, source, emit): ...

A module registered from anywhere else (a test, a plugin named under the ``fidmed.plugins`` entry points) becomes
a ``fidmed prepare`` sub-command the same way.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fidmed.errors import ConfigError, DataError
from fidmed.registry import Entry, new_registry

if TYPE_CHECKING:
    from fidmed.data.prepare.output import Emitter
    from fidmed.data.prepare.sources import Discovery, Source

PREPARERS = new_registry("preparer", ("fidmed.data.prepare",), hint="fidmed prepare NAME")


@dataclass(frozen=True)
class PreparerInfo:
    """The facts a preparer registers with (the registry name is its ``fidmed prepare`` sub-command)."""

    help: str  # one line, in the list of `fidmed prepare --help`
    description: str  # `fidmed prepare NAME --help`: what it does, and where fidmed and the study differ
    example: str  # the arguments of a typical command line, e.g. "--src SLIVER07/scan --out data/ct"
    # Recorded with the parameters: bump it when the outputs for the same parameters change (a fix).
    version: str
    study_script: str | None = None  # the study's script it reproduces, or None


class BadSource(DataError):
    """One source cannot be prepared (unreadable, truncated, NaN, wrong shape ...); the message says why.

    :func:`fidmed.data.prepare.runner.run_prepare` skips the source and lists it, or stops with ``strict``.
    """


class Preparer(abc.ABC):
    """One source dataset's preparation. Subclasses are frozen dataclasses whose fields are the parameters
    (recorded in the manifest; any change means a different prepared set), registered with :data:`PREPARERS`.
    Their name and facts come from that registration (:meth:`registration`)."""

    @classmethod
    def registration(cls) -> Entry:
        """This class's entry in :data:`PREPARERS`: its name (the sub-command) and :class:`PreparerInfo`."""
        for entry in PREPARERS.entries():
            if entry.obj is cls:
                return entry
        raise ConfigError(
            f"preparer class {cls.__module__}.{cls.__qualname__} is not registered; decorate it with "
            f"@PREPARERS.register(NAME, info=PreparerInfo(...)) from fidmed.data.prepare.preparer."
        )

    @property
    def name(self) -> str:
        return self.registration().name

    @property
    def info(self) -> PreparerInfo:
        return self.registration().info

    def params(self) -> dict[str, Any]:
        """The parameters as JSON-able values."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]

    # -- the command line ---------------------------------------------------------------------------------------
    @classmethod  # noqa: B027 -- an optional hook: no options by default
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this preparer's options to its ``fidmed prepare NAME`` parser (argument ``dest`` = field name)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Preparer:
        """The preparer parsed command-line arguments describe: every field whose name is an argument's ``dest``
        takes that argument's value, the others keep their defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in vars(args).items() if k in fields})

    # -- the preparation ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def steps(self) -> list[str]:
        """The steps in words, with the parameters filled in (recorded in the manifest)."""

    @abc.abstractmethod
    def discover(self, src: Path) -> Discovery:
        """Find the sources under ``src``. Raise DataError (naming ``src`` and what was expected) when none."""

    @abc.abstractmethod
    def convert(self, src: Path, source: Source, emit: Emitter) -> None:
        """Turn one source into images via ``emit``; raise :class:`BadSource` when it cannot be used."""


def require_medical(module: str) -> Any:
    """Import one of the optional medical-format libraries with an install hint when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataError(
            f"`fidmed prepare` needs {module} for this format; install the medical extras: "
            f"pip install 'fidmed[medical]' ({exc})"
        ) from exc
