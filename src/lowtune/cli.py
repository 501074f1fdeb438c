"""`lowtune` command line: argparse wiring, one small function per verb, heavy imports inside the functions.

Top layer. `lowtune --help` must not import torch or transformers (a test checks it).
Exit codes: 0 ok, 2 user error (one line naming the file/key/row and the fix), 1 internal failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lowtune import __version__
from lowtune.errors import UserError

Handler = Callable[[argparse.Namespace], int | None]


# --- recipes ------------------------------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    from lowtune.config import recipe_names, recipe_text

    names = [n for n in recipe_names() if not args.pattern or args.pattern.lower() in n.lower()]
    if not names:
        raise UserError(f"no recipe matches '{args.pattern}'; `lowtune list` shows all")
    width = max(len(n) for n in names)
    for name in names:
        lines = recipe_text(name).splitlines()
        about = next((ln.lstrip("# ").strip() for ln in lines[1:3] if ln.startswith("#")), "")
        print(f"{name:<{width}}  {about}")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from lowtune.config import recipe_text

    text = recipe_text(args.recipe)
    dest = Path(args.dest or f"{Path(args.recipe).stem}.yaml")
    if dest.is_dir():
        dest = dest / f"{Path(args.recipe).stem}.yaml"
    if dest.exists() and not args.force:
        raise UserError(f"{dest} already exists; pick another name or add --force")
    dest.write_text(text, encoding="utf-8")
    print(f"wrote {dest}  (train it: lowtune train {dest})")
    return 0


# --- environment --------------------------------------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from lowtune.doctor import run_doctor

    return run_doctor(timeout=args.timeout)


# --- after training -----------------------------------------------------------------------------------------------

def cmd_merge(args: argparse.Namespace) -> int:
    from lowtune.export.merge import merge

    result = merge(args.target, args.output, base=args.base, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   force=args.force)
    print(f"merged {args.target} -> {result.out_dir} ({result.dtype}, {result.shards} safetensors shard(s), "
          f"stop ids {result.stop_ids}, {result.seconds:.1f}s)")
    print(f"chat with it: lowtune chat {result.out_dir}")
    return 0


# --- wiring -------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowtune", description="Low-cost fine-tuning of chat LLMs, from dataset to deployed model.")
    parser.add_argument("--version", action="version", version=f"lowtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def verb(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = verb("doctor", cmd_doctor, "versions, GPU/VRAM/bf16, 4-bit self-test, hub reachability, offline state")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per hub reachability check (default 3)")

    p = verb("list", cmd_list, "list the recipes shipped with lowtune")
    p.add_argument("pattern", nargs="?", help="only names containing this text")

    p = verb("copy", cmd_copy, "copy a shipped recipe to an editable YAML file")
    p.add_argument("recipe")
    p.add_argument("dest", nargs="?", help="file or folder (default ./RECIPE.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")

    p = verb("merge", cmd_merge, "merge a LoRA/QLoRA adapter into a full-precision copy of its base (HF folder)")
    p.add_argument("target", metavar="RUN|ADAPTER", help="run folder or PEFT adapter folder")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the merged model")
    p.add_argument("--base", metavar="PATH", help="base model (default: from the run's config or adapter_config.json)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights dtype (default: as the base is stored)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in lowtune or a library: keep the traceback for the report
        import traceback

        traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (please report it with `lowtune doctor` output)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
