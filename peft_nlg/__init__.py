"""peft-nlg: parameter-efficient fine-tuning for text generation, measured side by side."""

__version__ = "0.1.0"
