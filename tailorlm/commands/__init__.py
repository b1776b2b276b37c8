"""The `tailor` verbs whose work is an operation (ops/): export; chat, predict and serve; runs and compare.

Each module has register(verbs), which adds its subparser with set_defaults(handler=fn), and fn(args) -> exit
code; cli.py loads them by name. A handler parses, prints and sets the exit code; the work is an ops/ call. They
sit above ops/ for that reason, beside the studio, the web face over the same operations.
"""
