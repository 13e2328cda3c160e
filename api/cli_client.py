"""The client commands of ``greentrainer``: files, models, estimates and jobs over HTTP (base URL from
``--url``/GT_API_URL, key from ``--api-key``/GT_API_KEY)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, get_args

import httpx

from api.client import ApiError, Client
from api.progress import duration, progress_line, watch


def _client(args: argparse.Namespace) -> Client:
    from api.config import get_settings

    settings = get_settings()
    key = args.api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
    return Client(args.url or str(settings.api_url), key)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _table(rows: list[list[Any]], header: list[str]) -> None:
    text = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    for row in text:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_files_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        f = client.upload_file(args.path, args.purpose, args.model)
    if args.json:
        _print_json(f)
        return 0
    tokens = f" {f['tokens']} tokens ({f['tokenizer']})," if f.get("tokens") is not None else ""
    print(f"uploaded {f['filename']}: {f['examples']} examples, {f['format']},{tokens} file id {f['id']}")
    return 0


def cmd_files_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_files(limit=args.limit)
    if args.json:
        _print_json(page)
        return 0
    _table(
        [[f["id"], f["filename"], f["format"], f["examples"], f["tokens"], f["bytes"]] for f in page["data"]],
        ["id", "filename", "format", "examples", "tokens", "bytes"],
    )
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_models()
    if args.json:
        _print_json(page)
        return 0
    _table(
        [[m["id"], m["architecture"], m["parameters"], m["tensors"]] for m in page["data"]],
        ["id", "architecture", "parameters", "tensors"],
    )
    return 0


def _job_body(args: argparse.Namespace) -> dict[str, Any]:
    from api.schemas.jobs import Hyperparameters

    hp = {
        name: getattr(args, name) for name in Hyperparameters.model_fields if getattr(args, name) is not None
    }
    body: dict[str, Any] = {  # OpenAI's body: the hyperparameters under the method object
        "model": args.model,
        "training_file": args.training_file,
        "method": {"type": args.method, args.method: {"hyperparameters": hp}},
        "seed": args.seed,
    }
    if getattr(args, "validation_file", None):
        body["validation_file"] = args.validation_file
    if getattr(args, "suffix", None):
        body["suffix"] = args.suffix
    return body


def basis_line(basis: dict | None) -> str:
    """What an estimate's time or energy rests on, in words (a server before calibration sends none)."""
    if not basis or basis["basis"] == "declared":
        return "declared device profile"
    return f"measured on {basis['epochs']} epochs ({basis['match']})"


def cmd_estimate(args: argparse.Namespace) -> int:
    body = _job_body(args)
    with _client(args) as client:
        est = client.estimate(body)
    if args.json:
        _print_json(est)
        return 0
    rho = f"{est['rho']:.3f}" if est["rho"] is not None else "--"
    print(
        f"{est['method']} on {est['model']}: {est['n_epochs']} epochs x {est['steps_per_epoch']} steps, "
        f"{est['tokens']} tokens per epoch; rho {rho} (rho_min {est['rho_min']:.3f})"
    )
    _table(
        [
            [
                k,
                f"{est['flops'][k]:.3e}",
                duration(est["time_s"][k]),
                f"{est['energy_j'][k]:.3g}",
                f"{est['gco2e'][k]:.3g}",
            ]
            for k in ("full", "method")
        ],
        ["", "flops", "time", "energy_j", "gco2e"],
    )
    print(f"FLOPs saved: {100 * est['flops_saved']:.1f}% ({est['basis']}) on device {est['device']['name']}")
    print(f"time: {basis_line(est.get('time_basis'))}; energy: {basis_line(est.get('energy_basis'))}")
    mem, gib = est["memory"], 2**30
    device = est["device"].get("memory_bytes")
    print(
        f"peak memory ({mem['device_type']}, {mem['basis']}): "
        f"{est['peak_memory_bytes']['method'] / gib:.3f} GiB "
        f"(training step {mem['method']['train_step_bytes'] / gib:.3f}, importance "
        f"{mem['method']['importance_bytes'] / gib:.3f}); full fine-tuning "
        f"{est['peak_memory_bytes']['full'] / gib:.3f} GiB"
        + (f"; device {device / gib:.3f} GiB" if device else "")
    )
    return 0


