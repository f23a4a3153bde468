"""tli: depth up-scaling of pretrained LLMs by Transformer Layer Injection."""

__version__ = "0.1.0"
