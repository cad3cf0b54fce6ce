"""Resuming a migration: stage results persisted under keys made from the stage's inputs.

When a flow run is retried (its worker was killed, the machine rebooted), the stages run
again with the same inputs. The resumable tasks persist their results and key them on
those inputs (the VM's instance UUID and change version, the disk, the directories) plus
the run's *resume token*, so Prefect hands back what a finished stage returned instead
of running it again; an unfinished download goes on from the bytes on disk.

The token lives exactly as long as what the stages made. `cleanup_run` forgets it when it
removes the files, the clone and the domains, so a retry after a cleanup does the work
again rather than trusting results whose files are gone. It is kept in a Prefect
variable, so every worker of the server sees the same one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext
from prefect.exceptions import ObjectAlreadyExists
from prefect.variables import Variable
from pydantic import BaseModel

RESULT_EXPIRATION = timedelta(days=14)
"""How long a stage result can be reused: longer than any sensible pause before a retry."""

_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def _variable(scope: str) -> str:
    # Variable names take lower-case letters, digits, '-' and '_' only.
    return "v2k-resume-" + _UNSAFE.sub("-", scope.lower())[:200]


def resume_token(scope: str) -> str:
    """The resume token of `scope` (a run, or a reusable export), made on first use."""
    name = _variable(scope)
    token = Variable.get(name, default=None)
    if token:
        return str(token)
    token = uuid.uuid4().hex
    try:
        Variable.set(name, token, overwrite=False)
    except (ObjectAlreadyExists, ValueError):
        return str(Variable.get(name))  # another process made it first: use theirs
    return token


def forget(scope: str) -> None:
    """Drop the token of `scope`: results keyed on it are not used again."""
    Variable.unset(_variable(scope))


def export_scope(vm: str, data_version: str | None) -> str | None:
    """Scope of an export that later runs may reuse: one VM's data in one state.

    `vm` names the VM (its vCenter's and its own instance UUIDs); `data_version`
    (VmSpec.data_version) its disks' state: None when that state cannot be told, and
    then nothing is reused.
    """
    if not data_version:
        return None
    return f"export-{hashlib.sha256(vm.encode()).hexdigest()[:12]}-{data_version}"


def stale_exports(kept: Path, scope: str) -> list[str]:
    """The other kept exports of the scope's VM: its data has changed since they were made."""
    vm = scope.rsplit("-", 1)[0] + "-"
    if not kept.is_dir():
        return []
    return [e.name for e in kept.iterdir() if e.name.startswith(vm) and e.name != scope]


KEPT_SINCE = ".v2k-kept-since"


def mark_kept(directory: Path) -> None:
    """Note when a kept export was started, once: its age counts from there."""
    directory.mkdir(parents=True, exist_ok=True)
    since = directory / KEPT_SINCE
    if not since.exists():
        since.write_text(f"{time.time():.0f}\n")


def expired_exports(kept: Path, max_age_seconds: float) -> list[str]:
    """Scopes of the kept exports in `kept` started more than `max_age_seconds` ago."""
    if not kept.is_dir():
        return []
    expired = []
    for entry in kept.iterdir():
        if not entry.name.startswith("export-"):
            continue
        try:
            since = float((entry / KEPT_SINCE).read_text())
        except (OSError, ValueError):
            since = entry.stat().st_mtime
        if time.time() - since > max_age_seconds:
            expired.append(entry.name)
    return expired


def _value(parameters: dict[str, Any], dotted: str) -> Any:
    head, *rest = dotted.split(".")
    value = parameters[head]
    for name in rest:
        value = getattr(value, name)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def keyed_on(*names: str) -> Callable[[TaskRunContext, dict[str, Any]], str | None]:
    """A `cache_key_fn` over the task's name and the named parameters (dotted paths).

    The task must have a `resume_token` parameter; without a token (None) nothing is
    cached, so callers that do not resume (benchmarks, tests) run every time.
    """

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        if not parameters.get("resume_token"):
            return None
        parts = [context.task.name, parameters["resume_token"]]
        parts += [_value(parameters, name) for name in names]
        encoded = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(encoded).hexdigest()

    return cache_key


def resumable(*names: str) -> dict[str, Any]:
    """Task options for a stage whose result a retried run reuses; see `keyed_on`."""
    return {
        "cache_key_fn": keyed_on(*names),
        "persist_result": True,
        "cache_expiration": RESULT_EXPIRATION,
    }
