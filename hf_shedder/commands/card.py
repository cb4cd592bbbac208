"""``hf-shedder card DIR``: render README.md from the results files in DIR."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="pruned model directory holding shedder_search.json / eval_results.json / "
                   "speed_results.json / recovery.json (any that exist)")
    p.add_argument("--repo", default=None, help="repository id to show in the loading examples (user/name)")
    p.add_argument("--print", dest="print_card", action="store_true", help="also print the card")


def run(args: argparse.Namespace) -> int:
    from ..hub import write_model_card

    path = write_model_card(args.model_dir, repo_id=args.repo)
    if args.print_card:
        print(path.read_text())
    print(f"wrote {path}")
    return 0
