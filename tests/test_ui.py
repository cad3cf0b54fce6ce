"""The Prefect UI, driven by headless Chromium (Debian's, through Playwright): open the
migrate-vm deployment, fill and submit its run form, watch the run complete, and find
its summary and per-disk progress artifacts.

This is the real migration of the Debian guest (about 4 minutes). Screenshots go to the
test's temporary directory; with V2K_UI_SCREENSHOTS=DIR they are copied there too
(`V2K_UI_SCREENSHOTS=docs/ui` refreshes the README's).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

pytest_plugins = ["deployments.testing"]

CHROMIUM = "/usr/bin/chromium"
# A running VM: the run exports a powered-off clone of it (issue "Source variants"), and
# the migrated domain must boot all the same.
VM = "debian-live"
TARGET = "debian-ui"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]


def _remove_domain(conn, name: str) -> None:
    """Undefine the domain and delete its disk volumes, if it is there."""
    import libvirt

    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    root = ET.fromstring(dom.XMLDesc(0))
    paths = [s.get("file") for s in root.iterfind("devices/disk/source") if s.get("file")]
    if dom.isActive():
        dom.destroy()
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    for path in paths:
        try:
            conn.storageVolLookupByPath(path).delete(0)
        except libvirt.libvirtError:
            pass


@pytest.fixture()
def browser_page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


class Shots:
    """Numbered full-page screenshots in the test's directory (and V2K_UI_SCREENSHOTS)."""

    def __init__(self, page, directory: Path) -> None:
        self.page, self.directory, self.count = page, directory, 0
        self.copy_to = os.environ.get("V2K_UI_SCREENSHOTS")

    def __call__(self, name: str) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if self.copy_to:
            Path(self.copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(self.copy_to) / path.name)
        return path


def _all_vms(si):
    from pyVmomi import vim

    view = si.content.viewManager.CreateContainerView(
        si.content.rootFolder, [vim.VirtualMachine], True
    )
    try:
        return list(view.view)
    finally:
        view.Destroy()


def _tab(page, name: str):
    """A tab of the Prefect UI (an `li.p-tab`, without an ARIA role)."""
    return page.locator("li.p-tab").filter(has_text=re.compile(rf"^\s*{re.escape(name)}\s*$"))


def _field(page, label: str):
    """The innermost form property whose label is `label` (or `label (Optional)`)."""
    title = re.compile(rf"^{re.escape(label)}( \(Optional\))?$")
    return (
        page.locator(".schema-form-property")
        .filter(has=page.locator(".schema-form-property__label", has_text=title))
        .last
    )


def _fill(page, label: str, value: str) -> None:
    field = _field(page, label)
    as_text = field.get_by_role("button", name="str", exact=True)
    if as_text.count() and as_text.first.get_attribute("aria-selected") != "true":
        as_text.first.click()  # an optional field: switch it from None to a string
    field.locator("textarea, input[type=text]").first.fill(value)


