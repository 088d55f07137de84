"""
Train a transformer with one positional encoding on one task, and measure what its PE learned; or K such
runs at once (--seeds, --init-stds), each with its own init and data order, as one batched computation.

    python train.py --task grid2d --pe learned --init-std 0.02
    python train.py --task network --net-layout lattice --pe learned --init-std 0.02
    python train.py --task brain3d --pe learned --init-std 0.02
    python train.py --pe learned --init-stds 0.02,0.2 --seeds 0,1,2 --out-dir 'sweep/learned-{init_std:g}-s{seed}'
    python train.py --preset paper-short --init-std 0.2    # the authors' model on their puzzles, to epoch 200

Flags come from dataclass fields with a help text (config.py): each task's flags class (tasks.py), model.ModelConfig
and config.TrainConfig. Defaults: the field's, then the task's (its DEFAULTS), then a --preset's, then the flags given.

Each run's directory (rundir.py) gets run.json at its start, ckpt.pt at every eval, a metrics.jsonl line per eval and
summary.json at its end; a lock file holds it while a process trains it (a second process is refused; --resume takes
over the lock of one that died). --resume continues interrupted runs to the same result and skips finished and
diverged ones. On CUDA: torch.compile, bf16 autocast and one vmap over the K models; on CPU: fp32, a loop over them.

Exit status: 0 done; 2 a bad flag, device or directory, or a run directory another process holds (one line, nothing
written); 3 a run diverged (its loss became NaN or infinite: it stops there, keeps its last checkpoint and
metrics.jsonl, and its summary.json says "diverged"; the other runs go on), now or, found by --resume, before;
4 a file could not be written (a full disk: one line naming it; every run keeps its last checkpoint, and --resume
continues it to the same result); 130 interrupted (Ctrl-C; every checkpoint stays valid for --resume).
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import config
import metrics
import rundir
import tasks
from model import adamw, forward_models, init_model, settings, train_step


STATE = ("iter", "elapsed", "pe_rsa_init", "fit_iter", "stopped")  # the loop state a checkpoint carries
DIVERGED, WRITE_FAILED, INTERRUPTED = 3, 4, 130  # exit statuses


def die(msg, status=2):
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(status)


def lr_at(it, args):
    """Linear warm-up over warmup_iters, then cosine decay from lr to lr * min_lr_ratio at max_iters."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(args, task):
    """The run's model, built exactly as the run alone builds it: seeded by its seed, drawn with its sigma."""
    return init_model(config.model_config(args, task), task.coords, args.seed)


# ----------------------------------------------------------------------------- one run
@dataclass
class Run:
    """One run: its flags, what its directory held, its model and optimiser, its loop state (STATE, saved in every
    checkpoint) and how it ended."""
    args: argparse.Namespace
    ckpt: dict = None  # the checkpoint it resumes from
    summary: dict = None  # set when it finished or diverged
    model: torch.nn.Module = None
    opt: torch.optim.Optimizer = None
    iter: int = 0
    elapsed: float = 0.0
    pe_rsa_init: float = None
    fit_iter: int = None
    stopped: bool = False  # by --stop-train-acc, so a resumed run stays stopped
    ratios: dict = field(default_factory=dict)  # its PE's norm over the tokens' and the stream's, at init
    saved: int = None  # the step its latest checkpoint holds
    last: dict = None  # its latest eval
    t0: float = 0.0
    prefix: str = ""  # of its printed lines: its directory, when several runs share the output

    def identity(self):
        """What the run is (config.identity), for its run.json and summary.json."""
        shape = None if (t := metrics.pe_tables(self.model)) is None else list(t.shape)
        return config.identity(config.flags(self.args), shape, config.changes(self.args))

    def record(self):
        """run.json: what the run is and its PE's norm ratios at init, so that its metrics.jsonl can be tabled at any
        epoch, finished or not (analyze.py --epoch)."""
        return self.identity() | self.ratios | {"pe_rsa_init": self.pe_rsa_init}


def open_run(args):
    """The run in args.out_dir as its directory holds it (locked by the caller): to continue from a checkpoint, to
    start afresh, or done (finished or diverged: nothing to do)."""
    compared = set(config.flags(args)) - set(config.derived(args))
    ckpt, summary = rundir.open_run(args.out_dir, config.flags(args), args.resume, args.force, compared)
    run = Run(args, ckpt, summary)
    if ckpt is not None:
        run.saved = run.iter = ckpt["state"]["iter"]
    if summary is not None:
        how = f"diverged at step {summary['diverged_at']}" if summary.get("diverged") else "finished"
        print(f"{args.out_dir} is {how}; nothing to do")
    return run


