"""tailorlm: fine-tune a language model on task data, and prove it beats prompting the same model.

    import tailorlm
    run = tailorlm.run(data=df)            # the embedded default job, on your own table
    run.predict(rows); run.export("gguf")
    tailorlm.load("runs/<name>")           # a finished run directory
    tailorlm.auto("task.yaml", budget="20m")  # the best model and recipe within 20 minutes

The package reads along the user's path: data -> models -> train -> eval -> (export, serve, track) ->
pipeline -> api -> cli. Importing it changes no global setting.
"""
from tailorlm.api import Run, auto, load, pairs, run
from tailorlm.config import RunConfig, load_config
from tailorlm.errors import TailorError

__version__ = "0.1.0"
__all__ = ["Run", "RunConfig", "TailorError", "auto", "load", "load_config", "pairs", "run", "__version__"]
