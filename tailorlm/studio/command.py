"""`tailor studio`: the local web app, from a table to a fine-tuned, compared and exported model."""
from __future__ import annotations

import argparse


def register(verbs) -> None:
    studio = verbs.add_parser(
        "studio", help="a local web app: data, template preview, preflight, training with live curves, results, "
                       "compare, chat and export, without writing a config",
        description="Starts a web app on this machine and prints its address. Every form shows the YAML it "
                    "stands for; `tailor run` on that YAML reproduces the studio's run.")
    studio.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only); any other address "
                             "requires the access token the studio prints")
    studio.add_argument("--port", type=int, default=7861, help="port (default 7861; 0: any free port)")
    studio.add_argument("--runs", default="runs", metavar="DIR", help="where runs are written and read (default: runs)")
    studio.add_argument("--data", action="append", metavar="DIR",
                        help="a folder whose files the studio may read (data files, models); repeatable. "
                             "Default: the current directory")
    studio.add_argument("--home", default=".tailor-studio", metavar="DIR",
                        help="the studio's own folder: uploads, the draft, saved configs, run logs "
                             "(default: .tailor-studio)")
    studio.set_defaults(handler=run_studio)


def run_studio(args: argparse.Namespace) -> int:
    # Lazy on purpose: cli.py imports this module to build its parser on every `tailor` call.
    import secrets
    import signal
    import socket
    from pathlib import Path

    import uvicorn

    from tailorlm.studio.app import LOCAL_NAMES, create_app
    from tailorlm.studio.paths import Folders
    from tailorlm.studio.state import Studio
    from tailorlm.ui import console

    folders = Folders(Path(args.home), Path(args.runs), [Path(d) for d in (args.data or ["."])])
    token = None if args.host in LOCAL_NAMES else secrets.token_urlsafe(24)
    studio = Studio(folders, token)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))  # bound here, so the printed port is the real one (also with --port 0)
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"tailor studio: [bold]{url}[/]")
    if token:
        console.print(f"[yellow]Listening on {args.host}: anyone who can reach it needs the token above.[/]")
    console.print(f"runs in {folders.runs}; readable data folders: {', '.join(map(str, folders.data))}; "
                  f"uploads and drafts in {folders.home}. Ctrl-C stops it (a training run is interrupted, "
                  f"resumable with tailor run --resume).")
    server = uvicorn.Server(uvicorn.Config(create_app(studio), log_level="warning"))
    # uvicorn catches SIGINT and SIGTERM while it serves, shuts down, restores the handlers it found and raises
    # the signal again. Python's default for SIGTERM ends the process at once, skipping studio.close() and
    # leaving the run training on its own; with this handler found instead, SIGTERM ends as Ctrl-C does (one
    # that comes before uvicorn listens makes it stop as soon as it has started).
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again: stopping is the normal end
        pass
    finally:
        studio.close()  # interrupts the run in progress (as Ctrl-C does) and waits for it to save its state
    console.print("tailor studio stopped.")
    return 0