def _wait_for_final_state(page, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    badge = page.locator(".state-badge").first
    while time.monotonic() < deadline:
        page.wait_for_timeout(5_000)
        page.reload()
        badge.wait_for()
        state = badge.inner_text().strip()
        if state in ("Completed", "Failed", "Crashed", "Cancelled"):
            return state
    raise TimeoutError(f"the run is still {badge.inner_text()} after {timeout:.0f} s")


def _artifact_titles(page, *expect: str, timeout: float = 60) -> list[str]:
    """Open the run's Artifacts tab; the titles (keys) of its artifact cards once every
    pattern in `expect` matches one. Cards render lazily (a virtual scroller), and a
    card may appear some seconds after the run: scroll down and look again."""
    _tab(page, "Artifacts").click()
    titles = page.locator(".artifact-card__title")
    deadline = time.monotonic() + timeout
    while True:
        page.mouse.wheel(0, 2000)
        page.wait_for_timeout(1_000)
        found = [t.strip() for t in titles.all_inner_texts()]
        if all(any(re.search(e, t) for t in found) for e in expect):
            return found
        if time.monotonic() > deadline:
            return found


def test_run_form_migrates_and_shows_artifacts(served, bed, browser_page, tmp_path):
    from playwright.sync_api import expect

    page, blocks = browser_page, served.blocks
    shot = Shots(page, tmp_path)
    try:
        # The deployment, from the list of deployments.
        page.goto(f"{served.url}/deployments")
        page.get_by_role("link", name="migrate-vm", exact=True).first.click()
        page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]+"))
        _tab(page, "Parameters").wait_for()
        shot("deployment")

        # Run > Custom run: the form rendered from MigrationRequest, with the boot check.
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()
        page.get_by_text("Temporary Storage", exact=True).wait_for()
        for label, value in [
            ("Vcenter", blocks["vcenter"]),
            ("Vm", VM),
            ("Cluster", blocks["cluster"]),
            ("Temporary Storage", blocks["scratch"]),
            ("Settings", blocks["settings"]),
            ("Target Name", TARGET),
        ]:
            _fill(page, label, value)
        boot_check = _field(page, "Verify Boot").get_by_role("switch")
        boot_check.focus()
        boot_check.press("Space")
        expect(boot_check).to_have_attribute("aria-checked", "true")
        shot("run-form")
        page.get_by_role("button", name="Submit").click()

        # The new run, on the deployment's Runs tab; then its own page until it ends.
        run_link = page.get_by_role("link", name=f"migrate-{VM}").first
        run_link.wait_for()
        shot("submitted")
        run_link.click()
        page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]+"))
        flow_run_id = page.url.rstrip("/").split("/")[-1].split("?")[0]
        state = _wait_for_final_state(page, timeout=600)
        shot("run-completed")
        assert state == "Completed", served.log_tail(size=6000)

        # Its artifacts: the summary, the convert and import progress...
        titles = _artifact_titles(page, r"^migration-vm-\d+$", r"-convert$", r"-import$")
        shot("artifacts")
        assert any(re.fullmatch(r"migration-vm-\d+", t) for t in titles), titles
        assert any(t.endswith("-convert") for t in titles), titles
        assert any(t.endswith("-import") for t in titles), titles
        # ... and the per-disk export progress (in the export subflow when there is one).
        if not any(t.endswith("-disk-0") for t in titles):
            _tab(page, "Subflow Runs").click()
            # The export subflow exports the clone, named after the run.
            page.get_by_role("link", name=re.compile(r"^export-v2k-clone-")).first.click()
            page.wait_for_url(lambda url: flow_run_id not in url)
            titles = _artifact_titles(page, r"-disk-0$")
            shot("export-artifacts")
        assert any(t.endswith("-disk-0") for t in titles), titles

        # The summary artifact itself, rendered.
        response = httpx.post(
            f"{served.api}/artifacts/filter",
            json={"artifacts": {"key": {"like_": "migration-"}}},
            timeout=10,
        ).json()
        summary = next(a for a in response if a["flow_run_id"] == flow_run_id)
        assert f"# Migrated `/DC0/vm/Linux/{VM}`" in summary["data"]
        assert "| boot check | passed |" in summary["data"], summary["data"]
        page.goto(f"{served.url}/artifacts/artifact/{summary['id']}")
        page.get_by_text(f"Migrated /DC0/vm/Linux/{VM}").wait_for()
        shot("summary")
        progress = httpx.post(
            f"{served.api}/artifacts/filter",
            json={"artifacts": {"type": {"any_": ["progress"]}, "key": {"like_": "-disk-0"}}},
            timeout=10,
        ).json()
        assert progress and max(a["data"] for a in progress) == 100.0

        # The source runs on, untouched, and the clone it was exported through is gone.
        with bed.vcsim.connect() as si:
            names = {vm.name: vm for vm in _all_vms(si)}
            assert names[VM].runtime.powerState == "poweredOn"
            assert not [n for n in names if n.startswith("v2k-clone-")], sorted(names)
    finally:
        for host in bed.libvirt:  # the import host is chosen at random
            _remove_domain(bed.libvirt_conn(host), TARGET)
