"""llm-finetune: fine-tune causal language models with Transformers + PEFT, correct by default."""

from .cpu_memory import ask_for_huge_pages

__version__ = "0.1.0"

ask_for_huge_pages()  # before torch is imported: PyTorch reads the setting once (see cpu_memory.py)
