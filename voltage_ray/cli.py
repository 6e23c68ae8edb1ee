"""The `voltage-ray` command: manage API keys and start the service.

voltage-ray keys create --plan free --name alice   # prints the key once, as the last line
voltage-ray keys list
voltage-ray keys revoke KEY_OR_ID
voltage-ray usage [KEY_OR_ID]                      # this month's usage against each limit
voltage-ray serve [--config serve_config.yaml]     # `serve run` with this box's defaults
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
from collections.abc import Sequence

from voltage_ray.config import FAST_PROXY_ENV, default_db_path, default_plans_path
from voltage_ray.limits.keys import KeyStore
from voltage_ray.limits.plans import Plan, load_plans

# Environment defaults for `voltage-ray serve` (explicit values in the environment win): Serve's
# fast path for any config, with streaming, composition and errors all working.
SERVE_ENV_DEFAULTS = {
    **FAST_PROXY_ENV,
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _store(args: argparse.Namespace) -> KeyStore:
    return KeyStore(default_db_path(args.db))


def cmd_keys_create(args: argparse.Namespace) -> int:
    plans = load_plans(default_plans_path(args.plans))
    if args.plan not in plans:
        print(
            f"error: unknown plan {args.plan!r}; plans are: {', '.join(sorted(plans))}",
            file=sys.stderr,
        )
        return 2
    record, key = _store(args).create(args.plan, args.name or "")
    print(f"created key {record.id} (name {record.name or '-'}, plan {record.plan})")
    print("store it now: it is shown only this once")
    print(key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    rows = _store(args).list()
    header = f"{'id':<14}{'name':<20}{'plan':<14}{'created':<22}{'revoked':<22}"
    print(header)
    for r in rows:
        print(
            f"{r.id:<14}{(r.name or '-')[:19]:<20}{r.plan:<14}{_when(r.created_at):<22}"
            f"{_when(r.revoked_at):<22}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    record = _store(args).revoke(args.key_or_id)
    if record is None:
        print("error: no such key", file=sys.stderr)
        return 1
    print(f"revoked key {record.id} ({record.name or '-'}) at {_when(record.revoked_at)}")
    return 0


def _of(used: int, limit: int | None) -> str:
    if limit is None:
        return f"{used:,} / unlimited"
    pct = f" ({100 * used / limit:.1f}%)" if limit else ""
    return f"{used:,} / {limit:,}{pct}"


def cmd_usage(args: argparse.Namespace) -> int:
    """This period's usage per key, from the database (the limiter writes it every <= 1 s)."""
    import time

    from voltage_ray.limits import quota, usage

    store = _store(args)
    if args.key_or_id:
        record = store.resolve(args.key_or_id)
        if record is None:
            print("error: no such key", file=sys.stderr)
            return 1
        records = [record]
    else:
        records = store.list()
    plans = load_plans(default_plans_path(args.plans))
    now = time.time()
    period = quota.period_of(now)
    usage.ensure_schema(store.conn)
    rows = usage.period_usage(store.conn, period)
    print(f"period {period} (UTC), resets {_when(quota.period_end(now))}")
    print(f"{'id':<14}{'name':<16}{'plan':<12}{'requests':>10}  {'tokens':<30}{'images':<24}")
    for r in records:
        u = rows.get(r.id, quota.Usage(period))
        plan = plans.get(r.plan)
        limits = plan or Plan()
        name = ((r.name or "-") + (" (revoked)" if r.revoked else ""))[:15]
        tokens = _of(u.tokens, limits.tokens_per_month)
        images = _of(u.images, limits.images_per_month)
        print(
            f"{r.id:<14}{name:<16}{r.plan + ('' if plan else '?'):<12}{u.requests:>10,}  "
            f"{tokens:<30}{images:<24}"
        )
        if u.reserved_tokens or u.reserved_images:
            print(f"{'':<14}in flight: {u.reserved_tokens:,} tokens, {u.reserved_images} images")
        if plan is not None and args.key_or_id:
            rates = [
                f"{name} {getattr(plan, name)}"
                for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")
                if getattr(plan, name) is not None
            ]
            print(f"{'':<14}rate limits: {', '.join(rates) or 'none'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    for name, value in SERVE_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    serve_bin = shutil.which("serve") or os.path.join(os.path.dirname(sys.executable), "serve")
    argv = [serve_bin, "run", args.config, *args.serve_args]
    os.execv(serve_bin, argv)
    return 0  # not reached


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voltage-ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", help="SQLite database (default: $VOLTAGE_DB or ~/.local/share/...)")
    p.add_argument("--plans", help="plans.yaml (default: $VOLTAGE_PLANS or configs/plans.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_cmd", required=True
    )
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--plan", required=True)
    create.add_argument("--name", default="")
    create.set_defaults(func=cmd_keys_create)
    keys.add_parser("list", help="list keys (never the keys themselves)").set_defaults(
        func=cmd_keys_list
    )
    revoke = keys.add_parser("revoke", help="revoke a key by key or id")
    revoke.add_argument("key_or_id")
    revoke.set_defaults(func=cmd_keys_revoke)

    usage = sub.add_parser("usage", help="this month's usage against each plan limit")
    usage.add_argument("key_or_id", nargs="?", help="one key (or its id); default: every key")
    usage.set_defaults(func=cmd_usage)

    serve = sub.add_parser("serve", help="start the service (serve run CONFIG)")
    serve.add_argument("--config", default="serve_config.yaml")
    serve.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command != "serve":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.serve_args = extra  # `voltage-ray serve` hands the rest to `serve run`
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
