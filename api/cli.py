"""The ``greentrainer`` command: the service (serve, worker, migrate, keys), the client (files, models,
estimate, jobs), ``train`` (a run without the service) and ``profile``. Imports stay inside the commands, so
that ``--help`` and ``migrate`` start fast."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime


def _fmt(flops: float) -> str:
    return f"{flops:.3e}"


def cmd_profile(args: argparse.Namespace) -> int:
    from greencore.models import ModelFolderError, meta_model
    from greencore.profile import ProfileError, gradient_checkpointing, profile_model

    try:
        model = meta_model(args.model_dir)
        with gradient_checkpointing(model, args.gradient_checkpointing or None):
            profile = profile_model(model, args.batch_size, args.seq_len, args.target_len)
    except (ModelFolderError, ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    full = profile.full
    width = max(len(n) for n in profile.names)
    print(
        f"{'tensor':<{width}}  {'bwd_weight_flops':>16}  {'bwd_act_flops_to_reach':>22}  {'step_share':>10}"
    )
    for name in profile.names:
        alone = profile.tensor_flops(name)
        share = alone.total / full.total
        print(f"{name:<{width}}  {_fmt(alone.bwd_weight):>16}  {_fmt(alone.bwd_act):>22}  {share:>10.4f}")
    print()
    print(f"tensors: {len(profile.names)}  batch: {args.batch_size} x {args.seq_len} tokens")
    print(
        f"full step FLOPs: {_fmt(full.total)} (fwd {_fmt(full.fwd)}, bwd_act {_fmt(full.bwd_act)}, "
        f"bwd_weight {_fmt(full.bwd_weight)})"
    )
    print(f"rho_min: {profile.rho_min:.4f}")
    if args.memory:  # always set (default cpu)
        from greencore.memory import train_step_bytes
        from greencore.spec import Hyperparameters

        shape = (args.batch_size, args.seq_len) + (
            (args.target_len or args.seq_len,) if args.target_len else ()
        )
        task = "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal_lm"
        device = args.memory
        hp = Hyperparameters(precision=args.precision, gradient_checkpointing=args.gradient_checkpointing)
        peak = train_step_bytes(model, [n for n, _ in model.named_parameters()], shape, task, hp, device)
        print(
            f"peak memory of a full fine-tuning step on {device} (precision {args.precision}, AdamW"
            f"{', gradient checkpointing' if args.gradient_checkpointing else ''}): "
            f"{peak / 2**30:.3f} GiB ({peak} bytes)"
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from api.config import get_settings
    from api.serve import serve

    settings = get_settings()
    return serve(
        settings, args.host or settings.host, args.port or settings.port, not args.no_worker, args.workers
    )


def cmd_worker(args: argparse.Namespace) -> int:
    # The worker runs as `python -m worker`: the API side never imports task code.
    os.execv(sys.executable, [sys.executable, "-m", "worker", *args.celery_args])


def cmd_migrate(args: argparse.Namespace) -> int:
    from api.config import get_settings
    from api.migrate import downgrade, upgrade

    settings = get_settings()
    settings.ensure_dirs()
    if args.downgrade:
        downgrade(settings.database_url, args.revision or "base")
    else:
        upgrade(settings.database_url, args.revision or "head")
    print(f"database migrated to {args.revision or ('base' if args.downgrade else 'head')}")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from api.config import get_settings
    from api.db import make_session_factory
    from api.keys import create_key

    sessions = make_session_factory(get_settings())
    with sessions() as session:
        key = create_key(session, args.tenant, args.name)
    print(f"created an API key for tenant {args.tenant} (shown once): {key}")
    return 0


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    if moment.tzinfo is None:  # SQLite gives naive datetimes: they are UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_keys_list(args: argparse.Namespace) -> int:
    from api.config import get_settings
    from api.db import make_session_factory
    from api.keys import KeyNotFound, list_keys

    sessions = make_session_factory(get_settings())
    with sessions() as session:
        try:
            keys = list_keys(session, args.tenant)
        except KeyNotFound as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    # Never the key nor its hash: the prefix is enough to tell keys apart and to revoke one.
    rows = [("id", "tenant", "name", "prefix", "created", "revoked")]
    rows += [
        (k.id, tenant, k.name or "-", k.prefix, _when(k.created_at), _when(k.revoked_at))
        for k, tenant in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from api.config import get_settings
    from api.db import make_session_factory
    from api.keys import KeyNotFound, revoke_key

    sessions = make_session_factory(get_settings())
    with sessions() as session:
        try:
            key, revoked = revoke_key(session, args.key)
        except KeyNotFound as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if revoked:
        print(f"revoked API key {key.id} ({key.prefix}...): it answers 401 from now on")
    else:
        print(f"API key {key.id} ({key.prefix}...) was already revoked at {_when(key.revoked_at)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from api.cli_client import add_client_commands
    from api.cli_train import add_train_command

    parser = argparse.ArgumentParser(prog="greentrainer", description="GreenTrainer as a service")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="migrate, then serve the API with one embedded worker")
    p.add_argument("--port", type=int, default=None, help="default GT_PORT, else 8000")
    p.add_argument("--host", default=None, help="default GT_HOST, else 127.0.0.1")
    p.add_argument("--no-worker", action="store_true", help="serve the API only")
    p.add_argument("--workers", type=int, default=1, help="API processes (uvicorn workers)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run one Celery worker (one job at a time)")
    p.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed on to `celery worker`")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="apply the database migrations (alembic upgrade head)")
    p.add_argument(
        "--revision", default=None, help="target revision (default head, or base with --downgrade)"
    )
    p.add_argument("--downgrade", action="store_true", help="migrate down instead")
    p.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("create", help="create an API key for a tenant (printed as the last word)")
    p.add_argument("--tenant", required=True, help="tenant name (created if new)")
    p.add_argument("--name", default="", help="a label for the key")
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list", help="API keys: id, tenant, name, prefix, created, revoked (never the key)")
    p.add_argument("--tenant", default=None, help="only this tenant's keys")
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke a key: from the next request on it answers 401")
    p.add_argument(
        "key", metavar="KEY_ID_OR_PREFIX_OR_KEY", help="the key's id or prefix (see `keys list`), or the key"
    )
    p.set_defaults(func=cmd_keys_revoke)

    add_client_commands(sub)
    add_train_command(sub)

    p = sub.add_parser("profile", help="per-tensor FLOPs of one training step of a model folder")
    p.add_argument("model_dir", help="a Hugging Face model folder (config.json is enough)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--target-len", type=int, default=None, help="decoder length of encoder-decoder models")
    p.add_argument(
        "--memory",
        choices=("cpu", "cuda"),
        default="cpu",
        help="the device type the peak memory of a full fine-tuning step is replayed for (fake tensors)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16-mixed", "bf16"), default="fp32")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="checkpoint every transformer layer (the recompute is counted in the FLOPs)",
    )
    p.set_defaults(func=cmd_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from api.cli_client import run_client_command

    args = build_parser().parse_args(argv)
    if args.command in ("files", "models", "estimate", "jobs"):
        return run_client_command(args.func, args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
