"""`tailor studio`: a local web app over the same library the CLI drives (app.py, command.py).

Why FastAPI with server-rendered pages and a small script, not Gradio:
- FastAPI, uvicorn and Jinja2 are already dependencies (tailor serve, templates); Gradio would add some forty
  packages and a front-end build of its own to every install.
- Each page is plain HTML and each action a JSON endpoint, so the API is tested with FastAPI's test client in
  milliseconds and the pages in a real browser, without a framework's test harness.
- Gradio's component API changes between major versions; HTML, a page script and uPlot (vendored under
  static/vendor with its MIT license, so nothing loads from a CDN) will read the same in years.

Modules: paths (what a request may touch), state (the draft config, the run queue), queue (runs as `tailor run`
processes), preview (rows, template, preflight), results (live curves, results, comparison), actions (chat,
export), app (routes and the safety checks), command (`tailor studio`).
"""
