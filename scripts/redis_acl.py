"""Create, show or delete the Redis ACL user of a tenant (`pema-{tenant}`, keys `pema:{tenant}:*`).

python scripts/redis_acl.py create kjv-a            # prints the tenant's redis-url
python scripts/redis_acl.py rules kjv-a --password P # an ACL file line, for users.acl / Secrets
python scripts/redis_acl.py delete kjv-a
"""

from __future__ import annotations

import argparse
import secrets
import sys
from urllib.parse import urlsplit

import redis

from tenant.redis_store import tenant_acl_rules


def user_name(tenant: str) -> str:
    return f"pema-{tenant}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("action", choices=["create", "rules", "delete"])
    p.add_argument("tenant")
    p.add_argument("--password", help="default: a new random one")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="an admin connection")
    args = p.parse_args()
    password = args.password or secrets.token_urlsafe(24)
    rules = tenant_acl_rules(args.tenant, password)
    if args.action == "rules":
        print(f"user {user_name(args.tenant)} " + " ".join(r for r in rules if r != "reset"))
        return 0
    client = redis.Redis.from_url(args.redis_url)
    if args.action == "delete":
        client.execute_command("ACL", "DELUSER", user_name(args.tenant))
        return 0
    client.execute_command("ACL", "SETUSER", user_name(args.tenant), *rules)
    host = urlsplit(args.redis_url)
    print(f"redis://{user_name(args.tenant)}:{password}@{host.hostname}:{host.port or 6379}/0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
