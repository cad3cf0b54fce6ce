"""When a Prefect retry is worth it: after a transient fault, never after a refusal."""

from __future__ import annotations

from collections.abc import Callable


def retry_unless(*permanent: type[BaseException]) -> Callable:
    """A `retry_condition_fn` that retries every failure except the `permanent` errors.

    Example:
        `@task(retries=3, retry_condition_fn=retry_unless(PreflightError))`
    """

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except Exception:  # noqa: BLE001 - anything else may pass on a second try
            return True
        return True

    return condition
