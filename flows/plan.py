"""The `plan` flow: a dry run of migrate-vm, as a markdown artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.models import MigrationRequest
from tasks.plan import Plan, make_plan, plan_markdown
from tasks.progress import artifact_key


@flow(name="plan", flow_run_name="plan-{request.vm}")
def plan(request: MigrationRequest) -> Plan:
    """Check and decide everything migrate-vm would, without moving a byte."""
    result = make_plan(request)
    create_markdown_artifact(
        plan_markdown(result),
        key=artifact_key("plan", result.spec.moref),
        description=f"plan for {result.vm}",
    )
    logger = get_run_logger()
    for concern in result.concerns:
        log = logger.error if concern.severity == "critical" else logger.warning
        log("%s: %s Fix: %s", concern.rule, concern.message, concern.fix)
    logger.info("plan for %s: %d critical concern(s)", result.vm, len(result.critical))
    return result