def start(run, task, tokens, device):
    """Put a run on the device with its optimiser, note its PE at init, and restore its checkpoint if resumed."""
    args = run.args
    if run.ckpt is None:  # a fresh start: nothing of an old run may survive
        rundir.clear(args.out_dir)
    run.model.to(device)
    run.opt = adamw(run.model.param_groups(args.weight_decay, args.pe_weight_decay), device, lr=args.lr,
                    betas=tuple(args.betas))
    ident0 = metrics.identifiability(run.model, task.coords, task.references, task.twins, tokens)
    run.ratios, run.pe_rsa_init = metrics.norm_ratios(run.model, tokens), ident0["pe_rsa"]
    kept = []
    if run.ckpt is not None:
        run.model.load_state_dict(run.ckpt["model"])
        run.opt.load_state_dict(run.ckpt["optimizer"])
        torch.set_rng_state(run.ckpt["rng"])  # runs resumed together were saved together, with one state
        for k in STATE:
            setattr(run, k, run.ckpt["state"].get(k, getattr(run, k)))
        print(f"resuming {args.out_dir} at step {run.iter}")
        try:
            kept = rundir.read_json(os.path.join(args.out_dir, "metrics.jsonl"), lines=True)
        except ValueError as e:
            raise ValueError(f"--resume: {e}") from None
    kept = [m for m in kept if m["iter"] <= run.iter]  # not the evals made after the checkpoint
    rundir.write_metrics(args.out_dir, kept)
    rundir.drop_tables_after(args.out_dir, run.iter)
    rundir.write_json(args.out_dir, "run.json", run.record())
    run.last = kept[-1] if kept and kept[-1]["iter"] == run.iter else None  # the checkpoint's own eval
    norm = "n/a" if ident0["pe_norm"] is None else f"{ident0['pe_norm']:.3f}"
    return (f"PE row norm {norm} vs embedded-token norm {ident0['tok_norm']:.3f} (at init)"
            + "".join(f"; {k} {v:.2f}" for k, v in run.ratios.items() if v is not None))


def log_evals(due, task, args, device, forward, ctx, tokens):
    """Evaluate the due runs at once; append each one's line to its metrics.jsonl and note its fit."""
    if not due:
        return
    with ctx:
        ms = metrics.evaluate([run.model for run in due], task, device, forward)
    for run, m in zip(due, ms):
        n_train = tasks.n_samples(task.splits["train"])
        m.update({"iter": run.iter, "epoch": run.iter / tasks.epoch_steps(n_train, args.batch_size),
                  "lr": lr_at(run.iter, args), "elapsed": run.elapsed},
                 **metrics.identifiability(run.model, task.coords, task.references, task.twins, tokens))
        rundir.append_metrics(run.args.out_dir, m)
        tables = metrics.pe_tables(run.model)
        if tables is not None and (run.iter == 0 or run.model.pe.weight.requires_grad):  # a fixed table: once
            rundir.save_tables(run.args.out_dir, run.iter, tables)
        if run.fit_iter is None and metrics.fitted(m, args, task):
            run.fit_iter = run.iter
        run.last = m


def save_checkpoint(run):
    rundir.save_checkpoint(run.args.out_dir, {
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "model_config": asdict(run.model.cfg),
        "args": vars(run.args), "state": {k: getattr(run, k) for k in STATE}, "rng": torch.get_rng_state()})
    run.saved = run.iter


def finish(run, args, task, n_params):
    """The run's summary.json from its last eval (and a last checkpoint); prints its headline numbers."""
    m = run.last
    run.elapsed = time.time() - run.t0
    run.summary = run.identity() | {
        "iters": run.iter, "wall_s": round(run.elapsed, 1), "fitted": metrics.fitted(m, args, task),
        "fit_iter": run.fit_iter,
        "epoch": m["epoch"], "n_params": n_params,
        **{k: v for k, v in m.items() if k.endswith(("_acc", "_mse", "_r2")) or "_acc_" in k},
        **{k: v for k, v in m.items() if k.startswith("pe_") or k == "tok_norm"}, **run.ratios,
        "pe_rsa_init": run.pe_rsa_init,
        "pe_rsa_delta": None if m["pe_rsa"] is None else m["pe_rsa"] - run.pe_rsa_init, "out_dir": run.args.out_dir}
    save_checkpoint(run)
    rundir.write_json(run.args.out_dir, "summary.json", run.summary)
    return json.dumps({k: v for k, v in run.summary.items() if k.endswith(("acc", "_r2")) or k.startswith("pe_rsa")
                       or k in ("iters", "wall_s", "fitted")})


