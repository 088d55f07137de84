"""
What a run is: its flags, built from dataclass fields (each task's flags class in tasks.py, model.ModelConfig and
TrainConfig below: a field with a help text is a flag, with its bounds), the presets that spell out the authors'
setup, the parser and its checks, and what a run is called (its identity in run.json and its label in tables).
Used by train.py, rundir.py and analyze.py alike. Every refusal is a ValueError with one line to print.
"""
import argparse
import functools
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

import pe as pe_lib
import rundir
import tasks
from model import PAPER_MODEL, ModelConfig, check_device


@dataclass
class TrainConfig:
    """The training recipe; a field with a help text is a flag, as in ModelConfig."""
    lr: float = field(default=3e-4, metadata=dict(help="AdamW peak learning rate", ge=0))
    warmup_iters: int = field(default=0, metadata=dict(help="linear warm-up steps"))
    min_lr_ratio: float = field(default=0.1, metadata=dict(
        help="cosine decay over --max-iters to lr * this (1 = constant)", ge=0))
    betas: list = field(default_factory=functools.partial(list, (0.9, 0.999)), metadata=dict(
        help="AdamW beta1 beta2", type=float, nargs=2))
    weight_decay: float = field(default=0.1, metadata=dict(
        help="AdamW decay of the weight matrices (token embedding included)", ge=0))
    pe_weight_decay: float = field(default=0.0, metadata=dict(
        help="AdamW decay of the PE table (decay shrinks the norm under study)", ge=0))
    batch_size: int = field(default=128, metadata=dict(help="samples per step", gt=0, label=False))
    max_iters: int = field(default=2500, metadata=dict(help="training steps (the cap when --stop-train-acc is set)",
                                                       gt=0, label=False))
    max_epochs: int = field(default=None, metadata=dict(
        help="training length in epochs of the training split (replaces --max-iters; an epoch is its full batches)",
        gt=0, label=False))
    stop_train_acc: float = field(default=None, metadata=dict(
        help="stop at the first eval whose training accuracy reaches this (e.g. 0.999)", label=False))
    eval_interval: int = field(default=250, metadata=dict(help="steps between evals and checkpoints", gt=0,
                                                          label=False))
    eval_epochs: int = field(default=None, metadata=dict(help="epochs between evals (replaces --eval-interval)", gt=0,
                                                         label=False))
    seed: int = field(default=0, metadata=dict(help="seed of the model's init and the data order"))


# The authors' run (model.PAPER_MODEL on their 9,000 puzzles): AdamW lr 1e-4 constant, batch 128, no weight decay,
# 4,000 epochs of their training split (63 steps an epoch at batch 128), an eval every 25 epochs. paper-short: the
# same run ended at epoch 200, the first point of their logs, by which the sigma effect is there (RESULTS.md).
PAPER_RECIPE = dict(data="lstnn", lr=1e-4, warmup_iters=0, min_lr_ratio=1.0, batch_size=128, weight_decay=0.0,
                    eval_epochs=25)
PRESETS = {"paper": PAPER_MODEL | PAPER_RECIPE | dict(max_epochs=4000),
           "paper-short": PAPER_MODEL | PAPER_RECIPE | dict(max_epochs=200)}
CLASSIFIER_ONLY = ("readout", "stop_train_acc")  # flags a regression task refuses (and a preset's it ignores)
RUNTIME = ("resume", "force", "device", "compile", "dtype", "vmap", "threads", "out_dir", "data_dir")  # not a run's
# identity: how it is computed or where it goes


# ----------------------------------------------------------------------------- flags
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, which train.py's main turns into exit status 2, for every bad flag
        raise ValueError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the docstring as written, and each flag's default."""


def flag_fields(task=None):
    """The fields that are flags: every task's (or `task`'s), the model's and the recipe's."""
    classes = [cls for name, (cls, _) in tasks.TASKS.items() if task in (None, name)] + [ModelConfig, TrainConfig]
    return [f for cls in classes for f in fields(cls) if "help" in f.metadata]


def field_default(f):
    return f.default_factory() if f.default is MISSING else f.default


def add_flags(group, cls):
    """A flag per field of dataclass cls that has a help text: --name-with-dashes, typed, with the field's choices and
    nargs. No argparse default: get_args fills each in; the help names the field's, each task's and each preset's."""
    others = [(name, task_cls.DEFAULTS) for name, (task_cls, _) in tasks.TASKS.items()] + list(PRESETS.items())
    for f in (f for f in fields(cls) if "help" in f.metadata):
        meta = f.metadata
        if f.type is bool:
            kw = {"action": argparse.BooleanOptionalAction}
        else:
            kw = {"type": meta.get("type", f.type)} | {k: meta[k] for k in ("choices", "nargs") if k in meta}
        shown = [("default", field_default(f))] + [(name, d[f.name]) for name, d in others if f.name in d]
        text = "; ".join(f"{k}: {meta.get('none', v) if v is None else v}" for k, v in shown)
        group.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, help=f"{meta['help']} ({text})",
                           **kw)


