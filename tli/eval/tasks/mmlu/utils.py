"""The MMLU tasks' loader (lm-eval resolves ``!function utils.loader`` next to the YAML)."""

from tli.eval.tasks.utils import loader

__all__ = ["loader"]
