"""
Train a transformer with one positional encoding on one task, and measure what its PE learned; or K such
runs at once (--seeds, --init-stds), each with its own init and data order, as one batched computation.

    python train.py --task grid2d --pe learned --init-std 0.02
    python train.py --task network --net-layout lattice --pe learned --init-std 0.02
    python train.py --task brain3d --pe learned --init-std 0.02
    python train.py --pe learned --init-stds 0.02,0.2 --seeds 0,1,2 --out-dir 'sweep/learned-{init_std:g}-s{seed}'
    python train.py --preset paper-short --init-std 0.2    # the authors' model on their puzzles, to epoch 200

Each run writes OUT_DIR/run.json (what the run is, at its start), ckpt.pt (atomically, at every eval), metrics.jsonl
(a line per eval) and summary.json (at the end), the same files as the run alone would. --resume continues
interrupted runs to the same result; finished and diverged runs are skipped. On CUDA: torch.compile, bf16 autocast
and one vmap over the K models by default; on CPU: plain fp32 and a loop over the models.

While a run trains, OUT_DIR/lock holds its process id: a second process on the same directory is refused, and
--resume takes over the lock of a process that died (an flock, which the OS frees however a process ends).

Exit status: 0 done; 2 a bad flag, device or directory, or a run directory another process holds (one line, nothing
written); 3 a run diverged (its loss became NaN or infinite: it stops there, keeps its last checkpoint and
metrics.jsonl, and its summary.json says "diverged"; the other runs go on), now or, found by --resume, before;
4 a file could not be written (a full disk: one line naming it; every run keeps its last checkpoint, and --resume
continues it to the same result); 130 interrupted (Ctrl-C; every checkpoint stays valid for --resume).
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

import analyze
import pe as pe_lib
import tasks
from model import PAPER_MODEL, READOUTS, ModelConfig, adamw, forward_models, init_model, settings, train_step

# The flags whose defaults a task (tasks.TASK_DEFAULTS) or a preset may change; parsed without a default, then
# filled in: the task's values over these, a preset's over both, an explicit flag over all.
DEFAULTS = dict(n_layer=4, n_head=1, n_embd=160, norm="post", pe_layers="input", embed_std=0.02, readout="query",
                mlp_out_gelu=False, attn_init="linear", data="generated", lr=3e-4, warmup_iters=0, min_lr_ratio=0.1,
                weight_decay=0.1, batch_size=128, max_iters=2500, max_epochs=None, eval_interval=250, eval_epochs=None,
                stop_train_acc=None)
# The authors' run (model.PAPER_MODEL on their 9,000 puzzles): AdamW lr 1e-4 constant, batch 128, no weight decay,
# 4,000 epochs of their training split (63 steps an epoch at batch 128), an eval every 25 epochs. paper-short: the
# same run ended at epoch 200, the first point of their logs, by which the sigma effect is there (RESULTS.md).
PAPER_RECIPE = dict(data="lstnn", lr=1e-4, warmup_iters=0, min_lr_ratio=1.0, batch_size=128, weight_decay=0.0,
                    eval_epochs=25)
PRESETS = {"paper": PAPER_MODEL | PAPER_RECIPE | dict(max_epochs=4000),
           "paper-short": PAPER_MODEL | PAPER_RECIPE | dict(max_epochs=200)}
GRID_ONLY = ("readout", "stop_train_acc", "data")  # preset keys that mean nothing to the regression tasks
MASK_SEEDS = 2**40  # offsets the training masks' seeds from batch_indices' epoch seeds
RUNTIME_ARGS = ("resume", "force", "device", "compile", "dtype", "vmap", "threads", "out_dir", "data_dir")
DIVERGED, WRITE_FAILED, INTERRUPTED = 3, 4, 130  # exit statuses
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "summary.json", "run.json")  # run.json: what the run is, from its start
LOCK = "lock"  # in the run directory while a process trains it: that process's id


def die(msg, status=2):
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(status)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2 for every bad flag
        die(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the docstring as written, and each flag's default."""


def default(key, text):
    """argparse keywords of a flag whose default the task or a preset may change: none given to argparse, and a
    help text that names them all."""
    shown = {None: "torch"}  # --embed-std's None is spelled 'torch'
    others = "".join(f"; {name}: {shown.get(d[key], d[key])}" for name, d in {**tasks.TASK_DEFAULTS, **PRESETS}.items()
                     if key in d)
    return dict(default=argparse.SUPPRESS, help=f"{text} (default: {DEFAULTS[key]}{others})")


