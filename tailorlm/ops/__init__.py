"""The operations every front end runs: the `tailor` verbs (commands/), the Python API (api.py) and the studio.

    export.py   a finished run exported (hf, adapter, gguf) and, on request, verified against the run
    engines.py  a run or model loaded for inference and given a generation engine (PyTorch or llama.cpp)
    resume.py   the checks made before an interrupted run is continued
    compare.py  runs side by side

Each operation is one sequence of library calls, written once, so the terminal, a notebook and the web page
export, chat and compare alike. The front ends keep only what is theirs: arguments, printing and exit codes,
exceptions, pages and background threads.

The layer uses serve, export and track, which may not import each other, so it sits above all three rather than
inside one (pyproject.toml, [tool.importlinter]). Heavy imports (torch, transformers) stay inside the functions,
as in api.py and the verbs: importing an operation costs nothing until it runs.
"""
