"""
Interpretability metrics for a trained positional encoding, scoring a run on external puzzles, and
tables over runs.

    python analyze.py RUN_DIR --puzzles FILE.csv    # score RUN_DIR/ckpt.pt on human-style LST items
    python analyze.py RUN_DIR [RUN_DIR ...] --table  # markdown table of summary.json, mean +- sd over seeds

The metric functions are plain numpy/torch and are also what train.py logs during training.
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

import pe as pe_lib
import tasks
from model import ModelConfig, Transformer


# ----------------------------------------------------------------------------- metrics
def cosine_matrix(P):
    """Token x token cosine similarity of the rows of P (N, d); zero rows give similarity 0."""
    P = torch.as_tensor(P, dtype=torch.float64)
    P = P / P.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (P @ P.T).numpy()


def upper(M):
    """The strict upper triangle of a square matrix, flattened."""
    return M[np.triu_indices(len(M), 1)]


def rank(x):
    """Ranks 0..n-1 with ties given their average rank (as Spearman needs)."""
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (first + (counts - 1) / 2)[inv]


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(a, b):
    return pearson(rank(a), rank(b))


def rsa_matrix(P, S):
    """Spearman correlation between the upper triangles of the PE's cosine similarities and a reference
    similarity S (N, N): second-order similarity, as the paper compares representations."""
    return spearman(upper(cosine_matrix(P)), upper(np.asarray(S, dtype=np.float64)))


def rsa(P, C):
    """RSA against the negative true distances: 1 when nearer tokens always have more similar encodings."""
    dist = torch.cdist(torch.as_tensor(C, dtype=torch.float64), torch.as_tensor(C, dtype=torch.float64)).numpy()
    return rsa_matrix(P, -dist)


def twin_rank(S, twins):
    """Homotopy: the rank of each region's left/right twin among the N - 1 other regions by similarity
    S (N, N), 1 = most similar, ties shared; the mean over both directions of the (M, 2) twin pairs.
    1 when every region's twin is its most similar region; N/2 on average when S knows nothing of twins."""
    S = np.array(S, dtype=np.float64)
    np.fill_diagonal(S, -np.inf)
    i, j = np.asarray(twins).T
    a, b = np.concatenate([i, j]), np.concatenate([j, i])
    twin = S[a, b][:, None]
    return float(np.mean(1 + (S[a] > twin).sum(1) + ((S[a] == twin).sum(1) - 1) / 2))


def modularity(S):
    """Newman's modularity Q of the graph weighted by the positive part of S (N, N) off the diagonal, for
    the partition found by splitting along the leading eigenvector of the modularity matrix until no split
    raises Q (Newman 2006, PNAS). Returns (Q, community of each node): ~0 for no community structure,
    1 - 1/K for K equal, disconnected cliques."""
    A = np.clip(np.array(S, dtype=np.float64), 0, None)
    np.fill_diagonal(A, 0)
    labels = np.zeros(len(A), dtype=int)
    if A.sum() == 0:
        return 0.0, labels
    A /= A.sum()  # Q is scale-free; total weight 1 keeps the tolerance below meaningful
    k = A.sum(1)
    B = A - np.outer(k, k)
    todo = [np.arange(len(A))]
    while todo:
        g = todo.pop()
        Bg = B[np.ix_(g, g)] - np.diag(B[np.ix_(g, g)].sum(1))  # the modularity matrix of a subgroup
        s = np.where(np.linalg.eigh(Bg)[1][:, -1] >= 0, 1.0, -1.0)
        if abs(s.sum()) == len(g) or s @ Bg @ s <= 1e-10:  # no split, or one that would not raise Q
            continue
        labels[g[s < 0]] = labels.max() + 1
        todo += [g[s > 0], g[s < 0]]
    return float((B * (labels[:, None] == labels[None])).sum()), labels


def pe_tables(model):
    """The additive PE tables (T, N, d) of a model as numpy, or None for a PE without a table."""
    return model.pe.weight.detach().float().cpu().numpy() if isinstance(model.pe, pe_lib.AdditivePE) else None


def pe_metrics(P, C, references=None, twins=None):
    """The metrics of one PE table P (N, d): RSA against the true coordinates and against each named
    reference similarity (a task's coupling, functional connectivity), the mean row norm, and where the
    task has left/right twins (brain layouts) the twin rank and the modularity of P's cosine similarities."""
    out = {"rsa": rsa(P, C), "norm": float(np.linalg.norm(P, axis=1).mean())}
    out |= {f"rsa_{name}": rsa_matrix(P, S) for name, S in (references or {}).items()}
    if twins is not None and len(twins):
        S = cosine_matrix(P)
        out |= {"twin_rank": twin_rank(S, twins), "modularity": modularity(S)[0]}
    return out