def parser(description=None):
    p = Parser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("task")
    g.add_argument("--task", default="grid2d", choices=tuple(tasks.TASKS), help="dataset")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated dataset and its splits")
    g.add_argument("--data-dir", default="data", help="cache of generated datasets")
    for name, (cls, _) in tasks.TASKS.items():
        add_flags(p.add_argument_group(f"task {name}"), cls)
    g = p.add_argument_group("model")
    add_flags(g, ModelConfig)
    g.add_argument("--init-stds", type=floats, default=None,
                   help="learned/random: one run per sigma, trained at once, e.g. 0.02,0.2 (replaces --init-std)")
    g = p.add_argument_group("training")
    add_flags(g, TrainConfig)
    g.add_argument("--seeds", type=ints, default=None,
                   help="one run per seed, trained at once, e.g. 0,1,2 (replaces --seed; with --init-stds: every pair)")
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe; flags given explicitly still override it")
    g.add_argument("--out-dir", default=None,
                   help="run directory, filled in with each run's flags ({seed}, {init_std}, ...), so several runs "
                        "need those (default out/TASK-PE[-{init_std:g}]-s{seed}, TASK network-LAYOUT for network)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir (start it if absent, skip it if finished or diverged)")
    g.add_argument("--force", action="store_true", help="overwrite a run already in --out-dir")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), or a torch device")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: on for CUDA)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype (auto: bf16 on CUDA, fp32 elsewhere)")
    g.add_argument("--vmap", action=argparse.BooleanOptionalAction, default=None,
                   help="several runs: one vmap over the models' stacked weights, or a loop of plain calls "
                        "(default: vmap on CUDA)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default; sweeps: 1 per process)")
    return p


def ints(text):
    return [int(v) for v in text.split(",")]


def floats(text):
    return [float(v) for v in text.split(",")]


def get_args(argv=None, description=None):
    """The flags, with the task's and the preset's defaults filled in, checked: a bad one is a ValueError."""
    args = parser(description).parse_args(argv)
    task_cls = tasks.TASKS[args.task][0]
    applies = {f.name for f in flag_fields(args.task)} - (set() if task_cls.HEAD == "cls" else set(CLASSIFIER_ONLY))
    preset = {k: v for k, v in PRESETS.get(args.preset, {}).items() if k in applies}
    given = set(vars(args))
    for k, v in ({f.name: field_default(f) for f in flag_fields()} | task_cls.DEFAULTS | preset).items():
        if k not in given:  # the field's default, the task's over it, a preset's over both; explicit flags win
            setattr(args, k, v)
    for steps, epochs in (("max_iters", "max_epochs"), ("eval_interval", "eval_epochs")):  # ... in steps too
        if steps in given and epochs not in given:
            setattr(args, epochs, None)
    check(args)
    if args.out_dir is None:  # a template: runs() fills in each run's sigma and seed
        sigma = "-{init_std:g}" if pe_lib.has_sigma(args.pe) else ""
        name = "network-{net_layout}" if args.task == "network" else "{task}"
        args.out_dir = os.path.join("out", f"{name}-{{pe}}{sigma}-s{{seed}}")
    return args


def check(args):
    """Refuse every flag that cannot make a run, before anything is written: the fields' bounds, then the rules across
    flags, then the task's own check (which also fills in what its flags leave to it)."""
    for name, value in vars(args).items():  # NaN or inf in any float flag, lists included
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for f in flag_fields(args.task):
        value, meta, name = getattr(args, f.name), f.metadata, f.name.replace("_", "-")
        if value is None or isinstance(value, list):
            continue
        if "ge" in meta and value < meta["ge"]:
            raise ValueError(f"--{name} must be >= {meta['ge']}, got {value}")
        if "gt" in meta and value <= meta["gt"]:
            raise ValueError(f"--{name} must be > {meta['gt']}, got {value}")
        if "lt" in meta and value >= meta["lt"]:
            raise ValueError(f"--{name} must be < {meta['lt']}, got {value}")
    if args.embed_std is not None and args.embed_std < 0:
        raise ValueError(f"--embed-std must be >= 0 or 'torch', got {args.embed_std}")
    if not all(0 <= b < 1 for b in args.betas):
        raise ValueError(f"--betas must be in [0, 1), got {args.betas}")
    if args.init_stds is not None and (min(args.init_stds) < 0 or not pe_lib.has_sigma(args.pe)):
        raise ValueError(f"--init-stds takes stds >= 0 of --pe learned or random, got {args.init_stds} for {args.pe}")
    if tasks.TASKS[args.task][0].HEAD != "cls":
        if args.readout != "query":
            raise ValueError(f"--readout {args.readout} needs a classification task; {args.task} predicts every "
                             "masked token")
        if args.stop_train_acc is not None:
            raise ValueError(f"--stop-train-acc needs a classification task; {args.task} is a regression")
    flags = tasks.task_flags(args.task, args)
    flags.check()
    check_device(args.device)
    vars(args).update(asdict(flags))


