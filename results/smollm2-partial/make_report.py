"""The compare report of the finished methods of a `tli compare` run still in progress.

Reads the store versions that run printed ("compare: WHAT: running STAGE VERSION" lines),
and runs the report stage's own prepare/execute on their output folders (nothing recomputed).

    python make_report.py COMPARE_LOG STORE METHODS OUT   # e.g. ... runs tli,llama-pro,dus out
"""
import re
import sys
from pathlib import Path

from tli.compare import report
from tli.compare.run import match_base, report_params
from tli.compare.spec import load_experiment

log, store, methods, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","), Path(sys.argv[4])
exp = load_experiment("experiments/smollm2.yaml")
exp = exp.model_copy(update={"methods": methods})
matched = [m for m in match_base(exp) if m.name in methods]
inputs = {}
for line in log.read_text(errors="replace").splitlines():
    m = re.match(r"compare: (.+): running (\S+) ([0-9a-f]{16})$", line)
    if not m:
        continue
    what, stage, version = m.groups()
    folder = store / stage / version / "output"
    if what in ("base", "data"):
        name = {"import-base": "base", "data": "data", "eval": "eval_base"}[stage]
    elif what.endswith(" step 0"):
        name = f"{what[:-7]}/eval_init"
    elif " seed " in what:
        meth, seed = what.split(" seed ")
        name = f"{meth}/s{seed}/" + ("train" if stage == "train" else "eval_final")
    else:
        name = f"{what}/{stage}"
    if name.split("/")[0] in (*methods, "base", "data", "eval_base"):
        inputs[name] = folder
params = report_params(exp, matched)
job = report.prepare(params, inputs, None)
out.mkdir(parents=True)
report.execute(job, out)
print(out)
