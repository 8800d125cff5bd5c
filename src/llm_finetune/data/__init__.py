"""The data step: rows (files) -> records (examples) -> tokenize (encoder) -> prepare (splits), plus
prompts for inference, templates, the cache, the collator and the data doctor."""
