"""llm-finetune: fine-tune causal language models with Transformers + PEFT, correct by default."""

__version__ = "0.1.0"