def identifiability(model, coords, references=None, twins=None):
    """The PE metrics as train.py logs them: pe_<metric> averaged over the tables (one per block for
    --pe-layers all), pe_rsa per table, and the token embedding's mean row norm for comparison."""
    tok_norm = model.token_embedding_rows().detach().float().norm(dim=1).mean().item()
    tables = pe_tables(model)
    if tables is None:
        return {"pe_rsa": None, "pe_rsa_tables": None, "pe_norm": 0.0 if model.pe is None else None, "tok_norm": tok_norm}
    per_table = [pe_metrics(t, coords, references, twins) for t in tables]
    mean = {f"pe_{k}": float(np.mean([m[k] for m in per_table])) for k in per_table[0]}
    return mean | {"pe_rsa_tables": [m["rsa"] for m in per_table], "tok_norm": tok_norm}


# ----------------------------------------------------------------------------- runs
def load_run(run_dir):
    """(model in eval mode, task without data, the run's training args) from RUN_DIR/ckpt.pt."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    args = SimpleNamespace(**ckpt["args"])
    task = tasks.get_task(args.task, args, with_data=False)
    model = Transformer(ModelConfig(**ckpt["model_config"]), task.coords)
    model.load_state_dict(ckpt["model"])
    return model.eval(), task, args


@torch.no_grad()
def score_puzzles(model, grids, answers, conditions, n):
    """Accuracy on LST items, overall and per condition."""
    x, query = tasks.encode_lst(grids, n)
    correct = (model(x, query).argmax(1) + 1 == torch.as_tensor(answers)).numpy()
    by = {c: float(correct[[k == c for k in conditions]].mean()) for c in sorted(set(conditions))}
    return {"n": int(len(correct)), "acc": float(correct.mean()), "by_condition": by}


TABLE_COLUMNS = ("iters", "wall_s", "train_acc", "test_acc", "ood_acc", "noise_acc", "test_acc_quaternary",
                 "pe_rsa", "pe_rsa_delta", "pe_norm", "tok_norm")


def summary_table(run_dirs):
    """Markdown table of the runs' summary.json, one row per (pe, init_std, pe_layers): mean +- sd
    over the runs in it (seeds), and how many of them fitted the training set."""
    groups = {}
    for d in run_dirs:
        path = os.path.join(d, "summary.json")
        if not os.path.exists(path):
            raise ValueError(f"no summary.json in {d} (unfinished run?)")
        s = json.load(open(path))
        label = s["pe"] + (f" σ={s['init_std']:g}" if s["pe"] in ("learned", "random") else "") + \
            (" (all)" if s["pe_layers"] == "all" and s["pe"] not in ("none", "rope", "ropend", "relative", "alibi") else "")
        groups.setdefault(label, []).append(s)
    cell = lambda v, pct: "–" if not v else (  # noqa: E731
        f"{np.mean(v) * 100:.1f} ± {np.std(v) * 100:.1f}" if pct else f"{np.mean(v):.2f} ± {np.std(v):.2f}")
    lines = ["| PE | runs | fitted | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 3) + "|"]
    for label, runs in groups.items():
        vals = [[r[c] for r in runs if r.get(c) is not None] for c in TABLE_COLUMNS]
        cells = [f"{np.mean(v):.0f}" if c in ("iters", "wall_s") else cell(v, c.endswith("acc") or "_acc_" in c)
                 for c, v in zip(TABLE_COLUMNS, vals)]
        lines.append(f"| {label} | {len(runs)} | {sum(r['fitted'] for r in runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="train.py output directories")
    p.add_argument("--puzzles", help="CSV of LST items (columns puzzles, solutions[, condition]) to score one run on")
    p.add_argument("--table", action="store_true", help="print a markdown table of the runs' summaries")
    a = p.parse_args(argv)
    try:
        if a.table:
            return print(summary_table(a.run_dirs))
        if a.puzzles is None or len(a.run_dirs) != 1:
            raise ValueError("pass one RUN_DIR with --puzzles FILE.csv, or run dirs with --table")
        run_dir = a.run_dirs[0]
        model, task, args = load_run(run_dir)
        if task.name != "grid2d":
            raise ValueError(f"--puzzles needs a grid2d run, {run_dir} is {task.name}")
        result = score_puzzles(model, *tasks.load_puzzle_csv(a.puzzles, args.grid_n), args.grid_n)
    except ValueError as e:
        print(f"analyze.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    line = json.dumps(result)
    stem = os.path.splitext(os.path.basename(a.puzzles))[0]
    tasks.atomic_save(line + "\n", os.path.join(run_dir, f"puzzles-{stem}.json"), save=write_text)
    print(line)


def write_text(text, path):
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
