"""
Look inside trained positional encodings: load runs, table them, draw them (the metrics themselves: metrics.py).

    python analyze.py RUN_DIR [RUN_DIR ...]          # per run: figures + analysis.json; across runs: sweep figures
    python analyze.py SWEEP_DIR                       # the same for every run inside SWEEP_DIR
    python analyze.py RUN_DIR --puzzles FILE.csv      # score RUN_DIR/ckpt.pt on human-style LST items
    python analyze.py RUN_DIR [RUN_DIR ...] --table   # markdown table of summary.json, mean +- sample sd over seeds
    python analyze.py results/lst-h200/* --table --epoch 100 --reference  # every run at epoch 100, the authors' too
    python analyze.py RUNS --table --epoch all --per-run --columns human_acc,pe_sin_rsa  # every run at every eval
    python analyze.py RUN_DIR [RUN_DIR ...] --training   # figure 8: every run's metrics against epoch
    python analyze.py RUN_DIR [RUN_DIR ...] --linear  # R² of a linear predictor on each masked run's splits
    python analyze.py RUN_DIR --positions FILE.npz    # positions the PE suggests against a series file's coords
"""
import argparse
import csv
import functools
import glob
import io
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import pe as pe_lib
import rundir
import tasks
from config import label
from metrics import (chance_levels, cosine_matrix, distance_matrix, estimated_positions, linear_r2, pe_drift,
                     pe_metrics, pe_tables, position_recovery, principal_coords, procrustes, sinusoid_reference,
                     spearman, update_rsa, upper)
from model import ModelConfig, Transformer

REFERENCE_LOGS = os.path.join(tasks.LST_DIR, "lstnn_reference_logs.csv")  # the authors' logs: average rows
HUMAN_LST = {"binary": 0.967, "ternary": 0.870, "quaternary": 0.663}  # people on the 108 LST items (n = 40)


# ----------------------------------------------------------------------------- runs
def load_run(run_dir):
    """(model in eval mode, task without data, the run's training args) from RUN_DIR/ckpt.pt."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}")
    ckpt = rundir.read_checkpoint(path)
    try:
        args, config = SimpleNamespace(**ckpt["args"]), ckpt["model_config"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} cannot be read: a truncated or corrupt checkpoint? ({type(e).__name__})")
    task = tasks.get_task(args.task, args, with_data=False)
    model = Transformer(ModelConfig(**config), task.coords)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # a checkpoint of another version of the model
        raise ValueError(f"{path} does not fit this code's model: {str(e).splitlines()[-1].strip()[:150]}")
    return model.eval(), task, args


@torch.no_grad()
def score_puzzles(model, grids, answers, conditions, n):
    """Accuracy on LST items, overall and per condition."""
    x, query = tasks.encode_lst(grids, n)
    correct = (model(x, query).argmax(1) + 1 == torch.as_tensor(answers)).numpy()
    by = {c: float(correct[[k == c for k in conditions]].mean()) for c in sorted(set(conditions))}
    return {"n": int(len(correct)), "acc": float(correct.mean()), "by_condition": by}


def run_summary(run_dir):
    """summary.json of a run that finished or diverged (None if unfinished), as train.py wrote it."""
    return rundir.read_json(os.path.join(run_dir, "summary.json"))


def at_epoch(run_dir, epoch):
    """A run's summary at one epoch of its training, finished or not: what it is (run.json) and its metrics.jsonl
    line of that epoch; None when it logged no eval there."""
    s = rundir.read_json(os.path.join(run_dir, "run.json"))
    if s is None:
        raise ValueError(f"{run_dir} has no run.json: a run from before train.py wrote one cannot be read by epoch")
    lines = [m for m in rundir.read_json(os.path.join(run_dir, "metrics.jsonl"), lines=True)
             if abs(m.get("epoch", -1.0) - epoch) < 1e-9]
    if not lines:
        return None
    m = lines[-1]
    fit = m["train_acc"] >= 0.999 if "train_acc" in m else None
    tables = rundir.read_tables(run_dir)
    drift = {}
    if {0, m["iter"]} <= set(tables):
        drift["pe_drift"] = pe_drift(tables[0], tables[m["iter"]])
        # at init nothing was added yet; a series file may have no positions
        if m["iter"] and (coords := task_of(s).coords.numpy()).shape[1]:
            drift["pe_update_rsa"] = update_rsa(tables[0], tables[m["iter"]], coords)
    return s | drift | {k: v for k, v in m.items() if k.endswith(("_acc", "_mse", "_r2")) or "_acc_" in k or
                k.startswith("pe_") or k in ("epoch", "tok_norm")} | {"iters": m["iter"], "wall_s": m["elapsed"],
                                                                       "fitted": fit, "out_dir": run_dir}


def reference(epoch):
    """The authors' logs at their logged epoch nearest `epoch` (every 200): {label: {"epoch", "pe", "sigma",
    split_acc: per-seed values}}, labelled as a run of their setup here is ('learned σ=0.2', 'sinnd')."""
    with open(REFERENCE_LOGS, newline="") as f:
        rows = list(csv.DictReader(f))
    at = min({int(r["epoch"]) for r in rows}, key=lambda e: (abs(e - epoch), -e))  # a tie: the later epoch
    out = {}
    for r in rows:
        if int(r["epoch"]) == at:
            name = r["pe"] + (f" σ={float(r['sigma']):g}" if r["sigma"] else "")
            group = out.setdefault(name, {"epoch": at, "pe": r["pe"], "sigma": float(r["sigma"] or "nan")})
            group.setdefault(f"{r['split']}_acc", []).append(float(r["accuracy"]))
    return out


TABLE_COLUMNS = ("iters", "wall_s", "train_acc", "test_acc", "ood_acc", "human_acc", "human_acc_binary",
                 "human_acc_ternary", "human_acc_quaternary", "noise_acc", "test_acc_quaternary", "test_mse", "test_r2",
                 "ood_r2", "pe_tok_ratio", "pe_stream_ratio", "pe_rsa", "pe_sin_rsa", "pe_rsa_coupling", "pe_rsa_fc",
                 "pe_rsa_delta", "pe_layout_r2", "pe_neighbours", "pe_dim", "pe_twin_rank", "pe_modularity", "pe_norm",
                 "pe_drift", "pe_update_rsa", "tok_norm")


@functools.lru_cache(maxsize=16)
def task_from(name, args_json):
    return tasks.get_task(name, SimpleNamespace(**{"data_dir": None, **json.loads(args_json)}), with_data=False)


def task_of(s):
    """The task (coordinates and references, no data) of summary s's run, built once per task and flags."""
    return task_from(s["task"], json.dumps(s["args"], sort_keys=True))