def cmd_jobs_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.create_job(_job_body(args))
        print(
            f"created job {job['id']} ({job['method']['type']}, rho {job['rho']}): {job['status']}",
            file=sys.stderr,
        )
        if args.wait:
            job = watch(client, job["id"], sys.stderr)
            _print_epochs(client, job["id"])
            if job.get("error"):
                print(f"error {job['error']['code']}: {job['error']['message']}", file=sys.stderr)
            print(f"job {job['status']}: {job['id']}")
            return 0 if job["status"] == "succeeded" else 1
    print(job["id"])
    return 0


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = watch(client, args.job_id, sys.stderr)
    return 0 if job["status"] == "succeeded" else 1


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_jobs(limit=args.limit, status=args.status)
    if args.json:
        _print_json(page)
        return 0
    rows = []
    for j in page["data"]:
        saved = j["flops"]["saved"]
        rows.append(
            [
                j["id"],
                j["status"],
                j["model"],
                j["method"]["type"],
                j["rho"],
                f"{100 * saved:.1f}%" if saved is not None else "",
                f"{j['energy_j']:.1f}",
            ]
        )
    _table(rows, ["id", "status", "model", "method", "rho", "flops_saved", "energy_j"])
    return 0


def _print_epochs(client: Client, job_id: str) -> None:
    epochs = client.epochs(job_id)["data"]
    rows = []
    for e in epochs:
        f = e["flops"]
        loss = f"{e['train_loss']:.4f}" if e["train_loss"] is not None else ""
        valid = f"{e['valid_loss']:.4f}" if e["valid_loss"] is not None else ""
        rows.append(
            [
                e["epoch"],
                len(e["selected_tensors"]),
                f"{f['total']:.3e}",
                f"{f['full']:.3e}",
                f"{e['rho_achieved']:.3f}",
                e["tokens"],
                f"{e['wall_s']:.1f}",
                loss,
                valid,
                f"{e['energy_j']:.3g}",
                e["energy_method"],
                f"{e['gco2e']:.3g}",
            ]
        )
    _table(
        rows,
        [
            "epoch",
            "tensors",
            "flops",
            "flops_full",
            "rho",
            "tokens",
            "wall_s",
            "train_loss",
            "valid_loss",
            "energy_j",
            "energy",
            "gco2e",
        ],
    )


def cmd_jobs_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job_id)
        if args.json:
            _print_json(job)
            return 0
        rho = f"{job['rho']:.4g}" if job["rho"] is not None else "--"
        rho_min = f"{job['rho_min']:.4f}" if job["rho_min"] is not None else "--"
        print(
            f"job {job['id']}: {job['status']}  model {job['model']}  method {job['method']['type']}  "
            f"rho {rho} (rho_min {rho_min})"
        )
        print(progress_line(job))
        if job.get("error"):
            print(f"error {job['error']['code']}: {job['error']['message']}")
        _print_epochs(client, job["id"])
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.job_id)
    print(f"job {job['id']}: {job['status']}")
    return 0


def cmd_jobs_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        checkpoints = client.all_checkpoints(args.job_id)
        chosen = [c for c in checkpoints if args.checkpoint in (c["id"], c["name"])]
        if not chosen:
            names = ", ".join(c["name"] for c in checkpoints) or "none yet"
            print(f"error: no checkpoint {args.checkpoint!r} (available: {names})", file=sys.stderr)
            return 2
        folder = client.download_checkpoint(args.job_id, chosen[0]["id"], args.output)
    print(f"downloaded {chosen[0]['name']} to {folder}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", default=None, help="API base URL (default GT_API_URL, else http://127.0.0.1:GT_PORT)"
    )
    p.add_argument("--api-key", default=None, help="API key (default GT_API_KEY)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")


