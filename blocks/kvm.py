"""KVM host and cluster blocks: where converted VMs are made, and how to reach those hosts."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlencode

import paramiko
from fabric import Connection
from invoke import Context
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator, model_validator

from blocks.cache import LoadedOnce
from tasks.errors import Refused


class KvmHostError(Refused):
    """A KVM host block is incomplete, or its host refused the SSH login or showed another
    host key: the user must fix the block or the host, so it is never retried. (A host
    that does not answer is a plain connection error, which is retried.)"""


class _CheckedConnection(Connection):
    """A fabric Connection whose refused SSH login says so, with the fix, as KvmHostError."""

    def open(self):
        where = f"{self.user}@{self.host}:{self.port}"
        try:
            return super().open()
        except paramiko.BadHostKeyException as exc:
            raise KvmHostError(
                f"SSH host key of {where} is not the one in known_hosts (it shows a "
                f"{exc.key.get_name()} key); v2k does not go on to a host it cannot identify.",
                "if the host was reinstalled, put its new key into the KvmHost block's "
                "known_hosts; if not, find out what answers at that address",
            ) from None
        except paramiko.AuthenticationException as exc:
            raise KvmHostError(
                f"{where} refused the SSH login ({exc}).",
                "check the KvmHost block's private key or password, and the user's "
                "authorized_keys on the host",
            ) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" not in str(exc):
                raise
            raise KvmHostError(
                f"SSH host key of {where} is not in known_hosts.",
                "add the host's key to the KvmHost block's known_hosts, or set "
                "host_key_policy to accept-new to trust it on first use",
            ) from None


class KvmHost(LoadedOnce, Block):
    """One KVM host reached over SSH, with virt-v2v, qemu-img, nbdkit and libvirt installed.

    Host keys are checked against `known_hosts` by default; a host that is not listed,
    or shows another key, is refused.

    Example:
        ```python
        from blocks import KvmHost

        KvmHost(
            address="kvm1.example.com",
            private_key=open("/root/.ssh/v2k_ed25519").read(),
            known_hosts="kvm1.example.com ssh-ed25519 AAAA...",
        ).save("kvm1")

        result = KvmHost.load("kvm1").get_connection().run("virt-v2v --version", hide=True)
        ```
    """

    _block_type_name = "v2k KVM Host"
    _block_type_slug = "v2k-kvm-host"
    _description = "A KVM host reached over SSH that converts and runs migrated VMs."

    address: str = Field(description="Host name or IP address of the KVM host's SSH server.")
    port: int = Field(default=22, ge=1, le=65535, description="SSH port.")
    user: str = Field(default="root", description="SSH user; needs libvirt and disk access.")
    private_key: SecretStr | None = Field(
        default=None, description="Private key for SSH, as OpenSSH PEM text."
    )
    private_key_path: str | None = Field(
        default=None, description="Path of the private key file on the worker, instead of text."
    )
    password: SecretStr | None = Field(
        default=None, description="SSH password, when no key is used."
    )
    known_hosts: str | None = Field(
        default=None,
        description=(
            "known_hosts lines for this host, or a path to a known_hosts file on the worker. "
            "Empty: the worker's ~/.ssh/known_hosts."
        ),
    )
    host_key_policy: Literal["reject", "warn", "accept-new"] = Field(
        default="reject",
        description=(
            "What to do with a host whose key is not in known_hosts: `reject` (default), "
            "`warn` and go on, or `accept-new` (trust on first use). A changed key is always "
            "refused."
        ),
    )
    enabled: bool = Field(default=True, description="Disabled hosts are never chosen.")
    libvirt_uri: str | None = Field(
        default=None,
        description=(
            "libvirt URI of this host as seen from the worker. Empty: qemu+ssh to the host "
            "with this block's key and known_hosts."
        ),
    )
    workdir: str = Field(
        default="/var/tmp/v2k",
        description="Directory on the host for conversion output and temporary files.",
    )
    virtio_win: str = Field(
        default="/usr/share/virtio-win",
        description=(
            "Path of the virtio-win drivers (directory or ISO) on the host; virt-v2v needs "
            "them to convert Windows guests."
        ),
    )
    domain_type: Literal["auto", "kvm", "qemu"] = Field(
        default="auto",
        description=(
            "Domain type of imported VMs: `kvm`, `qemu` (software emulation), or `auto` "
            "(kvm when libvirt reports it for x86_64)."
        ),
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Environment for v2k's commands on this host, e.g. "
            "LIBGUESTFS_BACKEND_SETTINGS=force_tcg where KVM cannot run the appliance."
        ),
    )
    local: bool = Field(
        default=False,
        description="The host is the machine the worker runs on: commands run locally, no SSH.",
    )
    connect_timeout: float = Field(default=15, gt=0, description="Seconds to open SSH.")

    @field_validator("address")
    @classmethod
    def _address_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("address is empty: give the KVM host's name or IP address")
        return value.strip()

    @model_validator(mode="after")
    def _one_credential(self) -> KvmHost:
        given = [
            name
            for name in ("private_key", "private_key_path", "password")
            if getattr(self, name) is not None
        ]
        if not self.local and len(given) != 1:
            which = " and ".join(given) if given else "none"
            raise ValueError(
                f"give exactly one of private_key, private_key_path or password (given: {which})"
            )
        return self

    def _pkey(self) -> paramiko.PKey | None:
        if self.private_key is None:
            return None
        text = self.private_key.get_secret_value()
        for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return key_class.from_private_key(io.StringIO(text))
            except paramiko.SSHException:
                continue
        raise KvmHostError(f"private_key of host {self.address} is not an OpenSSH private key")

    def _known_hosts_file(self) -> bool:
        """Whether `known_hosts` names a file (else it holds the lines themselves)."""
        value = (self.known_hosts or "").strip()
        return bool(value) and "\n" not in value and Path(value).is_file()

    def _load_known_hosts(self, client: paramiko.SSHClient) -> None:
        source = self.known_hosts
        if source is None:
            default = Path.home() / ".ssh" / "known_hosts"
            if default.is_file():
                client.load_host_keys(str(default))
            return
        if self._known_hosts_file():
            client.load_host_keys(source)
            return
        keys = client.get_host_keys()
        for line in source.splitlines():
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
            if entry is not None:
                for hostname in entry.hostnames:
                    keys.add(hostname, entry.key.get_name(), entry.key)

    def get_connection(self) -> Connection | Context:
        """A fabric Connection to the host with its host key checked (invoke Context if local).

        Opening it raises KvmHostError when the login is refused or the host key is
        unknown or changed.
        """
        if self.local:
            return Context()
        connect_kwargs: dict = {
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": self.connect_timeout,
            "auth_timeout": self.connect_timeout,
        }
        if self.private_key is not None:
            connect_kwargs["pkey"] = self._pkey()
        elif self.private_key_path is not None:
            connect_kwargs["key_filename"] = self.private_key_path
        else:
            connect_kwargs["password"] = self.password.get_secret_value()
        conn = _CheckedConnection(
            host=self.address,
            port=self.port,
            user=self.user,
            connect_timeout=int(self.connect_timeout),
            connect_kwargs=connect_kwargs,
        )
        policy = {
            "reject": paramiko.RejectPolicy,
            "warn": paramiko.WarningPolicy,
            "accept-new": paramiko.AutoAddPolicy,
        }[self.host_key_policy]
        conn.client.set_missing_host_key_policy(policy())
        self._load_known_hosts(conn.client)
        return conn

    def get_libvirt_uri(self) -> str:
        """The libvirt URI of this host: `libvirt_uri` if set, else qemu+libssh2 with this key.

        libvirt's libssh2 transport reads the key file and known_hosts named in the URI and
        refuses an unknown or changed host key (`known_hosts_verify=normal`); the plain
        `qemu+ssh` transport would ignore both and use the worker's ~/.ssh instead. (The
        libssh transport of libvirt 9.0 hangs on replies of a few KiB.)

        Raises:
            KvmHostError: no URI can be derived (a key given as text, or a password).
        """
        if self.libvirt_uri:
            return self.libvirt_uri
        if self.local:
            return "qemu:///system"
        if not self.private_key_path:
            raise KvmHostError(
                f"host {self.address}: set libvirt_uri, or use private_key_path, so libvirt "
                "can reach the host over SSH"
            )
        params = {"keyfile": self.private_key_path, "sshauth": "privkey"}
        if self._known_hosts_file():
            params["known_hosts"] = self.known_hosts
        params["known_hosts_verify"] = "normal" if self.host_key_policy == "reject" else "auto"
        query = urlencode(params, safe="/")
        return f"qemu+libssh2://{quote(self.user)}@{self.address}:{self.port}/system?{query}"


class KvmCluster(LoadedOnce, Block):
    """A group of KVM hosts that VMs migrate to, with the maps from VMware names to libvirt ones.

    The hosts are named, not nested: each is its own KvmHost block, so its secrets stay masked.

    Example:
        ```python
        from blocks import KvmCluster

        KvmCluster(
            hosts=["kvm1", "kvm2"],
            storage_pool="default",
            network_map={"VM Network": "network:default", "DPortGroup": "bridge:br0"},
        ).save("kvm-prod")
        ```
    """

    _block_type_name = "v2k KVM Cluster"
    _block_type_slug = "v2k-kvm-cluster"
    _description = "KVM hosts that migrated VMs land on, with network and storage maps."

    hosts: list[str] = Field(description="Names of the KvmHost blocks of this cluster.")
    enabled: bool = Field(default=True, description="A disabled cluster takes no migrations.")
    storage_pool: str = Field(
        default="default", description="libvirt storage pool that receives the converted disks."
    )
    storage_map: dict[str, str] = Field(
        default_factory=dict,
        description="VMware datastore name to libvirt storage pool; others go to storage_pool.",
    )
    network_map: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "VMware port group to `network:NAME` (libvirt network) or `bridge:NAME` (host bridge)."
        ),
    )
    default_network: str | None = Field(
        default=None,
        description="Where NICs on unmapped port groups go (`network:NAME` or `bridge:NAME`).",
    )

    @field_validator("hosts")
    @classmethod
    def _hosts_listed(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("a cluster needs at least one KvmHost block name")
        if len(set(value)) != len(value):
            raise ValueError(f"a host is listed twice in {value}")
        return value

    @field_validator("network_map")
    @classmethod
    def _targets_typed(cls, value: dict[str, str]) -> dict[str, str]:
        for portgroup, target in value.items():
            kind, _, name = target.partition(":")
            if kind not in ("network", "bridge") or not name:
                raise ValueError(
                    f"network_map[{portgroup!r}] = {target!r}: write network:NAME or bridge:NAME"
                )
        return value

    def load_hosts(self) -> dict[str, KvmHost]:
        """Load every KvmHost block this cluster names.

        Raises:
            KvmHostError: a named block does not exist.
        """
        hosts: dict[str, KvmHost] = {}
        for name in self.hosts:
            try:
                hosts[name] = KvmHost.load(name)
            except ValueError as exc:
                raise KvmHostError(
                    f"the cluster names KvmHost block {name!r}, which does not exist "
                    f"(save it first): {exc}"
                ) from None
        return hosts