def chance_of(s):
    """chance_levels for tables of the shape of summary s's PE on the coordinates (and references) of its task; what
    training added to a table (pe_update_rsa) has a random table's pe_rsa as its chance level too."""
    task = task_of(s)
    levels = chance_levels(tuple(s["pe_shape"]), task.coords, task.references, task.twins)
    return levels | ({"pe_update_rsa": levels["pe_rsa"]} if "pe_rsa" in levels else {})


def logged_epochs(run_dirs):
    """Every epoch at which one of the runs logged an eval, in order (--epoch all)."""
    return sorted({m["epoch"] for d in run_dirs for m in rundir.read_json(os.path.join(d, "metrics.jsonl"), lines=True)
                   if "epoch" in m})


def summary_table(run_dirs, epochs=None, with_reference=False, columns=TABLE_COLUMNS, per_run=False):
    """Markdown table of the runs' summary.json (or, given epochs, of their evals at each of those epochs), one row
    per label (PE, σ and settings) and epoch: mean +- sample sd over the runs in it (seeds), and how many of them fitted
    the training set; per_run: a row per run (its seed named) instead; with the authors' rows at their logged epoch
    nearest to each, if asked."""
    groups, chance, diverged, missing = {}, {}, [], []
    for d in run_dirs:
        for epoch in epochs or [None]:
            s = run_summary(d) if epoch is None else at_epoch(d, epoch)
            if s is None and epoch is not None:  # a run that has not reached the epoch yet
                missing.append(f"{os.path.basename(os.path.normpath(d))} @ {epoch:g}")
                continue
            if s is None:
                raise ValueError(f"no summary.json in {d}: an unfinished run (--epoch E tables runs at its evals)")
            if s.get("diverged"):
                diverged.append(s)
                continue
            name = label(s) + (f" seed {s['seed']}" if per_run else "") + (
                f" @ {epoch:g}" if epochs and len(epochs) > 1 else "")
            groups.setdefault(name, []).append(s)
            where = (s.get("layout"), tuple(s["pe_shape"] or ()))  # chance depends on the coordinates and the shape
            if s["pe_shape"] and where not in chance:
                chance[where] = chance_of(s)
    columns = [c for c in columns if any(c in r for runs in groups.values() for r in runs)]

    def cell(c, v):
        if c in ("iters", "wall_s"):
            return f"{np.mean(v):.0f}"
        if not v:
            return "–"
        pct = c.endswith("acc") or "_acc_" in c
        task_fit = c.endswith(("_r2", "_mse")) and not c.startswith("pe_") or c == "pe_drift"  # differ in the 3rd digit
        digits = 1 if pct else 3 if task_fit else 2
        scale = 100 if pct else 1
        if len(v) == 1:  # one run has no spread
            return f"{v[0] * scale:.{digits}f}"
        return f"{np.mean(v) * scale:.{digits}f} ± {np.std(v, ddof=1) * scale:.{digits}f}"

    lines = ["| PE | runs | fitted | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for name, runs in groups.items():
        vals = [[r[c] for r in runs if r.get(c) is not None] for c in columns]
        cells = [cell(c, v) for c, v in zip(columns, vals)]
        fitted = "–" if runs[0]["fitted"] is None else sum(r["fitted"] for r in runs)  # regression has no fit criterion
        lines.append(f"| {name} | {len(runs)} | {fitted} | " + " | ".join(cells) + " |")
    ours = {s["init_std"] if s["pe"] == "learned" else s["pe"] for runs in groups.values() for s in runs}
    theirs = {(name, ref["epoch"]): ref for e in (epochs or [200]) for name, ref in reference(e).items()
              } if with_reference else {}
    for (name, at), ref in theirs.items():  # the authors' rows beside the σ and PEs run here
        if (ref["sigma"] if ref["pe"] == "learned" else ref["pe"]) in ours:
            cells = [cell(c, ref[c]) if c in ref else "–" for c in columns]
            lines.append(f"| authors: {name} (epoch {at}) | {len(ref['test_acc'])} | – | " + " | ".join(cells) + " |")
    for s in diverged:  # not averaged with anything: its loss became NaN or infinite
        lines.append(f"| {label(s)} | diverged at step {s['diverged_at']} (seed {s['seed']}) | – | "
                     + " | ".join("–" for _ in columns) + " |")
    for (layout, shape), levels in chance.items():  # each PE metric's level by chance: mean ± sd (95th percentile)
        cells = [f"{levels[c]['mean']:.2f} ± {levels[c]['sd']:.2f} ({levels[c]['p95']:.2f})" if c in levels else "–"
                 for c in columns]
        on = f"{layout}: " if layout else ""
        lines.append(f"| {on}chance: random {'×'.join(map(str, shape))} | 100 draws | – | " + " | ".join(cells) + " |")
    lines.append("\nCells: mean ± sample sd (ddof 1) over a row's runs (one run: its value); chance: mean ± sd "
                 "(95th percentile) of 100 random tables.")
    if missing:
        lines.append(f"Left out, no eval logged there (not reached yet): {', '.join(missing)}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures of one run
def pyplot():
    """matplotlib.pyplot on the headless Agg backend (figures go to files only). Imported here, at the first
    figure, so that importing analyze for its metrics (train.py does) does not load matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Write fig to path as a PNG (200 dpi), atomically, and close it."""
    png = io.BytesIO()
    fig.savefig(png, dpi=200, format="png", bbox_inches="tight")
    rundir.atomic_save(png.getvalue(), path)
    pyplot().close(fig)


def position_colours(C):
    """A colour per token from its true position: axes mapped to colour channels."""
    C = np.asarray(C, dtype=np.float64)
    span = C.max(0) - C.min(0)
    U = (C - C.min(0)) / np.where(span > 0, span, 1)
    if C.shape[1] == 1:
        return pyplot().cm.viridis(U[:, 0])
    return np.stack([U[:, 0], U[:, 1], U[:, 2] if C.shape[1] > 2 else 1 - U.mean(1)], 1) * 0.85 + 0.05


def neighbour_pairs(C):
    """Pairs (i, j) where j is one of i's nearest tokens: the grid's lattice edges, a cloud's 1-NN graph."""
    D = distance_matrix(C)
    np.fill_diagonal(D, np.inf)
    near = D <= D.min(1, keepdims=True) * 1.01
    return [(i, j) for i, j in zip(*np.nonzero(near | near.T)) if i < j]


def grid_shape(C):
    """(rows, cols) when the coordinates fill an integer rectangle row-major, else None."""
    C = np.asarray(C)
    if C.shape[1] != 2 or not np.allclose(C, np.round(C)):
        return None
    rows, cols = int(np.ptp(C[:, 0])) + 1, int(np.ptp(C[:, 1])) + 1
    ok = rows * cols == len(C) and np.array_equal(C - C.min(0), np.stack(np.divmod(np.arange(len(C)), cols), 1))
    return (rows, cols) if ok else None


def plot_similarity(tables, C, path):
    """Figure 1: the PE's cosine similarity (each table, and their mean) beside the true-distance
    matrix and the fixed sinusoid on the same coordinates; titles give each one's RSA with distance."""
    plt = pyplot()
    mats = [cosine_matrix(t) for t in tables]
    negdist = -distance_matrix(C)
    panels = [(m, f"PE block {i}" if len(mats) > 1 else "PE") for i, m in enumerate(mats)]
    panels += [(np.mean(mats, 0), "PE, mean of blocks")] if len(mats) > 1 else []
    panels += [(sinusoid_reference(C, tables.shape[2]), "sinusoid (sinnd)"), (negdist, "− true distance")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False, layout="constrained")
    for ax, (m, title) in zip(axes[0], panels):
        im = ax.imshow(m, cmap="viridis")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        rho = "" if m is negdist else f"\nRSA with distance {spearman(upper(m), upper(negdist)):.2f}"
        ax.set_title(title + rho, fontsize=9)
        ax.set_xlabel("token")
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[0, 0].set_ylabel("token")
    save_figure(fig, path)
    return {title: m.tolist() for m, title in panels}


def plot_similarity_maps(tables, shape, path):
    """Figure 1b (grids): each token's PE similarity to every token, drawn on the grid (ViT-style)."""
    plt = pyplot()
    sim = np.mean([cosine_matrix(t) for t in tables], 0)
    rows, cols = shape
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.imshow(sim[i].reshape(rows, cols), cmap="viridis", vmin=-1, vmax=1)
        ax.plot(i % cols, i // cols, "r+", ms=6)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("PE cosine similarity of each token (+) to all tokens", fontsize=10)
    save_figure(fig, path)


def plot_points(X):
    """The axes' coordinates of points X (n, k) as plot and scatter take them: 1D points on a line (y = 0)."""
    return X.T if X.shape[1] > 1 else np.stack([X[:, 0], np.zeros(len(X))])


def plot_layout(tables, C, path):
    """Figure 2: the PE rows' top-k principal coordinates aligned to the true positions (Procrustes),
    true neighbours joined, coloured by true position; true positions in grey."""
    plt = pyplot()
    k = C.shape[1]
    colours, pairs = position_colours(C), neighbour_pairs(C)
    proj = {"projection": "3d"} if k == 3 else {}
    fig, axes = plt.subplots(1, len(tables), figsize=(3.8 * len(tables), 3.6), squeeze=False, subplot_kw=proj)
    layouts = []
    for t, (ax, P) in enumerate(zip(axes[0], tables)):
        Y, r2 = procrustes(C, principal_coords(P, k))
        layouts.append(Y.tolist())
        for i, j in pairs:
            ax.plot(*plot_points(Y[[i, j]]), color="0.5", lw=0.8, zorder=1)
        ax.scatter(*plot_points(C), s=12, color="0.8", zorder=0, label="true")
        ax.scatter(*plot_points(Y), s=28, c=colours, edgecolors="k", linewidths=0.3, zorder=2, label="PE")
        ax.set_title(f"{'block ' + str(t) + ': ' if len(tables) > 1 else ''}aligned PE layout, R² {r2:.2f}", fontsize=9)
        if k == 2:
            ax.set_aspect("equal")
            ax.invert_yaxis()  # row 0 at the top, as the grid is drawn
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    save_figure(fig, path)
    return layouts


def plot_curves(metrics, path):
    """Figure 3: training curves: loss, accuracy (or R^2) per split, pe_rsa, PE and token-embedding norms."""
    plt = pyplot()
    it = [m["iter"] for m in metrics]
    score = "acc" if "test_acc" in metrics[0] else "r2"
    loss = "loss" if score == "acc" else "mse"
    splits = [k[:-len(loss) - 1] for k in metrics[0] if k.endswith("_" + loss)]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for s in splits:
        axes[0].plot(it, [m[f"{s}_{loss}"] for m in metrics], label=s)
        axes[1].plot(it, [m.get(f"{s}_{score}") for m in metrics], label=s)
    axes[0].set_yscale("log")
    axes[2].plot(it, [m.get("pe_rsa") for m in metrics], label="RSA with distance")
    if "pe_layout_r2" in metrics[0]:
        axes[2].plot(it, [m["pe_layout_r2"] for m in metrics], label="layout R²")
    axes[3].plot(it, [m.get("pe_norm") for m in metrics], label="PE")
    axes[3].plot(it, [m["tok_norm"] for m in metrics], label="token embedding")
    titles = ("loss", "accuracy") if score == "acc" else ("MSE (hidden tokens)", "R²")
    for ax, title in zip(axes, (*titles, "PE identifiability", "mean row norm")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_classes(summary, classes, puzzles, path):
    """Figure 4 (grid2d): accuracy per complexity class on each split (human: the 108 puzzles people solved),
    beside any scored puzzle file and the people's own accuracy on those 108."""
    plt = pyplot()
    splits = [k[:-4] for k in summary if k.endswith("_acc") and not k.startswith("train")]
    bars = {s: [summary[f"{s}_acc_{c}"] for c in classes] for s in splits}
    for name, res in puzzles.items():
        by = {k.lower(): v for k, v in res["by_condition"].items()}
        if all(c in by for c in classes):
            bars[name] = [by[c] for c in classes]
    if "human" in bars or len(bars) > len(splits):
        bars["people (n = 40)"] = [HUMAN_LST[c] for c in classes]
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(classes), 3.2))
    w = 0.8 / len(bars)
    for b, (name, v) in enumerate(bars.items()):
        shown = "human puzzles" if name == "human" else name  # the model on them, beside the people
        ax.bar(np.arange(len(classes)) + (b - (len(bars) - 1) / 2) * w, v, w, label=shown)
    ax.set_xticks(range(len(classes)), [c.capitalize() for c in classes])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    save_figure(fig, path)
    return bars


def write_positions(X, run_dir):
    """A run's estimated token positions X (N, dims): positions.csv (token, x1, ...) and positions.png."""
    rows = [["token"] + [f"x{i + 1}" for i in range(X.shape[1])]] + [[i, *map(float, x)] for i, x in enumerate(X)]
    rundir.atomic_save("".join(",".join(map(str, r)) + "\n" for r in rows), os.path.join(run_dir, "positions.csv"))
    plt = pyplot()
    proj = {"projection": "3d"} if X.shape[1] == 3 else {}
    fig, ax = plt.subplots(figsize=(4.6, 4.2), subplot_kw=proj)
    ax.scatter(*plot_points(X if X.shape[1] > 1 else np.c_[X, np.zeros(len(X))]), s=18, c=np.arange(len(X)),
               cmap="viridis", edgecolors="k", linewidths=0.3)
    ax.set_title("token positions estimated from the PE (top principal coordinates of table 0)", fontsize=8)
    save_figure(fig, os.path.join(run_dir, "positions.png"))
    return X.tolist()


def analyze_run(run_dir, dims=2):
    """Every figure of one run and analysis.json with every number plotted; returns that dict. Positions unknown
    (a series file without coords): the positions the PE suggests, in `dims` dimensions, instead of the layout."""
    model, task, args = load_run(run_dir)
    C = task.coords.numpy()
    summary = rundir.read_json(os.path.join(run_dir, "summary.json"))
    metrics = rundir.read_json(os.path.join(run_dir, "metrics.jsonl"), lines=True)
    out = {"run": run_dir, "pe": args.pe, "init_std": args.init_std, "coords": C.tolist()}
    tables = pe_tables(model)
    if tables is not None:
        out["tables"] = [pe_metrics(t, C, task.references, task.twins) for t in tables]
        out["chance"] = chance_levels(tables.shape, C, task.references, task.twins)
    if tables is not None and not C.shape[1]:  # positions unknown: what the PE says they are
        out["positions"] = write_positions(estimated_positions(tables[0], dims), run_dir)
    elif tables is not None:
        out["similarity"] = plot_similarity(tables, C, os.path.join(run_dir, "pe_similarity.png"))
        out["layout"] = plot_layout(tables, C, os.path.join(run_dir, "pe_layout.png"))
        if grid_shape(C):
            plot_similarity_maps(tables, grid_shape(C), os.path.join(run_dir, "pe_maps.png"))
    if metrics:
        plot_curves(metrics, os.path.join(run_dir, "curves.png"))
        out["curves"] = metrics
    if summary and task.classes and not summary.get("diverged"):
        scored = sorted(glob.glob(os.path.join(run_dir, "puzzles-*.json")))
        puzzles = {os.path.basename(p)[8:-5]: rundir.read_json(p) for p in scored}  # puzzles-NAME.json -> NAME
        out["classes"] = plot_classes(summary, task.classes, puzzles, os.path.join(run_dir, "classes.png"))
    rundir.atomic_save(json.dumps(out) + "\n", os.path.join(run_dir, "analysis.json"))
    return out


# ----------------------------------------------------------------------------- figures of a sweep
TITLES = {"test_acc": "iid test accuracy", "ood_acc": "OOD accuracy", "human_acc": "human puzzles (108) accuracy",
          "pe_sin_rsa": "PE RSA with the 2D sinusoid", "test_r2": "test R²", "ood_r2": "OOD R²",
          "pe_rsa": "PE identifiability (RSA)", "pe_rsa_fc": "PE RSA with FC",
          "pe_twin_rank": "twin rank (1: homotopic, 47: chance)", "pe_layout_r2": "PE layout R²",
          "pe_norm": "PE mean row norm", "pe_drift": "PE distance from init (relative)",
          "pe_update_rsa": "RSA of the PE's change from init"}
SWEEP_EXTRAS = ("pe_rsa_fc", "pe_twin_rank")  # brain3d: function and homotopy beside anatomy
SERIES_COLOURS = ("k", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:olive")


def mean_sem(v):
    """(mean, standard error of the mean) of the values v; the error is 0 for a single value."""
    return float(np.mean(v)), float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def sweep_figures(summaries, out_dir, x="sigma", chance=None, authors=None):
    """Figure 5: generalisation (with the human puzzles, grid2d), pe_rsa (RSA with the true distances, our own
    measure) and pe_sin_rsa (RSA with the fixed sinusoid's cosine similarities, the paper's comparison; brain3d:
    also pe_rsa_fc and the twin rank) against the init std σ (x="ratio": against pe_tok_ratio, the PE's norm over
    the token embedding's at init), mean +- s.e.m. over seeds, one series per table PE and setting, fixed PEs as
    horizontal lines, a random table's chance level as a grey band (mean to 95th percentile); figure 6:
    generalisation against pe_rsa, one point per run. authors (reference()): their learned-σ curve (mean +- sd over
    their 15 seeds) and their sinusoid beside ours, on the panels they logged (x = σ only)."""
    plt = pyplot()
    from matplotlib.colors import LogNorm

    score = "acc" if "test_acc" in summaries[0] else "r2"
    keys = [f"test_{score}", f"ood_{score}", "human_acc", "pe_rsa", "pe_sin_rsa", *SWEEP_EXTRAS]
    keys = [k for k in keys if any(s.get(k) is not None for s in summaries)]
    groups = {}
    for s in summaries:
        groups.setdefault(label(s), []).append(s)
    stats = {name: {k: [r[k] for r in runs if r.get(k) is not None] for k in keys}
             | {"init_std": runs[0]["init_std"], "pe": runs[0]["pe"], "series": label(runs[0], sigma=False),
                "ratio": float(np.mean([r.get("pe_tok_ratio") or np.nan for r in runs]))}
             for name, runs in groups.items()}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), layout="constrained")
    tabled = [g for g in stats.values() if pe_lib.has_sigma(g["pe"])]
    series = sorted({g["series"] for g in tabled}, key=lambda n: (not n.startswith("learned"), n))
    fixed = [n for n, g in stats.items() if not pe_lib.has_sigma(g["pe"])]
    xkey = "init_std" if x == "sigma" else "ratio"
    lines = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, k in zip(axes, keys):
        for c, name in enumerate(series):
            pts = sorted((g[xkey], *mean_sem(g[k])) for g in tabled if g["series"] == name and g[k])
            if pts:
                xs, m, e = map(np.array, zip(*pts))
                ax.errorbar(xs, m, e, fmt="o-" if name.startswith("learned") else "s--", capsize=3, ms=4, label=name,
                            color=SERIES_COLOURS[c % len(SERIES_COLOURS)])
        for c, n in enumerate(fixed):
            if stats[n][k]:
                m, e = mean_sem(stats[n][k])
                ax.axhline(m, color=lines[c % len(lines)], lw=1, label=n)
                ax.axhspan(m - e, m + e, color=lines[c % len(lines)], alpha=0.15, lw=0)
        learned = sorted((g["sigma"], np.mean(g[k]), np.std(g[k], ddof=1)) for g in (authors or {}).values()
                         if g["pe"] == "learned" and k in g)
        if learned and x == "sigma":
            xs, m, e = map(np.array, zip(*learned))
            epoch = next(iter(authors.values()))["epoch"]
            ax.errorbar(xs, m, e, fmt="x:", color="0.45", capsize=2, ms=4, lw=1, label=f"authors, epoch {epoch}")
            if "sinnd" in authors and k in authors["sinnd"]:
                ax.axhline(np.mean(authors["sinnd"][k]), color="0.45", ls=":", lw=1, label="authors: sinnd")
        if chance and k in chance:
            ax.axhspan(chance[k]["mean"], chance[k]["p95"], color="0.8", alpha=0.6, lw=0, zorder=0,
                       label="chance (random table)")
        ax.set_xscale("log")
        if x == "sigma":  # the σ values run; ratios of two regimes crowd, so they keep the log axis' own ticks
            sigmas = sorted({g["init_std"] for g in tabled})
            ax.set_xticks(sigmas, [f"{t:g}" for t in sigmas], minor=False, rotation=45)
            ax.set_xticks([], minor=True)
        ax.set_xlabel("init std σ of the PE" if x == "sigma" else "PE norm / token-embedding norm at init")
        ax.set_title(TITLES.get(k, k), fontsize=10)
    handles = {lbl: h for ax in axes for h, lbl in zip(*ax.get_legend_handles_labels())}  # every series once
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="outside right upper")
    save_figure(fig, os.path.join(out_dir, "sweep_sigma.png"))

    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    y = "human_acc" if "human_acc" in keys else keys[1]  # the paper's OOD set where there is one
    norm, sc = LogNorm(*np.percentile([max(s["init_std"], 1e-4) for s in summaries], [0, 100])), None
    for kind, marker in zip(pe_lib.DRAWN, "os"):  # learned and fixed-random tables, coloured by σ
        runs = [s for s in summaries if s["pe"] == kind and s.get("pe_rsa") is not None and s.get(y) is not None]
        if runs:
            sc = ax.scatter([s["pe_rsa"] for s in runs], [s[y] for s in runs],
                            c=[max(s["init_std"], 1e-4) for s in runs], norm=norm, cmap="plasma", marker=marker,
                            edgecolors="k", linewidths=0.3, label=kind)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="init std σ")
    for c, n in enumerate(fixed):
        runs = [r for r in groups[n] if r.get("pe_rsa") is not None and r.get(y) is not None]
        if runs:
            ax.scatter([r["pe_rsa"] for r in runs], [r[y] for r in runs], marker="^",
                       color=lines[c % len(lines)], label=n)
    ax.set_xlabel("PE identifiability (RSA with distance)")
    ax.set_ylabel(TITLES[y])
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out_dir, "sweep_rsa.png"))
    gap_figure(groups, y, os.path.join(out_dir, "sweep_gap.png"))
    per_run = [{k: s.get(k) for k in ("out_dir", "pe", "init_std", "seed", *keys)} for s in summaries]
    sweep = {"keys": keys, "groups": stats, "runs": per_run}
    rundir.atomic_save(json.dumps(sweep, indent=1) + "\n", os.path.join(out_dir, "sweep.json"))
    return sweep


