"""Cloudflare Workers KV as the nodes' shared truth: the REST client with its retry policy
(`client`), the settings (`settings`), a sync pass and its loop (`sync`), and the KV-backed target
of the admin operations (`target`)."""

from store.cloudflare.client import (
    BULK_GET,
    BULK_PUT,
    LIST_PAGE,
    MAX_RETRY_AFTER_S,
    KVClient,
    KVError,
    RequestBudget,
    SyncError,
)
from store.cloudflare.progress import progress_reporter
from store.cloudflare.settings import (
    DEFAULT_API_BASE,
    CloudflareSettings,
    SyncSettings,
    load_sync_settings,
)
from store.cloudflare.sync import (
    REJECTED_KEPT,
    STAMP,
    USAGE_PREFIX,
    PassSummary,
    Replicator,
    previous_month,
    run_loop,
    stamp_of,
)
from store.cloudflare.target import CloudflareTarget, KVRecords, write_records

__all__ = [
    "BULK_GET",
    "BULK_PUT",
    "DEFAULT_API_BASE",
    "LIST_PAGE",
    "MAX_RETRY_AFTER_S",
    "REJECTED_KEPT",
    "STAMP",
    "USAGE_PREFIX",
    "CloudflareSettings",
    "CloudflareTarget",
    "KVClient",
    "KVError",
    "KVRecords",
    "PassSummary",
    "Replicator",
    "RequestBudget",
    "SyncError",
    "SyncSettings",
    "load_sync_settings",
    "previous_month",
    "progress_reporter",
    "run_loop",
    "stamp_of",
    "write_records",
]
