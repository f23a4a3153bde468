"""MMLU (57 subjects) task definitions; see :mod:`tli.eval.tasks`."""
