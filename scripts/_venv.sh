# Sourced by the scripts: make sure .venv exists with Python >= 3.12 and the project installed.
# Usage: ensure_venv [EXTRAS]   (e.g. ensure_venv test)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
    local candidate
    # .python-version pins 3.12 for pyenv; fall back to any python >= 3.12 on PATH.
    if command -v pyenv >/dev/null 2>&1; then
        candidate="$(cd "$ROOT" && pyenv which python 2>/dev/null || true)"
        if [[ -n $candidate ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
            echo "$candidate"; return
        fi
    fi
    for candidate in python3.12 python3.13 python3.14 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$candidate"; return
        fi
    done
    echo "aigw needs Python >= 3.12 (mitmproxy 12); none found. Install it (pyenv install 3.12)." >&2
    return 1
}

ensure_venv() {
    local extras="${1:-}" target="$ROOT" stamp want
    [[ -n $extras ]] && target="$ROOT[$extras]"
    if [[ ! -x $VENV/bin/python ]] \
        || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        rm -rf "$VENV"
        "$(find_python)" -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml, constraints.txt or the extras changed: the scripts stay
    # idempotent and fast. constraints.txt pins every package to the versions last tested.
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)-$extras"
    stamp="$VENV/.aigw-installed"
    # An install with the test extras also serves the plain one.
    if [[ ! -f $stamp ]] || ! grep -qsx -- "$want" "$stamp" \
        && ! { [[ -z $extras ]] && grep -qsx -- "${want}test" "$stamp"; }; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            -c "$ROOT/constraints.txt" -e "$target" \
            2>&1 | grep -v "^WARNING: Location" >&2 || true
        "$VENV/bin/python" -c 'import mitmproxy, lmdb, blake3, yaml, orjson, msgspec, tenacity, click, brotli' \
            || { echo "aigw: installing the project failed" >&2; return 1; }
        echo "$want" >"$stamp"
    fi
}
