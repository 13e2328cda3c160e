"""The ``greentrainer`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _fmt(flops: float) -> str:
    return f"{flops:.3e}"


def cmd_profile(args: argparse.Namespace) -> int:
    from greencore.models import ModelFolderError, meta_model
    from greencore.profile import ProfileError, profile_model

    try:
        model = meta_model(args.model_dir)
        profile = profile_model(model, args.batch_size, args.seq_len, args.target_len)
    except (ModelFolderError, ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    full = profile.full
    width = max(len(n) for n in profile.names)
    print(f"{'tensor':<{width}}  {'bwd_weight_flops':>16}  {'bwd_act_flops_to_reach':>22}  {'step_share':>10}")
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greentrainer", description="GreenTrainer as a service")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="per-tensor FLOPs of one training step of a model folder")
    p.add_argument("model_dir", help="a Hugging Face model folder (config.json is enough)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--target-len", type=int, default=None, help="decoder length of encoder-decoder models")
    p.set_defaults(func=cmd_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