TRAINING_PANELS = ("human_acc", "test_acc", "pe_rsa", "pe_sin_rsa", "pe_layout_r2", "pe_norm", "pe_drift",
                   "pe_update_rsa")


def training_figure(run_dirs, path):
    """Figure 8 (--training): each run's accuracy and PE metrics against epoch, every eval it logged: the geometry
    metrics with a random table's chance band (mean to 95th percentile), the tables' mean row norm and their distance
    from init (pe_drift, from the tables saved at each eval); runs on the authors' data beside the authors' mean +- sd
    over their 15 seeds at the same σ, at the epochs they logged."""
    plt = pyplot()
    rows = (len(TRAINING_PANELS) + 3) // 4  # four panels a row: a page's width
    fig, axes = plt.subplots(rows, 4, figsize=(13.2, 3.2 * rows), layout="constrained", squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(TRAINING_PANELS):]:
        ax.set_visible(False)
    epochs = logged_epochs(run_dirs)
    colours, sigmas = {}, {}  # a colour per label, its σ
    for d in run_dirs:
        rows = [s for e in epochs if (s := at_epoch(d, e)) is not None]
        colour = colours.setdefault(label(rows[0]), SERIES_COLOURS[len(colours) % len(SERIES_COLOURS)])
        sigmas[label(rows[0])] = rows[0]["init_std"] if pe_lib.has_sigma(rows[0]["pe"]) else None
        for ax, k in zip(axes, TRAINING_PANELS):
            ax.plot([s["epoch"] for s in rows], [s.get(k, np.nan) for s in rows], color=colour, lw=1,
                    label=f"{label(rows[0])} seed {rows[0]['seed']}")
    first = at_epoch(run_dirs[0], 0)
    chance = chance_of(first) if first["pe_shape"] else {}
    theirs = first.get("data") == "lstnn"
    logged = sorted({ref["epoch"] for e in range(0, int(max(epochs)) + 1, 200) for ref in reference(e).values()})
    for ax, k in zip(axes, TRAINING_PANELS):
        if k in chance:
            ax.axhspan(chance[k]["mean"], chance[k]["p95"], color="0.8", alpha=0.6, lw=0, zorder=0,
                       label="chance (random table)")
        ax.set_title(TITLES.get(k, k), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_yscale("log" if k == "pe_norm" else "linear")  # σ = 0.2 and 2 apart by 10x
    if theirs:  # the authors' runs of the same σ, at the epochs they logged
        for name, colour in colours.items():
            for ax, k in zip(axes, TRAINING_PANELS[:2]):
                pts = [(e, np.mean(g[k]), np.std(g[k], ddof=1), len(g[k])) for e in logged
                       for g in reference(e).values() if g["pe"] == "learned" and g["sigma"] == sigmas[name] and k in g]
                if pts:
                    xs, m, sd, n = map(np.array, zip(*pts))
                    seeds = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
                    ax.errorbar(xs, m, sd, fmt="x:", color=colour, alpha=0.6, capsize=2, ms=4, lw=1,
                                label=f"authors σ={sigmas[name]:g} ({seeds} seeds)")
    handles = {lbl: h for ax in axes for h, lbl in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="outside right upper")
    save_figure(fig, path)


def gap_figure(groups, key, path):
    """Figure 7: for each table-PE series run at two σ or more, its smallest σ's `key` minus its largest σ's, seed by
    seed (the runs paired by seed), as a bar (mean) with every seed's gap as a dot: how much small σ wins, and how
    much the seeds spread, under each setting."""
    by_series = {}
    for name, runs in groups.items():
        if pe_lib.has_sigma(runs[0]["pe"]):
            by_sigma = by_series.setdefault(label(runs[0], sigma=False), {})
            by_sigma[runs[0]["init_std"]] = {r["seed"]: r.get(key) for r in runs}
    gaps = {}
    for name, by_sigma in by_series.items():
        if len(by_sigma) > 1:
            small, large = by_sigma[min(by_sigma)], by_sigma[max(by_sigma)]
            seeds = [k for k in small if k in large and small[k] is not None and large[k] is not None]
            gaps[f"{name}: σ={min(by_sigma):g} − σ={max(by_sigma):g}"] = [small[k] - large[k] for k in seeds]
    gaps = {n: g for n, g in gaps.items() if g}
    if not gaps:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(gaps) + 1.2), layout="constrained")
    for i, (name, g) in enumerate(sorted(gaps.items(), key=lambda kv: np.mean(kv[1]))):
        scale = 100 if key.endswith("acc") else 1
        ax.barh(i, np.mean(g) * scale, color="tab:blue", alpha=0.35)
        ax.plot(np.array(g) * scale, [i] * len(g), "k.", ms=5)
    ax.set_yticks(range(len(gaps)), sorted(gaps, key=lambda n: np.mean(gaps[n])), fontsize=7)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"{TITLES.get(key, key)}: small σ − large σ" + (" (points)" if key.endswith("acc") else ""))
    save_figure(fig, path)


