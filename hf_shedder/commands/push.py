"""``hf-shedder push DIR --repo user/name``: upload a pruned model folder with huggingface_hub."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="pruned model directory (with README.md: run `hf-shedder card DIR` first)")
    p.add_argument("--repo", required=True, help="target repository, user/name")
    p.add_argument("--token", default=None, help="write token (default: HF_TOKEN or the saved login)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--message", default="Upload model pruned with hf_shedder (Mamba-Shedder)")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded and stop")


def run(args: argparse.Namespace) -> int:
    from ..hub import files_to_upload, push_to_hub

    files = files_to_upload(args.model_dir)
    print(f"{len(files)} files from {args.model_dir}:")
    for name in files:
        print(f"  {name}")
    if args.dry_run:
        return 0
    url = push_to_hub(args.model_dir, args.repo, token=args.token, private=args.private, commit_message=args.message)
    print(f"pushed to {url}")
    return 0
