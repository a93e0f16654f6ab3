"""Admin operations over the store API: orgs, users, keys, usage, quota resets, bulk import/export.

Every operation returns a JSON-ready dict. The org, user and key operations, usage and quota
resets take any `store.target.AdminTarget` (the local `Store`, or the Cloudflare KV namespace with
`aigw --target cloudflare`); import, export, health and the demo take the local `Store`, whose
ledger and metadata they read. Records keep the Workers gateway's KV layout, so an export
can be bulk-put back into a KV namespace.

The operations live in `admin_accounts`, `admin_usage` and `admin_bulk` (what they share in
`admin_base`); this module names them all.
"""

from store.admin_accounts import (
    MAX_GRACE_S,
    KeyRef,
    check_grace_s,
    count_entities,
    create_key,
    create_org,
    create_user,
    create_user_with_key,
    create_vkey,
    delete_key,
    delete_user,
    find_key,
    find_vkey,
    key_layout_of,
    list_keys,
    list_orgs,
    list_users,
    list_vkeys,
    register_key,
    revoke_key,
    rotate_key,
    show_org,
    show_user,
    shown_vkey,
    update_key,
    update_org,
    update_user,
)
from store.admin_base import (
    DEFAULT_KEY_NAME,
    DEMO_META,
    LEVELS,
    REDACTED,
    AdminError,
    Conflict,
    NotFound,
    check_usd,
    new_id,
    now_iso,
    shown_provider_key,
)
from store.admin_bulk import (
    INVALID_SHOWN,
    count_redacted,
    ensure_demo,
    export_bulk,
    health,
    import_bulk,
    invalid_records,
    parse_bulk,
    redacted_provider_keys,
)
from store.admin_usage import level_usage, reset_quota
from store.records import USER_STATUSES
from store.target import AdminTarget

__all__ = [
    "DEFAULT_KEY_NAME",
    "DEMO_META",
    "INVALID_SHOWN",
    "LEVELS",
    "REDACTED",
    "USER_STATUSES",
    "AdminError",
    "AdminTarget",
    "Conflict",
    "NotFound",
    "MAX_GRACE_S",
    "KeyRef",
    "check_grace_s",
    "check_usd",
    "count_redacted",
    "create_key",
    "create_org",
    "create_user",
    "count_entities",
    "create_user_with_key",
    "delete_user",
    "create_vkey",
    "delete_key",
    "ensure_demo",
    "export_bulk",
    "find_key",
    "find_vkey",
    "health",
    "import_bulk",
    "invalid_records",
    "key_layout_of",
    "level_usage",
    "list_keys",
    "list_vkeys",
    "list_orgs",
    "list_users",
    "new_id",
    "now_iso",
    "parse_bulk",
    "redacted_provider_keys",
    "register_key",
    "reset_quota",
    "revoke_key",
    "rotate_key",
    "show_org",
    "show_user",
    "shown_vkey",
    "shown_provider_key",
    "update_key",
    "update_org",
    "update_user",
]