def _job_options(p: argparse.ArgumentParser) -> None:
    """A job's options, from the API's schema: the methods registered in greencore, and one option per
    hyperparameter (``--n-epochs`` for ``n_epochs``) with its meaning; unset ones take the service's
    default."""
    from api.schemas.jobs import Hyperparameters
    from greencore.registry import DEFAULT_METHOD, METHODS
    from greencore.spec import BUDGET_FIELDS

    p.add_argument("--model", required=True, help="a base model id (greentrainer models list)")
    p.add_argument("--training-file", required=True, help="a file id (greentrainer files upload)")
    p.add_argument(
        "--method", default=DEFAULT_METHOD, choices=list(METHODS), help=f"default {DEFAULT_METHOD}"
    )
    budget = p.add_mutually_exclusive_group()
    for name, f in Hyperparameters.model_fields.items():
        group = budget if name in BUDGET_FIELDS else p
        flag = "--" + name.replace("_", "-")
        kind = next(t for t in get_args(f.annotation) or (f.annotation,) if t is not type(None))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.description)
        else:
            group.add_argument(flag, type=kind, default=None, help=f.description)
    p.add_argument("--seed", type=int, default=0)


def add_client_commands(sub: Any) -> None:
    """Register ``files``, ``models``, ``estimate`` and ``jobs`` on the top-level subparsers."""
    files = sub.add_parser("files", help="datasets").add_subparsers(dest="files_command", required=True)
    p = files.add_parser("upload", help="upload a JSONL dataset (validated line by line)")
    p.add_argument("path")
    p.add_argument("--purpose", default="fine-tune")
    p.add_argument("--model", default=None, help="count tokens with this model's tokenizer")
    _common(p)
    p.set_defaults(func=cmd_files_upload)
    p = files.add_parser("list", help="your files, newest first")
    p.add_argument("--limit", type=int, default=20)
    _common(p)
    p.set_defaults(func=cmd_files_list)

    models = sub.add_parser("models", help="base models").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="base models available")
    _common(p)
    p.set_defaults(func=cmd_models_list)

    p = sub.add_parser("estimate", help="FLOPs, time and energy of a job before it runs")
    _job_options(p)
    _common(p)
    p.set_defaults(func=cmd_estimate)

    jobs = sub.add_parser("jobs", help="fine-tuning jobs").add_subparsers(dest="jobs_command", required=True)
    p = jobs.add_parser("create", help="create a job (prints its id; --wait follows it)")
    _job_options(p)
    p.add_argument("--validation-file", default=None)
    p.add_argument("--suffix", default=None)
    p.add_argument("--wait", action="store_true", help="show a progress bar until the job ends")
    _common(p)
    p.set_defaults(func=cmd_jobs_create)
    p = jobs.add_parser("list", help="your jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--status", default=None)
    _common(p)
    p.set_defaults(func=cmd_jobs_list)
    for name, func, text in (
        ("get", cmd_jobs_get, "a job and its per-epoch table"),
        ("watch", cmd_jobs_watch, "a progress bar until the job ends"),
        ("cancel", cmd_jobs_cancel, "cancel a job"),
    ):
        p = jobs.add_parser(name, help=text)
        p.add_argument("job_id")
        _common(p)
        p.set_defaults(func=func)
    p = jobs.add_parser("download", help="download a checkpoint as a Hugging Face folder")
    p.add_argument("job_id")
    p.add_argument("--checkpoint", default="final", help="checkpoint id or name (final, epoch-N)")
    p.add_argument("--output", default=".", help="folder to unpack into")
    _common(p)
    p.set_defaults(func=cmd_jobs_download)


def run_client_command(func: Any, args: argparse.Namespace) -> int:
    """Run a client command; an API error prints its message and exits 1."""
    try:
        return func(args)
    except ApiError as exc:
        print(f"error: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:  # connection refused, timeouts
        print(f"error: cannot reach the API: {exc}", file=sys.stderr)
        return 1