def runs(args):
    """The runs args asks for: one per (init_std, seed) of --init-stds x --seeds (default: --init-std, --seed),
    each the args that `--init-std STD --seed SEED` alone would give, with --out-dir filled in by its flags."""
    out = []
    for std in args.init_stds or [args.init_std]:
        for seed in args.seeds or [args.seed]:
            run = argparse.Namespace(**{**vars(args), "init_std": std, "seed": seed, "init_stds": None, "seeds": None})
            try:
                run.out_dir = args.out_dir.format(**vars(run))
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"--out-dir {args.out_dir!r}: cannot fill in {e} (fields are flags, e.g. {{seed}}, "
                                 "{init_std})") from None
            if why := rundir.unwritable(run.out_dir):
                raise ValueError(f"--out-dir {run.out_dir}: cannot be created or written ({why})")
            out.append(run)
    if len({r.out_dir for r in out}) < len(out):
        raise ValueError(f"--out-dir {args.out_dir!r} gives {len(out)} runs fewer directories; put {{seed}} and "
                         "{init_std} in it")
    return out


def in_steps(all_args, n_train):
    """--max-epochs and --eval-epochs as --max-iters and --eval-interval of this training split, in every run's args."""
    for a in all_args:
        if a.max_epochs is not None:
            a.max_iters = a.max_epochs * tasks.epoch_steps(n_train, a.batch_size)
        if a.eval_epochs is not None:
            a.eval_interval = a.eval_epochs * tasks.epoch_steps(n_train, a.batch_size)


def derived(args):
    """The flags that --max-epochs / --eval-epochs set from the data, so a resumed run compares them as epochs."""
    return (("max_iters",) if args.max_epochs is not None else ()) + (
        ("eval_interval",) if args.eval_epochs is not None else ())


# ----------------------------------------------------------------------------- what a run is
def model_config(args, task):
    """The model the flags build for a task: its shape from the task, the rest from the flags."""
    return ModelConfig(n_tokens=len(task.coords), in_dim=task.in_dim, n_out=task.n_out, head=task.head,
                       masked=task.head == "token", **{f.name: getattr(args, f.name) for f in fields(ModelConfig)
                                                       if "help" in f.metadata})


def flags(args):
    """A run's flags without the runtime ones: what it is."""
    return {k: v for k, v in vars(args).items() if k not in RUNTIME}


def changes(args):
    """The flags of a run that differ from what its task and preset alone give: what tells it apart in a table."""
    layout = ["--net-layout", args.net_layout] if args.task == "network" else []  # the label's prefix, and it sets
    # the network's shape unless --net-shape is given
    base = vars(get_args(["--task", args.task, *layout] + (["--preset", args.preset] if args.preset else [])))
    named = {f.name for f in flag_fields(args.task)} - {"pe", "init_std", "seed"} - set(derived(args))  # not another
    # task's flags, which this run ignores
    return {k: v for k, v in vars(args).items() if (k in named or k == "data_seed") and base.get(k) != v}


def identity(flags, pe_shape, changes):
    """What names a run in its run.json and summary.json, from its flags: task, PE, its sigma and seed, the model
    settings under study, its preset, the flags it changed from what its task and preset give (its label in tables),
    all its flags, and its PE's table shape."""
    f = flags
    return {"task": f["task"], "pe": f["pe"], "init": f["init"], "init_std": f["init_std"], "pe_layers": f["pe_layers"],
            "readout": f["readout"], "embed_std": f["embed_std"], "weight_decay": f["weight_decay"],
            "preset": f["preset"], "seed": f["seed"], "data_seed": f["data_seed"],
            "data": f["data"] if f["task"] == "grid2d" else None,
            **({"layout": f["net_layout"]} if f["task"] == "network" else {}),  # one network task, many geometries
            "changes": changes, "args": flags, "pe_shape": pe_shape}


# One rule for every flag, the task's, the model's and the recipe's: a flag a run changed is named in its label unless
# its field says label=False (sizes, run lengths and eval settings: tables show iters in a column of their own); the
# data seed, another draw like the seed, is not named either.
UNLABELLED = ("data_seed",) + tuple(f.name for f in flag_fields() if f.metadata.get("label") is False)


SPELT_NONE = {f.name: f.metadata["none"] for f in fields(ModelConfig) if "none" in f.metadata}  # --embed-std torch


def label(s, sigma=True):
    """How a run is named in tables and legends: its layout (network), PE, σ for table PEs (unless sigma=False: the
    series a σ sweep draws as one line), its preset and every flag it changed from what its task and preset give but
    the UNLABELLED, so runs of different models or data never share a row."""
    at = f" σ={s['init_std']:g}" if sigma and pe_lib.has_sigma(s["pe"]) else ""
    tags = [s["preset"]] if s["preset"] else []
    tags += [f"{k.replace('_', '-')} {SPELT_NONE.get(k) if v is None else v}" for k, v in s["changes"].items()
             if k not in UNLABELLED]
    return (f"{s['layout']}: " if "layout" in s else "") + s["pe"] + at + (f" ({', '.join(tags)})" if tags else "")
