"""
Write run.json for the runs of results/lst-h200-sweep.sh, made before train.py wrote one: the record train.py's start()
writes, rebuilt from the same command lines (flags -> runs -> each model built from its seed -> its PE at init), and
copy each run's metrics.jsonl beside it.

    PYTHONPATH=. python results/lst-h200-run_json.py SWEEP_DIR results/lst-h200   # SWEEP_DIR: where out/ was written
"""
import json
import os
import shutil
import sys

import analyze
import tasks
import train

P, S2 = "--preset paper-short", "--init-stds 0.2,2 --seeds 0,1,2"  # as in the sweep script
src, dst = sys.argv[1], sys.argv[2]
for line in open("results/lst-h200-sweep.sh").read().split("\n"):
    if not line.startswith("run "):
        continue
    name, *argv = line[4:].rstrip(" &").replace("$P", P).replace("$S2", S2).split()
    argv += ["--threads", "1", "--out-dir", f"out/{name}/{{pe}}-{{init_std:g}}-s{{seed}}", "--resume"]
    all_args = train.runs(train.get_args(argv))
    task = tasks.get_task(all_args[0].task, all_args[0])
    tokens = analyze.training_tokens(task)
    for a in all_args:
        run = train.Run(a, model=train.build_model(a, task))
        run.ratios = analyze.norm_ratios(run.model, tokens)
        run.pe_rsa_init = analyze.identifiability(run.model, task.coords, task.references, task.twins, tokens)["pe_rsa"]
        out = os.path.join(dst, a.out_dir.removeprefix("out/"))
        os.makedirs(out, exist_ok=True)
        shutil.copy(os.path.join(src, a.out_dir, "metrics.jsonl"), out)
        with open(os.path.join(out, "run.json"), "w") as f:
            f.write(json.dumps(run.record(), indent=1) + "\n")
        print(out)
