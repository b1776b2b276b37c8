"""`tailor export`: a finished run as a merged Hugging Face folder, a PEFT adapter, or a GGUF + Ollama Modelfile.

build.py drives it (checks, then an atomic write); layout.py says what the export must reproduce of training
(prompt layout, end-of-turn token, the run's prompts); merge.py writes the Hugging Face folders; gguf_writer.py
and gguf_metadata.py the GGUF; modelfile.py the Ollama Modelfile; verify.py loads the export back and checks it.
"""
