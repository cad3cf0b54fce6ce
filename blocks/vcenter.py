"""The VCenter block: how to reach a vCenter Server or a standalone ESXi host."""

from __future__ import annotations

import http.client
import ssl
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.blocks.core import Block
from pydantic import BaseModel, Field, SecretStr, field_validator

from blocks.cache import LoadedOnce
from tasks.errors import Refused, Transient, V2kError

# The ServiceContent of each open connection (by its SOAP stub), asked for once.
_contents: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def service_content(si):
    """The connection's ServiceContent (the managers: property collector, OVF, search).

    pyvmomi's `si.RetrieveContent()` and `si.content` ask the server every time, one round
    trip each; this asks once per connection.
    """
    content = _contents.get(si._stub)
    if content is None:
        content = _contents[si._stub] = si.RetrieveContent()
    return content


# The vSphere API version each (host, port) speaks, found by this process's first login.
_api_versions: dict[tuple[str, int], str] = {}


def _api_version(host: str, port: int, context: ssl.SSLContext, timeout: float) -> str | None:
    """The newest vSphere API version that both pyvmomi and the server know.

    Read from the server's `/sdk/vimServiceVersions.xml`, as pyvmomi's `SmartConnect`
    does, but with a timeout: pyvmomi reads it without one, so a vCenter that accepts
    connections and never answers would hold the run forever. None when the server has
    no such document (old ESXi) or shares no version with pyvmomi.
    """
    from pyVmomi.VmomiSupport import GetServiceVersions, versionIdMap

    connection = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    try:
        connection.request("GET", "/sdk/vimServiceVersions.xml")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    try:
        root = ET.fromstring(body) if response.status == 200 else None
    except ET.ParseError:
        root = None
    if root is None or root.tag != "namespaces" or root.get("version") != "1.0":
        return None
    offered = {v.text for v in root.iterfind("namespace/version")}
    offered |= {v.text for v in root.iterfind("namespace/priorVersions/version")}
    # pyvmomi's versions come newest first.
    return next((v for v in GetServiceVersions("vim25") if versionIdMap[v] in offered), None)


class VCenterError(V2kError):
    """vCenter could not be reached or refused the login; the message says which setting to fix.

    Raised as one of its two kinds: `VCenterRefused` or `VCenterUnreachable`.
    """


class VCenterRefused(VCenterError, Refused):
    """The login or the TLS check failed: a setting of the block is wrong. Never retried:
    every try with a wrong password counts towards the account's lock-out."""


class VCenterUnreachable(VCenterError, Transient):
    """vCenter did not answer, or the connection broke: it may be back in a while."""


