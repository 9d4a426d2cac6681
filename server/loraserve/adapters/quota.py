"""What a tenant stores, and whether one more version fits its quota.

The store counts a tenant's `StoredUsage` from its index and asks `check_room` under its lock,
both before an upload's bytes arrive (from the sizes the header declares) and again when the
version is placed (from the sizes written), so concurrent uploads cannot pass the quota
together. Messages say which limit, the figures, and what to delete.

Knows nothing about the disk layout or keys files: a `TenantQuota` arrives as a value.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.types import QuotaExceededError, TenantQuota


@dataclass(frozen=True)
class StoredUsage:
    """One tenant's stored adapters: names, versions over all names, bytes of their files."""

    adapters: int
    versions: int
    stored_bytes: int


def check_room(
    tenant: str, usage: StoredUsage, quota: TenantQuota, new_name: bool, added_bytes: int
) -> None:
    """Raise QuotaExceededError when one more version of `added_bytes` (of a name the tenant
    does not store yet when `new_name`) would exceed `quota`."""
    if quota.max_adapters is not None and new_name and usage.adapters >= quota.max_adapters:
        raise QuotaExceededError(
            f"tenant {tenant} stores {usage.adapters} adapters and its quota allows "
            f"{quota.max_adapters} (max_adapters); delete an adapter before uploading a new name"
        )
    if quota.max_versions is not None and usage.versions >= quota.max_versions:
        raise QuotaExceededError(
            f"tenant {tenant} stores {usage.versions} adapter versions and its quota allows "
            f"{quota.max_versions} (max_versions); delete old versions before uploading another"
        )
    limit = quota.max_stored_bytes
    if limit is not None and usage.stored_bytes + added_bytes > limit:
        raise QuotaExceededError(
            f"this upload's {added_bytes} bytes would take tenant {tenant}'s stored adapters to "
            f"{usage.stored_bytes + added_bytes} bytes, above its quota of {limit} bytes "
            "(max_stored_bytes); delete versions to make room"
        )
