"""`tailor runs` and `tailor compare`: the run registry on the command line (track/registry.py, ops/compare.py)."""
from __future__ import annotations

import argparse


def register(verbs) -> None:
    runs = verbs.add_parser("runs", help="list past runs: status, task, method, model, headline metric vs prompting",
                            description="List the run directories under DIR (one or two levels deep), oldest first. "
                                        "A 'running' run whose process is gone shows as 'interrupted'.")
    runs.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="where the runs are (default: runs)")
    runs.add_argument("--json", action="store_true", help="print the list as JSON, for scripts")
    runs.set_defaults(handler=list_runs)

    compare = verbs.add_parser("compare", help="compare runs side by side: config differences, metrics, curves",
                               description="Print and save (compare.md, compare.json, curves.png) a side-by-side "
                                           "comparison of two or more run directories.")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories (at least two)")
    compare.add_argument("--output", "-o", help="where to save the comparison (default: compare-<timestamp>)")
    compare.set_defaults(handler=compare_runs)


def list_runs(args: argparse.Namespace) -> int:
    # Lazy on purpose: cli.py imports this module to build its parser on every `tailor` call; the verb's own
    # imports (torch, transformers, optuna, rich) load only when it runs.
    import json
    import sys
    from pathlib import Path

    from tailorlm.track.registry import find_runs, print_listing

    records = find_runs(Path(args.dir))
    if args.json:
        sys.stdout.write(json.dumps([r.summary() for r in records], indent=2, ensure_ascii=False) + "\n")
    else:
        print_listing(records, Path(args.dir))
    return 0


def compare_runs(args: argparse.Namespace) -> int:
    # Lazy on purpose: cli.py imports this module to build its parser on every `tailor` call; the verb's own
    # imports (torch, transformers, optuna, rich) load only when it runs.
    from datetime import datetime
    from pathlib import Path

    from tailorlm.ops.compare import compare
    from tailorlm.track.compare import print_comparison, write_comparison
    from tailorlm.ui import console

    comparison = compare(args.runs)
    out_dir = Path(args.output) if args.output else Path(f"compare-{datetime.now():%Y%m%d-%H%M%S}")
    written = write_comparison(comparison, out_dir)
    print_comparison(comparison)
    console.print(f"Saved {', '.join(p.name for p in written)} in {out_dir}/")
    return 0
