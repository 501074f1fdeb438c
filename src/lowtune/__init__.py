"""lowtune: low-cost fine-tuning of chat LLMs."""

__version__ = "0.1.0"
