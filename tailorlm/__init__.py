"""tailorlm: fine-tune a language model on task data, and prove it beats prompting the same model.

The package reads along the user's path: data -> models -> train -> eval -> (export).
"""
__version__ = "0.1.0"
