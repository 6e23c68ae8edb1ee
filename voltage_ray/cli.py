"""The `voltage-ray` command: manage API keys and start the service.

voltage-ray keys create --plan free --name alice   # prints the key once, as the last line
voltage-ray keys list
voltage-ray keys revoke KEY_OR_ID
voltage-ray usage [KEY_OR_ID]                      # this month's usage against each limit
voltage-ray serve [--config serve_config.yaml] [--metrics-port 8080]  # `serve run`, tuned
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import cast

from voltage_ray.config import SERVE_PROXY_ENV, default_db_path, default_plans_path
from voltage_ray.limits.keys import KeyStore
from voltage_ray.limits.plans import Plan, load_plans

# Environment defaults for `voltage-ray serve` (explicit values in the environment win): Serve's
# fast path for any config, with streaming, composition and errors all working.
DEFAULT_METRICS_PORT = 8080
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DRAIN_POLL_S = 0.2
SERVE_ENV_DEFAULTS = {
    **SERVE_PROXY_ENV,
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
    usage.ensure_schema(store.db)
    rows = usage.period_usage(store.db, period)
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
    """`serve run CONFIG` in this process, on a Ray started here with a fixed metrics port.

    Without ``--address`` (or RAY_ADDRESS) it starts a local Ray whose Prometheus endpoint is
    ``--metrics-port``; with one, it joins that cluster, whose nodes export metrics on the port
    their ``ray start --metrics-export-port`` chose. SIGTERM (and Ctrl-C) shut Serve down
    gracefully: each replica finishes its requests in flight (up to its
    ``graceful_shutdown_timeout_s``), the ingress delivers pending usage to the limiter and the
    limiter writes it, then Ray stops.
    """
    for name, value in SERVE_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.scripts import run as serve_run

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address in (None, "", "local"):
        ray.init(
            address="local",
            namespace=SERVE_NAMESPACE,
            _metrics_export_port=args.metrics_port,
            include_dashboard=False if args.no_dashboard else None,
        )
        print(f"voltage-ray: Prometheus metrics on http://127.0.0.1:{args.metrics_port}/metrics")
    else:
        ray.init(address=address, namespace=SERVE_NAMESPACE)
        print(
            f"voltage-ray: joined the Ray cluster at {address}; its nodes export metrics on the "
            "port of their `ray start --metrics-export-port`",
            file=sys.stderr,
        )

    # Ray's own SIGTERM handler exits at once, cutting requests in flight; `serve run` shuts
    # Serve down on KeyboardInterrupt. Drain first, then let it.
    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the drain
        drain(args.drain_timeout_s)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        serve_run.main(args=[args.config, *args.serve_args], standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    ray.shutdown()
    print("voltage-ray: stopped", file=sys.stderr)
    return code


def drain(timeout_s: float) -> None:
    """Refuse new requests (503 with Retry-After), wait up to ``timeout_s`` for the requests and
    streams in flight to finish, then have the limiter write usage. Requests still running after
    that are cut by Serve's shutdown."""
    import ray

    from voltage_ray.limits.limiter import ACTOR_NAME, NAMESPACE

    started = time.monotonic()
    try:
        limiter = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        in_flight = cast(int, ray.get(limiter.drain.remote(), timeout=10))
        print(f"voltage-ray: draining {in_flight} request(s) in flight", file=sys.stderr)
        while in_flight and time.monotonic() - started < timeout_s:
            time.sleep(DRAIN_POLL_S)
            in_flight = cast(int, ray.get(limiter.in_flight.remote(), timeout=10))
        ray.get(limiter.flush.remote(), timeout=30)
    except Exception as exc:  # no limiter (limits disabled) or it is gone: nothing to wait for
        print(f"voltage-ray: drain skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return
    left = f", {in_flight} cut" if in_flight else ""
    print(
        f"voltage-ray: drained in {time.monotonic() - started:.1f} s{left}; usage written",
        file=sys.stderr,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voltage-ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--db",
        help="an SQLite path or a PostgreSQL DSN (default: $VOLTAGE_DB, else the default path)",
    )
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
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("VOLTAGE_METRICS_PORT", DEFAULT_METRICS_PORT)),
        help="Prometheus endpoint of the Ray started here (default 8080, $VOLTAGE_METRICS_PORT)",
    )
    serve.add_argument(
        "--address", help="join this Ray cluster instead of starting one ($RAY_ADDRESS)"
    )
    serve.add_argument(
        "--drain-timeout-s",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="on SIGTERM/Ctrl-C, how long requests in flight may finish (default 30)",
    )
    serve.add_argument(
        "--no-dashboard", action="store_true", help="skip Ray's dashboard (port 8265)"
    )
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