def parser():
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("task")
    g.add_argument("--task", default="grid2d", choices=tasks.TASKS, help="dataset")
    g.add_argument("--grid-n", type=int, default=4, help="grid2d: side of the Latin square (4, 5, 6)")
    g.add_argument("--n-per-class", type=int, default=4000, help="grid2d: puzzles generated per complexity class")
    g.add_argument("--data", choices=tasks.GRID_DATA, **default(
        "data", "grid2d: the authors' 9,000 puzzles (lst/), or our generator's (--n-per-class, any --grid-n)"))
    g.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=True,
                   help="grid2d --data generated: hold one diagonal of query positions per class out of training "
                        "(the split ood)")
    g.add_argument("--noise-std", type=float, default=0.2,
                   help="grid2d: std of the Gaussian noise on the noise test's one-hot inputs")
    g.add_argument("--net-layout", default="grid", choices=tuple(tasks.NET_LAYOUTS),
                   help="network: where the nodes sit (ring 1D, grid 2D, lattice 3D, random points2d/points3d, "
                        "brain: brain3d's 94 region centres)")
    g.add_argument("--net-shape", type=int, nargs="+", default=None,
                   help="network: nodes per axis (grid: ROWS COLS; lattice: three sizes) or the node count (ring, "
                        "points2d/3d); when not given: "
                        + ", ".join(f"{k} {list(v)}" for k, v in tasks.NET_LAYOUTS.items()))
    g.add_argument("--net-kernel", default="gaussian", choices=tasks.NET_KERNELS,
                   help="network: coupling decay with distance d, exp(-d^2/2L^2) or exp(-d/L)")
    g.add_argument("--net-length", type=float, default=1.0, help="network: kernel length L, in node spacings")
    g.add_argument("--net-inhibition", type=float, default=1.0,
                   help="network: global inhibition, a fraction of each node's mean excitation "
                        "(1 = balanced, 0 = none)")
    g.add_argument("--net-gain", type=float, default=1.5, help="network: coupling gain g (the spectral radius)")
    g.add_argument("--net-tau", type=float, default=1.0, help="network: time constant tau")
    g.add_argument("--net-dt", type=float, default=0.1, help="network: Euler-Maruyama step, also the sampling interval")
    g.add_argument("--net-noise", type=float, default=0.5,
                   help="network: noise sigma (the stationary std of an uncoupled node)")
    g.add_argument("--net-drive", type=float, default=0.0, help="network: constant input I inside the tanh")
    g.add_argument("--net-burn-in", type=int, default=100, help="network: steps dropped before the window")
    g.add_argument("--net-trials", type=int, default=10000,
                   help="network: independent trials at --net-gain (90/10 train/test); ood has a tenth as many")
    g.add_argument("--net-window", type=int, default=16, help="network: steps of activity per token")
    g.add_argument("--net-mask-frac", type=float, default=0.25, help="network: fraction of the nodes hidden per sample")
    g.add_argument("--net-ood-gain", type=float, default=2.0, help="network: coupling gain of the ood split")
    g.add_argument("--brain-window", type=int, default=16, help="brain3d: TRs (0.72 s each) of BOLD per token")
    g.add_argument("--brain-stride", type=int, default=1,
                   help="brain3d: TRs between the starts of consecutive training windows (eval windows do not overlap)")
    g.add_argument("--brain-mask-frac", type=float, default=0.25,
                   help="brain3d: fraction of the regions hidden in each sample")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated dataset and its splits")
    g.add_argument("--data-dir", default="data", help="cache of generated datasets")
    g = p.add_argument_group("positional encoding")
    g.add_argument("--pe", default="learned", choices=pe_lib.KINDS, help="positional encoding")
    g.add_argument("--init", default="normal", choices=pe_lib.INITS, help="learned/random: distribution of the entries")
    g.add_argument("--init-std", type=float, default=0.02, help="learned/random: std sigma of each entry (0 = zeros)")
    g.add_argument("--init-stds", type=floats, default=None,
                   help="learned/random: one run per sigma, trained at once, e.g. 0.02,0.2 (replaces --init-std)")
    g.add_argument("--pe-layers", choices=("input", "all"), **default(
        "pe_layers", "additive PEs: added once at the input, or at every block with its own table (the paper)"))
    g.add_argument("--pe-weight-decay", type=float, default=0.0,
                   help="AdamW decay of the PE table (decay shrinks the norm under study)")
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, **default("n_layer", "transformer blocks"))
    g.add_argument("--n-head", type=int, **default("n_head", "attention heads"))
    g.add_argument("--n-embd", type=int, **default("n_embd", "model width d"))
    g.add_argument("--norm", choices=("post", "pre"), **default("norm", "LayerNorm after or before each sublayer"))
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on attention and MLP outputs")
    g.add_argument("--embed-std", type=embed_std, **default("embed_std", "init std of the token embedding, "
                   "or 'torch' (None) for PyTorch's default (embedded-token norm ~4.7 at d=160, the paper's)"))
    g.add_argument("--readout", choices=READOUTS, **default(
        "readout", "grid2d: classify from the query cell's token, the last cell (the authors' public code), or an "
                   "appended readout token with its own PE row (cls, the authors' logged model)"))
    g.add_argument("--mlp-out-gelu", action=argparse.BooleanOptionalAction, **default(
        "mlp_out_gelu", "a GELU after the MLP's output projection too (the authors' block)"))
    g.add_argument("--attn-init", choices=("linear", "mha"), **default(
        "attn_init", "attention weights as nn.Linear initialises them, or as nn.MultiheadAttention (the authors')"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, **default("lr", "AdamW peak learning rate"))
    g.add_argument("--warmup-iters", type=int, **default("warmup_iters", "linear warm-up steps"))
    g.add_argument("--min-lr-ratio", type=float,
                   **default("min_lr_ratio", "cosine decay over --max-iters to lr * this (1 = constant)"))
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW beta1 beta2")
    g.add_argument("--weight-decay", type=float,
                   **default("weight_decay", "AdamW decay of the weight matrices (token embedding included)"))
    g.add_argument("--batch-size", type=int, **default("batch_size", "samples per step"))
    g.add_argument("--max-iters", type=int,
                   **default("max_iters", "training steps (the cap when --stop-train-acc is set)"))
    g.add_argument("--max-epochs", type=int, **default(
        "max_epochs", "training length in epochs of the training split (replaces --max-iters; an epoch is its "
                      "full batches)"))
    g.add_argument("--stop-train-acc", type=float, **default(
        "stop_train_acc", "stop at the first eval whose training accuracy reaches this (e.g. 0.999)"))
    g.add_argument("--eval-interval", type=int, **default("eval_interval", "steps between evals and checkpoints"))
    g.add_argument("--eval-epochs", type=int,
                   **default("eval_epochs", "epochs between evals (replaces --eval-interval)"))
    g.add_argument("--seed", type=int, default=0, help="seed of the model's init and the data order")
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


def embed_std(text):
    """--embed-std: a std, or 'torch' for PyTorch's default init (None)."""
    return None if text == "torch" else float(text)


def ints(text):
    return [int(v) for v in text.split(",")]


def floats(text):
    return [float(v) for v in text.split(",")]


def get_args(argv=None):
    """The flags, with the task's and the preset's defaults filled in, checked: a bad one ends here with exit 2."""
    args = parser().parse_args(argv)
    preset = {k: v for k, v in PRESETS.get(args.preset, {}).items() if k not in GRID_ONLY or args.task == "grid2d"}
    given = set(vars(args))
    for k, v in {**DEFAULTS, **tasks.TASK_DEFAULTS.get(args.task, {}), **preset}.items():  # explicit flags win
        if not hasattr(args, k):
            setattr(args, k, v)
    for steps, epochs in (("max_iters", "max_epochs"), ("eval_interval", "eval_epochs")):  # ... in steps too
        if steps in given and epochs not in given:
            setattr(args, epochs, None)
    check(args)
    if args.out_dir is None:  # a template: runs() fills in each run's sigma and seed
        sigma = "-{init_std:g}" if args.pe in ("learned", "random") else ""
        name = "network-{net_layout}" if args.task == "network" else "{task}"
        args.out_dir = os.path.join("out", f"{name}-{{pe}}{sigma}-s{{seed}}")
    return args


def check(args):
    """Refuse every flag that cannot make a run, before anything is written."""
    for name, value in vars(args).items():  # NaN or inf in any float flag, lists included
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            die(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("init_std", "lr", "weight_decay", "pe_weight_decay", "noise_std", "dropout", "min_lr_ratio"):
        if getattr(args, name) < 0:
            die(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.embed_std is not None and args.embed_std < 0:
        die(f"--embed-std must be >= 0 or 'torch', got {args.embed_std}")
    if not all(0 <= b < 1 for b in args.betas):
        die(f"--betas must be in [0, 1), got {args.betas}")
    if args.init_stds is not None and (min(args.init_stds) < 0 or args.pe not in ("learned", "random")):
        die(f"--init-stds takes stds >= 0 of --pe learned or random, got {args.init_stds} for {args.pe}")
    for name in ("max_iters", "eval_interval", "batch_size", "n_layer", "n_head", "n_embd", "n_per_class",
                 "max_epochs", "eval_epochs"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            die(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.task == "grid2d" and args.grid_n < 3:
        die(f"--grid-n must be >= 3, got {args.grid_n}")
    if args.readout != "query" and args.task != "grid2d":
        die(f"--readout {args.readout} needs a classification task; {args.task} predicts every masked token")
    if args.task == "grid2d" and args.data == "lstnn" and args.grid_n != 4:
        die(f"--data lstnn: the authors' puzzles are 4 x 4; --grid-n {args.grid_n} needs --data generated")
    if args.task == "network":
        check_network(args)
    if args.task == "brain3d":
        check_brain(args)
    check_device(args.device)


def check_network(args):
    """Resolve the layout's default size and refuse a network that cannot be simulated or masked."""
    args.net_shape = args.net_shape or list(tasks.NET_LAYOUTS[args.net_layout])
    n_axes, n = len(tasks.NET_LAYOUTS[args.net_layout]), math.prod(args.net_shape)
    if len(args.net_shape) != n_axes or min(args.net_shape) < 1 or n < 4:
        die(f"--net-shape for {args.net_layout} takes {n_axes} size(s) >= 1 making >= 4 nodes, got {args.net_shape}")
    if args.net_layout == "brain" and n != tasks.BRAIN_REGIONS:
        die(f"--net-shape for brain is the {tasks.BRAIN_REGIONS} AAL2 regions, got {args.net_shape}")
    for name in ("net_length", "net_tau"):
        if getattr(args, name) <= 0:
            die(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("net_gain", "net_ood_gain", "net_noise", "net_inhibition", "net_burn_in"):
        if getattr(args, name) < 0:
            die(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 < args.net_dt <= args.net_tau:
        die(f"--net-dt must be in (0, --net-tau], got {args.net_dt}")
    if args.net_trials < 10 or args.net_window < 1:
        die(f"--net-trials must be >= 10 and --net-window >= 1, got {args.net_trials} and {args.net_window}")
    check_masked(args, "net_mask_frac", n)


def check_brain(args):
    """Refuse a stride that cuts no windows (brain3d itself checks the window against the runs' length)."""
    if args.brain_stride < 1:
        die(f"--brain-stride must be >= 1, got {args.brain_stride}")
    check_masked(args, "brain_mask_frac", tasks.BRAIN_REGIONS)


def check_masked(args, name, n):
    """Masked-node prediction must hide some of the n nodes and leave one visible; a regression never 'fits'."""
    frac = getattr(args, name)
    if not 0 < frac < 1 or round(frac * n) >= n:
        die(f"--{name.replace('_', '-')} must hide some of the {n} nodes and leave one visible, got {frac}")
    if args.stop_train_acc is not None:
        die(f"--stop-train-acc needs a classification task; {args.task} is a regression")


def check_device(name):
    """Refuse a device this machine does not have, naming the ones it has."""
    have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    have += ["mps"] if torch.backends.mps.is_available() else []
    try:
        device = None if name == "auto" else torch.device(name)
    except RuntimeError:
        die(f"--device {name!r} is not a device; this machine has {', '.join(have)}")
    if device is not None and not (device.type == "cpu" or (device.type == "cuda" and (device.index or 0) <
                                   torch.cuda.device_count()) or (device.type == "mps" and "mps" in have)):
        die(f"--device {name}: this machine has no such device; it has {', '.join(have)}")


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
                die(f"--out-dir {args.out_dir!r}: cannot fill in {e} (fields are flags, e.g. {{seed}}, {{init_std}})")
            if why := tasks.unwritable(run.out_dir):
                die(f"--out-dir {run.out_dir}: cannot be created or written ({why})")
            out.append(run)
    if len({r.out_dir for r in out}) < len(out):
        die(f"--out-dir {args.out_dir!r} gives {len(out)} runs fewer directories; put {{seed}} and {{init_std}} in it")
    return out


def epoch_steps(n_train, batch_size):
    """Steps in an epoch: the split's full batches (the last partial one is dropped), one whole batch if smaller."""
    return max(1, n_train // batch_size)


def in_steps(all_args, n_train):
    """--max-epochs and --eval-epochs as --max-iters and --eval-interval of this training split, in every run's args."""
    for a in all_args:
        if a.max_epochs is not None:
            a.max_iters = a.max_epochs * epoch_steps(n_train, a.batch_size)
        if a.eval_epochs is not None:
            a.eval_interval = a.eval_epochs * epoch_steps(n_train, a.batch_size)


def derived(args):
    """The flags that --max-epochs / --eval-epochs set from the data, so a resumed run compares them as epochs."""
    return (("max_iters",) if args.max_epochs is not None else ()) + (
        ("eval_interval",) if args.eval_epochs is not None else ())


def lr_at(it, args):
    """Linear warm-up over warmup_iters, then cosine decay from lr to lr * min_lr_ratio at max_iters."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(it, n, args):
    """Indices of step `it`'s batch: epochs are fresh permutations drawn from (seed, epoch), so the
    data order is a pure function of the step and a resumed run sees exactly the same batches."""
    per_epoch = epoch_steps(n, args.batch_size)
    epoch, j = divmod(it, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
    return perm[j * args.batch_size:(j + 1) * args.batch_size]


def batch_mask(it, n, task, args):
    """The tokens hidden in step `it`'s batch: fresh every step, a pure function of (seed, step) like
    the batch itself, so a resumed run hides the same ones."""
    gen = torch.Generator().manual_seed(MASK_SEEDS + args.seed * 1_000_003 + it)
    return tasks.random_mask(n, len(task.coords), task.mask_frac, gen)


def training_batch(it, train, task, args):
    """A run's batch at step `it`: its own data order and, for masked prediction, its own hidden tokens."""
    idx = batch_indices(it, len(train["y"]), args)
    batch = {k: v[idx] for k, v in train.items()}
    if task.head == "token":
        batch["mask"] = batch_mask(it, len(idx), task, args)
    return batch


@torch.no_grad()
def evaluate(models, task, device, forward=forward_models, batch_size=1024):
    """Every split, for each of K models (a dict each): loss and accuracy, with accuracy per class, of a
    classifier; MSE and R^2 (1 - SSE/SST, SST around the targets' mean) over the hidden tokens, with the
    split's fixed masks, of masked prediction."""
    for model in models:
        model.eval()
    out = [{} for _ in models]
    for name, s in task.splits.items():
        chunks = []
        for i in range(0, len(s["y"]), batch_size):  # every model sees the same samples
            x, readout, mask = (s[k][i:i + batch_size].expand(len(models), -1, *s[k].shape[1:]).to(device)
                                if k in s else None for k in ("x", "readout", "mask"))
            chunks.append(forward(models, x, readout, mask).float().cpu())
        for m, pred in zip(out, torch.cat(chunks, dim=1)):
            if task.head == "token":
                p, y = pred[s["mask"]], s["y"][s["mask"]]
                m[f"{name}_mse"] = F.mse_loss(p, y).item()
                m[f"{name}_r2"] = analyze.r2(p, y)
                continue
            correct = (pred.argmax(1) == s["y"]).float()
            m[f"{name}_loss"] = F.cross_entropy(pred, s["y"]).item()
            m[f"{name}_acc"] = correct.mean().item()
            for k, cls in enumerate(task.classes):
                m[f"{name}_acc_{cls}"] = correct[s["cls"] == k].mean().item()
    for model in models:
        model.train()
    return out


@dataclass
class Run:
    """One run: its flags, model and optimiser, the state its checkpoint carries, and how it ended."""
    args: argparse.Namespace
    model: torch.nn.Module
    ckpt: dict = None  # the checkpoint it resumes from
    summary: dict = None  # set when it finished or diverged
    opt: torch.optim.Optimizer = None
    state: dict = field(default_factory=dict)  # iter, elapsed, pe_rsa_init, fit_iter: saved in every checkpoint
    ratios: dict = field(default_factory=dict)  # its PE's norm over the tokens' and the stream's, at init
    saved: int = None  # the step its latest checkpoint holds
    last: dict = None  # its latest eval
    t0: float = 0.0

    def name(self, many):
        """The prefix of a run's printed lines, when several runs share the output."""
        return f"{self.args.out_dir}: " if many else ""


def prepare_out_dir(run):
    """Refuse to overwrite another run; load what --resume continues from (a checkpoint), or a summary that says
    the run needs nothing more (finished or diverged). Reads only: an old run is cleared by start()."""
    ckpt, metrics, summary = (os.path.join(run.args.out_dir, f) for f in ("ckpt.pt", "metrics.jsonl", "summary.json"))
    if run.args.resume and os.path.exists(ckpt):
        try:
            run.ckpt = analyze.read_checkpoint(ckpt)
        except ValueError as e:
            die(f"--resume: {e}")
        diff = {k: (v, vars(run.args).get(k)) for k, v in run.ckpt["args"].items()
                if k not in RUNTIME_ARGS + derived(run.args) and vars(run.args).get(k) != v}
        if diff:
            die(f"--resume: {run.args.out_dir} holds a run with other settings (saved, given): {diff}")
        run.saved = run.ckpt["state"]["iter"]
    if run.args.resume and os.path.exists(summary):
        try:
            run.summary = analyze.read_json(summary)
        except ValueError as e:
            die(f"--resume: {e}")
        how = f"diverged at step {run.summary['diverged_at']}" if run.summary.get("diverged") else "finished"
        return print(f"{run.args.out_dir} is {how}; nothing to do")
    if run.ckpt is None and any(os.path.exists(f) for f in (ckpt, metrics, summary)) and not (
            run.args.force or run.args.resume):
        die(f"{run.args.out_dir} already holds a run; pass --resume to continue it or --force to overwrite it")


def lock(out_dir):
    """Hold a run directory until release(): an flock on out_dir/lock, which holds this process's id and which the OS
    frees however the process ends. Another process holding it ends this one (exit 2); the lock of a process that died
    is taken over, with one line. Returns what release() needs: the open lock file and the directories made for it."""
    made, path = tasks.missing_dirs(out_dir), os.path.join(out_dir, LOCK)
    while True:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            die(f"{out_dir} is in use by process {holder} (it holds {path}); wait for it to end")
        if os.fstat(f.fileno()).st_nlink:  # not a file its last holder removed on release while we opened it
            break
        f.close()
    f.seek(0)
    if holder := f.read().strip():  # only a holder that died leaves its id behind: release() removes the file
        print(f"train.py: {out_dir}: taking over the lock of process {holder}, which ended without releasing it",
              file=sys.stderr)
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f, made


def release(held):
    """Give a run directory back: remove its lock file, then close it (freeing the flock), then the directories made
    for it if they stayed empty (a refused run leaves nothing behind)."""
    f, made = held
    with contextlib.suppress(FileNotFoundError):  # the directory was removed while the run trained
        os.remove(f.name)
    f.close()
    tasks.remove_dirs(made)


def build_model(args, task):
    """The run's model, built exactly as the run alone builds it: seeded by its seed, drawn with its sigma."""
    cfg = ModelConfig(n_tokens=len(task.coords), in_dim=task.in_dim, n_out=task.n_out, head=task.head,
                      readout=args.readout, masked=task.head == "token", n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, dropout=args.dropout, norm=args.norm, embed_std=args.embed_std, pe=args.pe,
                      pe_layers=args.pe_layers, init=args.init, init_std=args.init_std, mlp_out_gelu=args.mlp_out_gelu,
                      attn_init=args.attn_init)
    try:
        return init_model(cfg, task.coords, args.seed)
    except ValueError as e:
        die(str(e))


def start(run, task, tokens, device):
    """Put a run on the device with its optimiser, note its PE at init, and restore its checkpoint if resumed."""
    args = run.args
    for f in RUN_FILES if run.ckpt is None else ():  # a fresh start: nothing of an old run may survive
        if os.path.exists(os.path.join(args.out_dir, f)):
            os.remove(os.path.join(args.out_dir, f))
    run.model.to(device)
    run.opt = adamw(run.model.param_groups(args.weight_decay, args.pe_weight_decay), device, lr=args.lr,
                    betas=tuple(args.betas))
    ident0 = analyze.identifiability(run.model, task.coords, task.references, task.twins, tokens)
    run.ratios = analyze.norm_ratios(run.model, tokens)
    run.state = {"iter": 0, "elapsed": 0.0, "pe_rsa_init": ident0["pe_rsa"], "fit_iter": None, "stopped": False}
    if run.ckpt is not None:
        run.model.load_state_dict(run.ckpt["model"])
        run.opt.load_state_dict(run.ckpt["optimizer"])
        torch.set_rng_state(run.ckpt["rng"])  # runs resumed together were saved together, with one state
        run.state = run.ckpt["state"]
        print(f"resuming {args.out_dir} at step {run.state['iter']}")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "metrics.jsonl")
    try:
        kept = analyze.read_json(path, lines=True) if run.ckpt is not None else []
    except ValueError as e:
        die(f"--resume: {e}")
    kept = [m for m in kept if m["iter"] <= run.state["iter"]]  # not the evals made after the checkpoint
    tasks.atomic_save("".join(json.dumps(m) + "\n" for m in kept), path)
    tasks.atomic_save(json.dumps(record(run), indent=1) + "\n", os.path.join(args.out_dir, "run.json"))
    run.last = kept[-1] if kept and kept[-1]["iter"] == run.state["iter"] else None  # the checkpoint's own eval
    norm = "n/a" if ident0["pe_norm"] is None else f"{ident0['pe_norm']:.3f}"
    return (f"PE row norm {norm} vs embedded-token norm {ident0['tok_norm']:.3f} (at init)"
            + "".join(f"; {k} {v:.2f}" for k, v in run.ratios.items() if v is not None))


def log_evals(due, task, args, device, forward, ctx, tokens):
    """Evaluate the due runs at once; append each one's line to its metrics.jsonl and note its fit."""
    if not due:
        return
    with ctx:
        ms = evaluate([run.model for run in due], task, device, forward)
    for run, m in zip(due, ms):
        m.update({"iter": run.state["iter"], "epoch": run.state["iter"] / epoch_steps(len(task.splits["train"]["y"]),
                                                                                   args.batch_size),
                  "lr": lr_at(run.state["iter"], args), "elapsed": run.state["elapsed"]},
                 **analyze.identifiability(run.model, task.coords, task.references, task.twins, tokens))
        path = os.path.join(run.args.out_dir, "metrics.jsonl")
        try:
            with open(path, "a") as f:
                f.write(json.dumps(m) + "\n")
        except OSError as e:  # a failed write names no file; the half line it may leave, --resume drops (start())
            e.filename = path
            raise
        if run.state["fit_iter"] is None and fitted(m, args, task):
            run.state["fit_iter"] = run.state["iter"]
        run.last = m


def fitted(m, args, task):
    """Whether an eval fits the training set (--stop-train-acc, else 0.999); None for a regression."""
    if task.head != "cls":
        return None
    return m["train_acc"] >= (args.stop_train_acc if args.stop_train_acc is not None else 0.999)


def save_checkpoint(run):
    tasks.atomic_save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                       "model_config": asdict(run.model.cfg), "args": vars(run.args), "state": run.state,
                       "rng": torch.get_rng_state()}, os.path.join(run.args.out_dir, "ckpt.pt"))
    run.saved = run.state["iter"]


def record(run):
    """run.json: what the run is (identity) and its PE's norm ratios at init, so that a run's metrics.jsonl can be
    tabled at any epoch, finished or not (analyze.py --epoch)."""
    return identity(run) | run.ratios | {"pe_rsa_init": run.state["pe_rsa_init"]}


def identity(run):
    """What names a run in its summary: task, PE, its sigma and seed, the model settings under study, its preset and
    the flags it changed from what its task and preset give (its label), and all its flags."""
    args = run.args
    return {"task": args.task, "pe": args.pe, "init": args.init, "init_std": args.init_std,
            "pe_layers": args.pe_layers, "readout": args.readout, "embed_std": args.embed_std,
            "weight_decay": args.weight_decay, "preset": args.preset, "seed": args.seed,
            "data_seed": args.data_seed, "data": args.data if args.task == "grid2d" else None,
            **({"layout": args.net_layout} if args.task == "network" else {}),  # one network task, many geometries
            "changes": changes(args), "args": {k: v for k, v in vars(args).items() if k not in RUNTIME_ARGS},
            "pe_shape": None if (t := analyze.pe_tables(run.model)) is None else list(t.shape)}


def changes(args):
    """The flags of a run that differ from what its task and preset alone give: what tells it apart in a table."""
    base = vars(get_args(["--task", args.task] + (["--preset", args.preset] if args.preset else [])))
    same = RUNTIME_ARGS + derived(args) + ("task", "preset", "pe", "init_std", "init_stds", "seed", "seeds")
    return {k: v for k, v in vars(args).items() if k not in same and base.get(k) != v}


def finish(run, args, task, n_params):
    """The run's summary.json from its last eval (and a last checkpoint); prints its headline numbers."""
    m, state = run.last, run.state
    state["elapsed"] = time.time() - run.t0
    run.summary = identity(run) | {
        "iters": state["iter"], "wall_s": round(state["elapsed"], 1), "fitted": fitted(m, args, task),
        "fit_iter": state["fit_iter"], "epoch": m["epoch"], "n_params": n_params,
        **{k: v for k, v in m.items() if k.endswith(("_acc", "_mse", "_r2")) or "_acc_" in k},
        **{k: v for k, v in m.items() if k.startswith("pe_") or k == "tok_norm"}, **run.ratios,
        "pe_rsa_init": state["pe_rsa_init"],
        "pe_rsa_delta": None if m["pe_rsa"] is None else m["pe_rsa"] - state["pe_rsa_init"],
        "out_dir": run.args.out_dir}
    save_checkpoint(run)
    write_summary(run)
    return json.dumps({k: v for k, v in run.summary.items() if k.endswith(("acc", "_r2")) or k.startswith("pe_rsa")
                       or k in ("iters", "wall_s", "fitted")})


def write_summary(run):
    tasks.atomic_save(json.dumps(run.summary, indent=1) + "\n", os.path.join(run.args.out_dir, "summary.json"))


def diverge(run, args, what, step):
    """Stop a run whose loss (or weights) is no longer finite at `step`: its last checkpoint and metrics.jsonl stay
    as they are, and its summary says where it diverged, so --table lists it as diverged and --resume skips it."""
    run.summary = identity(run) | {"diverged": True, "diverged_at": step, "why": what, "iters": run.saved,
                                         "fitted": False, "out_dir": run.args.out_dir}
    write_summary(run)
    kept = "its metrics.jsonl is kept (no checkpoint yet)" if run.saved is None else \
        f"its checkpoint (step {run.saved}) and metrics.jsonl are kept"
    return (f"train.py: {run.args.out_dir}: {what} at step {step}; the run diverged (is --lr {args.lr:g} too "
            f"high?); {kept}")


def main(argv=None):
    """Train every run the flags ask for (one unless --seeds/--init-stds) in one loop; returns their summaries."""
    # setup: flags, threads, device; a bad flag ends here, before anything is written
    all_runs_args = runs(get_args(argv))
    args = all_runs_args[0]  # what the runs share: everything but seed, init_std and out_dir
    torch.set_flush_denormal(True)  # tiny (small-sigma) PE values would otherwise become slow denormals
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, use_compile, use_vmap = settings(args.device, args.dtype, args.compile, args.vmap)
    ctx = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    try:
        task = tasks.get_task(args.task, args, with_data=False)
    except (FileNotFoundError, ValueError) as e:  # brain3d: data not installed, or a window longer than a run
        die(str(e))
    all_runs = [Run(a, build_model(a, task)) for a in all_runs_args]
    many = len(all_runs) > 1

    # resume: what each run continues from, read under its lock; finished and diverged runs need nothing
    held, active = [], []  # the run directories' locks, released however main ends
    try:
        for run in all_runs:
            held.append(lock(run.args.out_dir))
            prepare_out_dir(run)
        active = [run for run in all_runs if run.summary is None]
        if active:
            train(active, args, many, device, dtype, use_compile, use_vmap, ctx)
    except KeyboardInterrupt:  # checkpoints are written atomically: each run continues from its latest
        for run in active:
            if run.summary is None:
                where = "starts it afresh" if run.saved is None else f"continues from step {run.saved}"
                step = run.state.get("iter", run.saved or 0)  # before start(), where its checkpoint left it
                print(f"train.py: {run.args.out_dir}: interrupted at step {step}; --resume {where}", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except OSError as e:  # a full disk: checkpoints and summaries are written atomically, so the last ones stand
        die(f"{e.filename}: {e.strerror}; every run keeps its last checkpoint, which --resume continues from",
            WRITE_FAILED)
    finally:
        for h in reversed(held):  # the last first: the first run's lock may have made the others' parent
            release(h)
    if any(run.summary.get("diverged") for run in all_runs):  # diverged now, or before a --resume
        sys.exit(DIVERGED)
    return [run.summary for run in all_runs]


def train(active, args, many, device, dtype, use_compile, use_vmap, ctx):
    """The training loop of the runs that are not done yet, each to its own end: max_iters, a fit, or divergence."""
    try:
        task = tasks.get_task(args.task, args)
    except ValueError as e:  # a dataset cache that cannot be written
        die(str(e))
    in_steps([args] + [run.args for run in active], len(task.splits["train"]["y"]))
    n_params = sum(p.numel() for p in active[0].model.parameters())
    print(f"{args.task}: {len(task.coords)} tokens; " + ", ".join(f"{k} {len(v['y'])}" for k, v in task.splits.items()))
    at_once = f"; {len(active)} runs at once ({'vmap' if use_vmap else 'loop'})" if many else ""
    print(f"model: {n_params / 1e6:.2f} M parameters, pe={args.pe} ({args.pe_layers}), device={device}, dtype={dtype}, "
          f"compile={use_compile}{at_once}")
    tokens = analyze.training_tokens(task)  # the embedded tokens' norm is the unit of a PE's
    for run in active:
        print(run.name(many) + start(run, task, tokens, device))
    forward = forward_models if not use_vmap else vmapped
    # one static graph for the training step; evaluation runs eager, since each of its chunk sizes would need a graph
    # of its own (a vmap compiled with dynamic shapes fails in torch 2.13)
    step_forward = torch.compile(forward, dynamic=False) if use_compile else forward
    train_split = task.splits["train"]
    key = "acc" if task.head == "cls" else "r2"  # the headline metric per split
    bar = tqdm(total=args.max_iters, initial=min(run.state["iter"] for run in active), dynamic_ncols=True,
               desc=os.path.basename(args.out_dir) if not many else f"{len(active)} runs",
               disable=not sys.stderr.isatty())  # in a log file, the eval lines below are the progress
    for run in active:
        run.t0 = time.time() - run.state["elapsed"]
    log_evals([run for run in active if run.state["iter"] == 0], task, args, device, forward, ctx, tokens)
    training = [run for run in active if run.state["iter"] < args.max_iters and not run.state.get("stopped")]
    for run in active:
        if run not in training:  # interrupted after its last step or its fit, before its summary
            if run.last is None:
                log_evals([run], task, args, device, forward, ctx, tokens)
            tqdm.write(run.name(many) + finish(run, args, task, n_params))
    while training:  # one step of every run still training: one forward and one backward for all
        # lr: each run's schedule at its own step
        for run in training:
            for g in run.opt.param_groups:
                g["lr"] = lr_at(run.state["iter"], args)
        # batch: each run's own data order, stacked into (K, B, ...)
        batches = [training_batch(run.state["iter"], train_split, task, run.args) for run in training]
        batch = {k: torch.stack([b[k] for b in batches]).to(device) for k in batches[0]}
        # step
        out, losses = train_step([run.model for run in training], [run.opt for run in training], batch, task.head,
                                 step_forward, ctx)
        # a loss that is no longer finite ends its run here, before its broken weights are evaluated or saved
        for run, loss in zip(training, losses.tolist()):
            if not math.isfinite(loss):
                tqdm.write(diverge(run, args, f"loss is {loss}", run.state["iter"] + 1), file=sys.stderr)
        for run in training:
            run.state["iter"] += 1
        # log
        bar.update(1)
        if bar.n % 10 == 0 and not bar.disable:
            acc = {"acc": f"{(out.argmax(-1) == batch['y']).float().mean().item():.3f}"} if task.head == "cls" else {}
            bar.set_postfix(loss=f"{losses.mean().item():.4f}", **acc)
        # eval + checkpoint (never of weights a non-finite gradient broke while the loss was still finite)
        due = [run for run in training if run.summary is None and
               (run.state["iter"] % args.eval_interval == 0 or run.state["iter"] == args.max_iters)]
        for run in due:
            if not all(p.isfinite().all() for p in run.model.parameters()):
                tqdm.write(diverge(run, args, "the weights are no longer finite", run.state["iter"]), file=sys.stderr)
        due = [run for run in due if run.summary is None]
        for run in due:
            run.state["elapsed"] = time.time() - run.t0
        log_evals(due, task, args, device, forward, ctx, tokens)
        for run in due:
            m = run.last
            tqdm.write(f"{run.name(many)}step {run.state['iter']}: " + " ".join(
                f"{s} {m[f'{s}_{key}']:.4f}" for s in task.splits)
                + f" pe_rsa {m['pe_rsa'] if m['pe_rsa'] is None else round(m['pe_rsa'], 3)}")
            run.state["stopped"] = args.stop_train_acc is not None and fitted(m, args, task)  # resumed as stopped
            save_checkpoint(run)
        # stop: a run leaves the batch when it reached max_iters, fitted or diverged
        for run in due:
            if run.state["stopped"] or run.state["iter"] >= args.max_iters:
                tqdm.write(run.name(many) + finish(run, args, task, n_params))
        training = [run for run in training if run.summary is None]
    bar.close()


def vmapped(models, x, readout=None, mask=None):
    """forward_models as one vmap over the models' stacked weights."""
    return forward_models(models, x, readout, mask, vmap=True)


if __name__ == "__main__":
    main()