def diverge(run, args, what, step):
    """Stop a run whose loss (or weights) is no longer finite at `step`: its last checkpoint and metrics.jsonl stay
    as they are, and its summary says where it diverged, so --table lists it as diverged and --resume skips it."""
    run.summary = run.identity() | {"diverged": True, "diverged_at": step, "why": what, "iters": run.saved,
                                    "fitted": False, "out_dir": run.args.out_dir}
    rundir.write_json(run.args.out_dir, "summary.json", run.summary)
    kept = "its metrics.jsonl is kept (no checkpoint yet)" if run.saved is None else \
        f"its checkpoint (step {run.saved}) and metrics.jsonl are kept"
    return (f"train.py: {run.args.out_dir}: {what} at step {step}; the run diverged (is --lr {args.lr:g} too "
            f"high?); {kept}")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    """Train every run the flags ask for (one unless --seeds/--init-stds) in one loop; returns their summaries."""
    held, all_runs = [], []  # the run directories' locks, released however main ends
    try:
        all_args = config.runs(config.get_args(argv, __doc__))  # a bad flag ends here, before anything is written
        for a in all_args:  # each directory locked, then read: what its run continues from, or that it is done
            held.append(rundir.lock(a.out_dir))
            all_runs.append(open_run(a))
        active = [run for run in all_runs if run.summary is None]
        if active:
            train(active, all_args[0])  # what the runs share: everything but seed, init_std and out_dir
    except ValueError as e:  # a bad flag, device, directory or file: one line
        die(str(e))
    except KeyboardInterrupt:  # checkpoints are written atomically: each run continues from its latest
        for run in all_runs:
            if run.summary is None:
                where = "starts it afresh" if run.saved is None else f"continues from step {run.saved}"
                print(f"train.py: {run.args.out_dir}: interrupted at step {run.iter}; --resume {where}",
                      file=sys.stderr)
        sys.exit(INTERRUPTED)
    except OSError as e:  # a full disk: checkpoints and summaries are written atomically, so the last ones stand
        die(f"{e.filename}: {e.strerror}; every run keeps its last checkpoint, which --resume continues from",
            WRITE_FAILED)
    finally:
        for h in reversed(held):  # the last first: the first run's lock may have made the others' parent
            rundir.release(h)
    if any(run.summary.get("diverged") for run in all_runs):  # diverged now, or before a --resume
        sys.exit(DIVERGED)
    return [run.summary for run in all_runs]


