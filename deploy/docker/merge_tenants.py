"""Merge per-tenant entries into one tenants file for `pema-coordinator serve --tenants`.

Each tenant's kustomize component adds one key `<id>.json` to the `coordinator-tenants` Secret
(`{"id": …, "token_sha256": …, "limits": {…}}`: a hash, never a token), so adding a tenant never
edits another's file. The coordinator's init container runs:

    python /opt/pema/merge_tenants.py /etc/pema/tenants.d /run/pema/tenants.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def merge(src: Path) -> dict[str, list[dict[str, object]]]:
    tenants: dict[str, dict[str, object]] = {}
    for f in sorted(src.glob("*.json")):  # Secret volumes also hold ..data links: *.json only
        entry = json.loads(f.read_text())
        entries = entry.get("tenants", [entry])
        for e in entries:
            if e["id"] in tenants:
                raise SystemExit(f"merge_tenants: tenant {e['id']!r} appears twice ({f.name})")
            tenants[e["id"]] = e
    if not tenants:
        raise SystemExit(f"merge_tenants: no *.json tenant entries in {src}")
    return {"tenants": [tenants[k] for k in sorted(tenants)]}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: merge_tenants.py SRC_DIR OUT_FILE", file=sys.stderr)
        return 2
    out = Path(argv[1])
    merged = merge(Path(argv[0]))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"merge_tenants: {len(merged['tenants'])} tenants -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