def score_run(runs, puzzles):
    """--puzzles: score one grid2d run's checkpoint on a CSV of LST items; print and save the result."""
    if len(runs) != 1:
        raise ValueError("--puzzles scores one RUN_DIR")
    model, task, args = load_run(runs[0])
    if task.name != "grid2d":
        raise ValueError(f"--puzzles needs a grid2d run, {runs[0]} is {task.name}")
    line = json.dumps(score_puzzles(model, *tasks.load_puzzle_csv(puzzles, args.grid_n), args.grid_n))
    stem = os.path.splitext(os.path.basename(puzzles))[0]
    rundir.atomic_save(line + "\n", os.path.join(runs[0], f"puzzles-{stem}.json"))
    print(line)


def score_linear(runs):
    """--linear: one line per run, the linear predictor's R² on the data split that run trained on."""
    for run in runs:
        args = load_run(run)[2]
        task = tasks.get_task(args.task, args)
        if task.head != "token":
            raise ValueError(f"--linear needs a masked-prediction run (network, brain3d), {run} is {task.name}")
        scores = {k: round(v, 4) for k, v in linear_r2(task).items()}
        print(json.dumps({"run": run, "data_seed": args.data_seed} | scores))


def score_positions(runs, path, dims):
    """--positions: one line per run, how well the positions its PE (table 0) suggests match the coords of a series
    file (the same channels, with their positions), against the chance of shuffled channels."""
    true = tasks.read_series(path)[1].numpy()
    if not true.shape[1]:
        raise ValueError(f"--positions {path}: the file has no coords to score against")
    for run in runs:
        tables = pe_tables(load_run(run)[0])
        if tables is None or len(tables[0]) != len(true):
            raise ValueError(f"--positions: {run} has no PE table of {len(true)} tokens to estimate positions from")
        scores = position_recovery(estimated_positions(tables[0], dims), true)
        print(json.dumps({"run": run, "dims": dims} | {k: round(v, 4) for k, v in scores.items()}))


