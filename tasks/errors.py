"""One error model: every failure v2k raises on purpose says whether waiting helps.

- `Refused`: the user must act (a wrong password, a missing pool, a taken name). Retrying
  cannot help and can hurt (a locked-out account), so it is never retried.
- `Transient`: the fault may pass by itself (a dropped connection, a busy host). Retried.

Both carry the fix in their message. `retry_condition` is the one `retry_condition_fn`
that every stage uses; errors from libraries (sockets, libvirt, pyvmomi) that are not
known to be refusals count as transient.
"""

from __future__ import annotations

from typing import ClassVar


class V2kError(Exception):
    """Base of v2k's own errors: a message and, where one is known, the fix."""

    retry: ClassVar[bool] = True

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message} Fix: {fix}" if fix else message)

    def __reduce__(self):
        # Prefect pickles a task's error into its state; rebuilt without calling __init__,
        # whose arguments differ between subclasses, and with every attribute kept.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[V2kError], args: tuple, attributes: dict) -> V2kError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(attributes)
    return error


class Refused(V2kError):
    """The user must change something first; never retried."""

    retry = False


class Transient(V2kError):
    """A fault that may pass by waiting; retried by the stage's policy."""

    retry = True


def _refusals_from_libraries() -> tuple[type[BaseException], ...]:
    """Library errors that no retry can fix (imported lazily: they are heavy)."""
    import paramiko
    from pydantic import ValidationError
    from pyVmomi import vim

    return (
        ValidationError,
        vim.fault.InvalidLogin,
        vim.fault.NoPermission,
        # SSH: the key or password was refused, or the host shows another key.
        paramiko.AuthenticationException,
        paramiko.BadHostKeyException,
    )


def libvirt_refused(exc: BaseException) -> bool:
    """Whether a libvirt error is a refused login: authentication, or an SSH host key that
    is unknown or changed (libvirt's ssh transports report both as errors)."""
    import libvirt

    if not isinstance(exc, libvirt.libvirtError):
        return False
    code = exc.get_error_code()
    auth = (
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    )
    host_key = code == libvirt.VIR_ERR_SSH and "host key" in (exc.get_error_message() or "").lower()
    return code in auth or host_key


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may help after `exc` (see the module doc)."""
    from pyVmomi import vim

    if isinstance(exc, V2kError):
        return exc.retry
    if isinstance(exc, vim.fault.NotAuthenticated):
        # A subclass of NoPermission, but it means the session ended (vCenter restarted,
        # or the session timed out): a new session, on the next try, cures it.
        return True
    return not (isinstance(exc, _refusals_from_libraries()) or libvirt_refused(exc))


def retry_condition(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures only."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified, not handled
        return is_transient(exc)
    return True