class VCenter(LoadedOnce, Block):
    """Connection to a vCenter Server, or to a standalone ESXi host (datacenter `ha-datacenter`).

    Example:
        Save once, then use it by name in flows:
        ```python
        from blocks import VCenter

        VCenter(
            host="vcenter.example.com",
            username="migrator@vsphere.local",
            password="...",
            ca_cert=open("/etc/ssl/vcenter-ca.pem").read(),
        ).save("prod-vcenter")

        with VCenter.load("prod-vcenter").connect() as si:
            print(si.content.about.fullName)
        ```
    """

    _block_type_name = "v2k vCenter"
    _block_type_slug = "v2k-vcenter"
    _description = "A vCenter Server or standalone ESXi host that VMs are migrated from."

    host: str = Field(description="Host name or IP address of vCenter or of the ESXi host.")
    port: int = Field(default=443, ge=1, le=65535, description="HTTPS port of the SDK endpoint.")
    username: str = Field(description="User with read, clone and export rights on the VMs.")
    password: SecretStr = Field(description="Password of that user.")
    datacenter: str | None = Field(
        default=None,
        description=(
            "Datacenter that holds the VMs. Empty: the only datacenter there is "
            "(`ha-datacenter` on a standalone ESXi host)."
        ),
    )
    verify_tls: bool = Field(
        default=True,
        description="Check the server's TLS certificate. Turn off only for a lab you trust.",
    )
    ca_cert: str | None = Field(
        default=None,
        description=(
            "CA certificate(s) to trust, as PEM text or as a path on the worker. "
            "Empty: the system's trust store."
        ),
    )
    timeout: float = Field(default=60, gt=0, description="Seconds allowed for one call to vCenter.")

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("host is empty: give the vCenter or ESXi host name")
        return value.strip()

    @field_validator("username")
    @classmethod
    def _username_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("username is empty")
        return value

    def ssl_context(self) -> ssl.SSLContext:
        """TLS context for the SDK and for disk downloads, built from `verify_tls` and `ca_cert`."""
        if not self.verify_tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        if not self.ca_cert:
            return ssl.create_default_context()
        if "-----BEGIN" in self.ca_cert:
            return ssl.create_default_context(cadata=self.ca_cert)
        path = Path(self.ca_cert)
        if not path.is_file():
            raise VCenterRefused(
                f"ca_cert {self.ca_cert!r} is neither PEM text nor a readable file.",
                "give the CA as PEM text, or the path of a file on the worker",
            )
        return ssl.create_default_context(cafile=str(path))

    def _connect_error(self, exc: BaseException) -> VCenterError:
        """What a failed connection means, in terms of the block's settings."""
        from pyVmomi import vim

        where = f"{self.host}:{self.port}"
        if isinstance(exc, vim.fault.HostConnectFault) and exc.__context__ is not None:
            # pyvmomi's log-in wraps the error of its first call, which is the context.
            exc = exc.__context__
        if isinstance(exc, ssl.SSLCertVerificationError):
            return VCenterRefused(
                f"TLS verification of {where} failed ({exc.verify_message}).",
                "give the vCenter CA in the block's ca_cert, or set verify_tls=False explicitly",
            )
        if isinstance(exc, vim.fault.InvalidLogin):
            return VCenterRefused(
                f"vCenter {where} refused the login of {self.username!r}; v2k does not try "
                "again, so the account is not locked out.",
                "check the user name and password in the VCenter block",
            )
        if isinstance(exc, TimeoutError):
            return VCenterUnreachable(
                f"vCenter {where} did not answer within {self.timeout:g} s (the VCenter "
                "block's timeout)"
            )
        return VCenterUnreachable(
            f"cannot reach vCenter {where}: {getattr(exc, 'msg', None) or exc}"
        )

    @contextmanager
    def connect(self) -> Iterator[object]:
        """Connect with pyvmomi and hand out the ServiceInstance; log out afterwards.

        Every call to vCenter, the first included, gives up after `timeout` seconds without
        an answer.

        Raises:
            VCenterError: TLS verification failed, the login was refused, the host cannot
                be reached or did not answer in time. The password never appears in the
                message.
        """
        from pyVim.connect import Connect, SmartConnect
        from pyVmomi import vim

        context = self.ssl_context()
        login = {
            "host": self.host,
            "port": self.port,
            "user": self.username,
            "pwd": self.password.get_secret_value(),
            "sslContext": context,
            # The socket timeout of every SOAP call.
            "httpConnectionTimeout": self.timeout,
        }
        server = (self.host, self.port)
        try:
            version = _api_versions.get(server) or _api_version(*server, context, self.timeout)
            if version:
                si = Connect(**login, version=version)
                _api_versions[server] = version
            else:
                # pyvmomi also knows older servers (vimService.wsdl); its probe has no timeout.
                si = SmartConnect(**login)
        except (
            OSError,
            http.client.HTTPException,
            vim.fault.InvalidLogin,
            vim.fault.HostConnectFault,
        ) as exc:
            raise self._connect_error(exc) from None
        try:
            yield si
        finally:
            try:
                service_content(si).sessionManager.Logout()
            except Exception:  # noqa: BLE001 - logging out of a dead session is not an error
                pass
            si._stub.DropConnections()


class InlineVCenter(BaseModel):
    """A vCenter or ESXi host given in the run itself instead of a saved VCenter block.

    The password is never a parameter (Prefect stores run parameters in plain text):
    give the name of a Prefect `Secret` block that holds it.
    """

    host: str = Field(description="Host name or IP address of vCenter or of the ESXi host.")
    port: int = Field(default=443, ge=1, le=65535)
    username: str
    password_secret: str = Field(
        description="Name of the Prefect Secret block that holds the password."
    )
    datacenter: str | None = Field(
        default=None, description="Empty: the only datacenter (`ha-datacenter` on ESXi)."
    )
    verify_tls: bool = True
    ca_cert: str | None = Field(default=None, description="CA as PEM text or a path.")

    def to_block(self) -> VCenter:
        """A VCenter block (not saved) with the password read from the Secret block."""
        from prefect.blocks.system import Secret

        password = Secret.load(self.password_secret).get()
        return VCenter(
            host=self.host,
            port=self.port,
            username=self.username,
            password=str(password),
            datacenter=self.datacenter,
            verify_tls=self.verify_tls,
            ca_cert=self.ca_cert,
        )
