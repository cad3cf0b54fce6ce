"""A VM's inventory path as text: the one way v2k prints it and the one way it reads it.

vCenter stores every entity name with `/`, `\\` and `%` escaped as `%2f`, `%5c` and `%25`
(ManagedEntity.name), so a raw `/` only ever separates names, and `SearchIndex.
FindByInventoryPath` takes paths made of these stored names. `escape` brings any name
into that form: a no-op on names vCenter returns, a fix for a simulator or an old host
that returns them raw. `format_path` prints a path, `split_path` reads one back:
`split_path(format_path(names)) == [escape(n) for n in names]` for every name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

# A `%` that does not start an escape sequence (two hex digits), `/` and `\`. vCenter keeps
# a `%` that starts an escape sequence as it is, so escaping is idempotent.
_UNESCAPED = re.compile(r"%(?![0-9A-Fa-f]{2})|[/\\]")
_ESCAPES = {"%": "%25", "/": "%2f", "\\": "%5c"}
_ESCAPED = re.compile(r"%(2[fF]|5[cC]|25)")
_CHARS = {"2f": "/", "5c": "\\", "25": "%"}


class PathError(ValueError):
    """Text that is not an inventory path (an empty name in it)."""


def escape(name: str) -> str:
    """The name as vCenter stores it and as it stands in a path."""
    return _UNESCAPED.sub(lambda m: _ESCAPES[m.group()], name)


def unescape(name: str) -> str:
    """The name as the vSphere Client shows it (`app%2fdb` -> `app/db`)."""
    return _ESCAPED.sub(lambda m: _CHARS[m.group(1).lower()], name)


def join_names(names: Iterable[str]) -> str:
    """Names joined into a relative path (`Prod/Web`), each escaped."""
    return "/".join(escape(name) for name in names)


def format_path(names: Iterable[str]) -> str:
    """The absolute inventory path of these names (`/DC0/vm/Prod/app%2fdb 02`)."""
    return "/" + join_names(names)


def split_path(path: str) -> list[str]:
    """The names of a path, escaped as in vCenter; one leading and one trailing `/` are
    ignored, as FindByInventoryPath does. Nothing else is changed: spaces, tabs, quotes
    and `..` are parts of names.

    Raises:
        PathError: the path is empty or holds an empty name (`a//b`).
    """
    body = path.removeprefix("/").removesuffix("/")
    names = body.split("/")
    if not body or "" in names:
        raise PathError(
            f"{path!r} is not an inventory path: it has an empty name. Write a `/` that is "
            "part of a name as %2f, as vCenter does"
        )
    return [escape(name) for name in names]


def name_matches(name: str, glob: str, *, ignore_case: bool = False) -> bool:
    """Whether a VM name matches a shell glob, written as vCenter stores the name
    (`app%2fdb*`) or as the vSphere Client shows it (`app/db*`)."""
    fold = str.lower if ignore_case else str
    return any(fnmatchcase(fold(n), fold(glob)) for n in {name, unescape(name)})


def markdown(path: str) -> str:
    """The path as a markdown code span, which shows it as it is (no `*` or `_` read as
    emphasis): fenced with more backticks than it holds in a row."""
    run = max((len(r) for r in re.findall(r"`+", path)), default=0)
    fence = "`" * (run + 1)
    pad = " " if path.startswith("`") or path.endswith("`") else ""
    return f"{fence}{pad}{path}{pad}{fence}"