def train(active, args):
    """The training loop of the runs not done yet (one run: K = 1), each to its own end: max_iters, a fit, or
    divergence."""
    # machine: threads, device, autocast
    torch.set_flush_denormal(True)  # tiny (small-sigma) PE values would otherwise become slow denormals
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, use_compile, use_vmap = settings(args.device, args.dtype, args.compile, args.vmap)
    ctx = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    many = len(active) > 1
    # models, from the task's coordinates: a model the flags cannot build ends here, before any data are made
    try:
        shape = tasks.get_task(args.task, args, with_data=False)
    except FileNotFoundError as e:  # brain3d's data not installed: a bad flag, not a full disk
        raise ValueError(str(e)) from None
    for run in active:
        run.model = build_model(run.args, shape)
    # the task's data; epochs in steps of its training split
    task = tasks.get_task(args.task, args)  # a dataset cache that cannot be written: a ValueError
    config.in_steps([args] + [run.args for run in active], tasks.n_samples(task.splits["train"]))
    n_params = sum(p.numel() for p in active[0].model.parameters())
    sizes = ", ".join(f"{k} {tasks.n_samples(v)}" for k, v in task.splits.items())
    print(f"{args.task}: {len(task.coords)} tokens; {sizes}")
    at_once = f"; {len(active)} runs at once ({'vmap' if use_vmap else 'loop'})" if many else ""
    print(f"model: {n_params / 1e6:.2f} M parameters, pe={args.pe} ({args.pe_layers}), device={device}, dtype={dtype}, "
          f"compile={use_compile}{at_once}")
    tokens = metrics.training_tokens(task)  # the embedded tokens' norm is the unit of a PE's
    for run in active:
        run.prefix = f"{run.args.out_dir}: " if many else ""
        print(run.prefix + start(run, task, tokens, device))
    forward = forward_models if not use_vmap else vmapped
    # one static graph for the training step; evaluation runs eager, since each of its chunk sizes would need a graph
    # of its own (a vmap compiled with dynamic shapes fails in torch 2.13)
    step_forward = torch.compile(forward, dynamic=False) if use_compile else forward
    bar = tqdm(total=args.max_iters, initial=min(run.iter for run in active), dynamic_ncols=True,
               desc=os.path.basename(args.out_dir) if not many else f"{len(active)} runs",
               disable=not sys.stderr.isatty())  # in a log file, the eval lines below are the progress
    for run in active:
        run.t0 = time.time() - run.elapsed
    # the evals owed: at step 0, and of a run interrupted after its last step or its fit, before its summary
    log_evals([run for run in active if run.iter == 0], task, args, device, forward, ctx, tokens)
    training = [run for run in active if run.iter < args.max_iters and not run.stopped]
    for run in active:
        if run not in training:
            if run.last is None:
                log_evals([run], task, args, device, forward, ctx, tokens)
            tqdm.write(run.prefix + finish(run, args, task, n_params))
    while training:
        out, batch, losses = step(training, task, args, device, step_forward, ctx)
        bar.update(1)
        if bar.n % 10 == 0 and not bar.disable:
            acc = {"acc": f"{(out.argmax(-1) == batch['y']).float().mean().item():.3f}"} if task.head == "cls" else {}
            bar.set_postfix(loss=f"{losses.mean().item():.4f}", **acc)
        evals_due(training, task, args, device, forward, ctx, tokens, n_params)
        training = [run for run in training if run.summary is None]  # a run leaves at max_iters, a fit or divergence
    bar.close()


def step(training, task, args, device, forward, ctx):
    """One optimiser step of every run still training, each at its own lr and on its own batch, as one forward and one
    backward for all; a run whose loss is no longer finite ends here, before its broken weights are evaluated or
    saved. Returns the outputs, the stacked batch and the losses."""
    for run in training:
        for g in run.opt.param_groups:
            g["lr"] = lr_at(run.iter, args)
    batches = [tasks.training_batch(run.iter, task, args.batch_size, run.args.seed) for run in training]
    batch = {k: torch.stack([b[k] for b in batches]).to(device) for k in batches[0]}  # (K, B, ...)
    out, losses = train_step([run.model for run in training], [run.opt for run in training], batch, task.head, forward,
                             ctx)
    for run, loss in zip(training, losses.tolist()):
        if not math.isfinite(loss):
            tqdm.write(diverge(run, args, f"loss is {loss}", run.iter + 1), file=sys.stderr)
    for run in training:
        run.iter += 1
    return out, batch, losses


def evals_due(training, task, args, device, forward, ctx, tokens, n_params):
    """The evals due after a step (every eval_interval and at max_iters): evaluate those runs at once, log, print and
    checkpoint each, and finish those that reached max_iters or fitted (never evaluating or saving weights a
    non-finite gradient broke while the loss was still finite)."""
    due = [run for run in training if run.summary is None and
           (run.iter % args.eval_interval == 0 or run.iter == args.max_iters)]
    for run in due:
        if not all(p.isfinite().all() for p in run.model.parameters()):
            tqdm.write(diverge(run, args, "the weights are no longer finite", run.iter), file=sys.stderr)
    due = [run for run in due if run.summary is None]
    for run in due:
        run.elapsed = time.time() - run.t0
    log_evals(due, task, args, device, forward, ctx, tokens)
    key = "acc" if task.head == "cls" else "r2"  # the headline metric per split
    for run in due:
        m = run.last
        scores = " ".join(f"{s} {m[f'{s}_{key}']:.4f}" for s in task.splits)
        tqdm.write(f"{run.prefix}step {run.iter}: {scores}"
                   + f" pe_rsa {m['pe_rsa'] if m['pe_rsa'] is None else round(m['pe_rsa'], 3)}")
        run.stopped = args.stop_train_acc is not None and metrics.fitted(m, args, task)
        save_checkpoint(run)
        if run.stopped or run.iter >= args.max_iters:
            tqdm.write(run.prefix + finish(run, args, task, n_params))


def vmapped(models, x, readout=None, mask=None):
    """forward_models as one vmap over the models' stacked weights."""
    return forward_models(models, x, readout, mask, vmap=True)


if __name__ == "__main__":
    main()
