"""Turn an adapter into artifacts other tools run: check.py (logit checks), merge.py (a merged model
folder), gguf.py (a GGUF file), ollama.py (its Modelfile). Every artifact is checked against the
model it came from before it is put in place, in one rename, so a failed check leaves nothing behind."""
