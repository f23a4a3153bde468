"""KFP components: one thin wrapper per pipeline stage, each calling one ``tli`` function.

Every component is a lightweight Python component: KFP ships the function's source, so imports
sit inside the function and nothing is pip-installed at run time (``packages_to_install`` stays
empty, ``install_kfp_package=False``): the project image (``infra/Dockerfile``) has tli and kfp,
and the local runner uses the current environment. Each one calls
:func:`tli.pipeline.runner.run_component`, which runs the stage through the stage store, as a
Ray job on the head whose Jobs API is ``ray_jobs`` (or in the component's own process when that
is None), writes a small JSON reference (stage, version, path, content hash) as the file of the
component's main output artifact (what the next components read), and fills its typed outputs
from the stored version (:mod:`tli.pipeline.artifacts`): ``Model`` / ``Dataset`` metadata,
``Metrics``, ``Markdown`` and ``HTML`` for the Kubeflow UI. The export step
(:mod:`components.export`) runs in its own pod: it only reads the store and writes elsewhere.
"""

# The image every step runs in. Compiling with `tli pipeline compile --image NAME` replaces it
# in the compiled YAML; locally the image is ignored (the subprocess runner uses this env).
from tli import __version__

IMAGE = f"tli:{__version__}"
