"""One small strict registry type for models, datasets and methods."""
import difflib
import inspect
from typing import Callable, Dict, Iterator, List

from kdexp.errors import ConfigError


def doc_summary(obj) -> str:
    """The first paragraph of `obj`'s docstring on one line ("" without one): how listings and --help
    (kdexp.catalog) describe a registered entry, so a new entry is described where it is written."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


class UnknownNameError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return self.args[0]


class Registry:
    """Name -> object. Duplicate names raise; unknown names raise with the valid names
    and the closest matches. Config group option names equal registry names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, object] = {}
        self._meta: Dict[str, dict] = {}

    def register(self, name: str, **meta) -> Callable:
        def decorator(obj):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r})")
            self._items[name] = obj
            self._meta[name] = meta
            return obj

        return decorator

    def get(self, name: str, key: str = ""):
        """The entry `name`; `key` (e.g. "student.arch") names the config key in the error."""
        if name not in self._items:
            close = difflib.get_close_matches(str(name), self._items, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            where = f"{key}={name!r}: unknown {self.kind}" if key else f"unknown {self.kind} {name!r}"
            raise UnknownNameError(f"{where}.{hint} Registered {self.kind}s: {', '.join(self.names())}")
        return self._items[name]

    def meta(self, name: str) -> dict:
        self.get(name)
        return self._meta[name]

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
