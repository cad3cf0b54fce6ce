"""Prefect blocks of v2k. Register them with `prefect block register -m blocks`."""

from blocks.kvm import KvmCluster, KvmHost, KvmHostError
from blocks.settings import MigrationSettings, StagePolicy
from blocks.storage import TemporaryStorage
from blocks.vcenter import VCenter, VCenterError

__all__ = [
    "KvmCluster",
    "KvmHost",
    "KvmHostError",
    "MigrationSettings",
    "StagePolicy",
    "TemporaryStorage",
    "VCenter",
    "VCenterError",
]
