"""loraserve: one 4-bit quantized base model, many LoRA adapters, one continuous batch."""

__version__ = "0.1.0"