def epochs_of(text):
    """--epoch: 'all', or a comma-separated list of epochs."""
    if text == "all":
        return text
    try:
        return [float(e) for e in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not 'all' nor a list of epochs: {text!r}") from None


def columns_of(text):
    """--columns: a comma-separated list of --table's columns."""
    names = text.split(",")
    if bad := [c for c in names if c not in TABLE_COLUMNS]:
        raise argparse.ArgumentTypeError(f"unknown column(s) {bad}; choose from {', '.join(TABLE_COLUMNS)}")
    return names


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2 for a bad flag, or two modes at once
        print(f"analyze.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="train.py run directories, or folders of them")
    mode = p.add_mutually_exclusive_group()  # without one: every run's figures, and the sweep's
    mode.add_argument("--table", action="store_true", help="print a markdown table of the runs' summaries")
    mode.add_argument("--puzzles",
                      help="CSV of LST items (columns puzzles, solutions[, condition]) to score one run on")
    mode.add_argument("--linear", action="store_true",
                      help="print the linear predictor's R² on each masked run's task and splits")
    mode.add_argument("--positions", metavar="FILE",
                      help="score the positions each run's PE suggests (--dims of them) against the coords of FILE (a "
                           "series file): R² after the best similarity transform, and with the channels shuffled")
    mode.add_argument("--training", action="store_true",
                      help="figure 8 (training.png in --out-dir): every run's metrics against epoch, at every eval")
    p.add_argument("--out-dir",
                   help="where the sweep figures go (default: the folder of runs given, else the runs' common parent)")
    p.add_argument("--epoch", type=epochs_of, default=None,
                   help="--table and sweep figures: every run at this epoch of its training (its metrics.jsonl line), "
                        "finished or not, instead of at its end; --table also takes several (25,50,100) or 'all' "
                        "(every epoch logged): a row per label and epoch, how each metric moved")
    p.add_argument("--per-run", action="store_true", help="--table: a row per run (its seed named), not per label")
    p.add_argument("--reference", action="store_true",
                   help="--table: the authors' rows (their logs, 15 seeds) beside ours at their nearest logged epoch")
    p.add_argument("--columns", type=columns_of, help="--table: these columns only, e.g. test_acc,human_acc")
    p.add_argument("--dims", type=int, default=2, help="positions unknown (a series file without coords): the "
                   "dimensions of the token positions estimated from the PE (positions.csv)")
    p.add_argument("--x", default="sigma", choices=("sigma", "ratio"),
                   help="sweep figure 5's x axis: the init std σ, or pe_tok_ratio (PE norm / token norm at init)")
    a = p.parse_args(argv)
    try:
        runs = rundir.find_runs(a.paths)
        epochs = logged_epochs(runs) if a.epoch == "all" else a.epoch
        if a.table:
            return print(summary_table(runs, epochs, a.reference, a.columns or TABLE_COLUMNS, a.per_run))
        out_dir = a.out_dir or (a.paths[0] if len(a.paths) == 1 else
                                os.path.commonpath([os.path.dirname(os.path.abspath(r)) for r in runs]))
        if a.training:
            training_figure(runs, os.path.join(out_dir, "training.png"))
            return print(f"{len(runs)} runs drawn against epoch in {os.path.join(out_dir, 'training.png')}")
        if epochs is not None and len(epochs) > 1:
            raise ValueError("the figures take one --epoch; several (or 'all') need --table")
        epoch = None if epochs is None else epochs[0]
        if a.puzzles:
            return score_run(runs, a.puzzles)
        if a.linear:
            return score_linear(runs)
        if a.positions:
            return score_positions(runs, a.positions, a.dims)
        for run in tqdm(runs, desc="runs", disable=len(runs) < 2):
            if os.path.exists(os.path.join(run, "ckpt.pt")):  # a run that diverged at once has nothing to draw
                analyze_run(run, a.dims)
        summaries = [s for run in runs if (s := run_summary(run) if epoch is None else at_epoch(run, epoch))
                     and not s.get("diverged")]
        if len(summaries) > 1:
            shaped = [s for s in summaries if s["pe_shape"]]  # the band: the first table's shape
            theirs = all(s.get("data") == "lstnn" for s in summaries)  # the authors' data: their curve beside ours
            sweep_figures(summaries, out_dir, a.x, chance_of(shaped[0]) if shaped else None,
                          reference(max(s["epoch"] for s in summaries)) if theirs else None)
            print(f"{len(runs)} runs analysed; sweep figures in {out_dir} "
                  f"({len(runs) - len(summaries)} unfinished or diverged runs left out)")
    except ValueError as e:
        print(f"analyze.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
