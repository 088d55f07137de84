"""
Every measurement of a run: evaluation of its task (accuracy per split and class, or R² of masked tokens), the
linear bar a PE-free model sets, and every PE metric with its chance level.

Metrics compare a PE table P (N, d) with the tokens' true coordinates C (N, k). RSA correlates the PE's
cosine similarities with a reference: pe_rsa with the negative true distances (our own measure), pe_sin_rsa
with the cosine similarities of the fixed sinusoid on the same coordinates (our reconstruction of the paper's
"similarity to 2D cosine embeddings": the companion code holds no such measure). The geometric ones (layout,
neighbours, dimensionality) use the Euclidean geometry of the centred rows. They are plain numpy; train.py logs them
at every eval, analyze.py tables and draws them.
"""
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

import pe as pe_lib
from model import forward_models


# ----------------------------------------------------------------------------- the task
def masked_scores(split, predict, batch_size=1024):
    """(MSE, R²) of each of K predictors over a masked split's hidden tokens with its fixed masks, R² = 1 - SSE/SST,
    SST around the targets' mean: the split walked a chunk at a time (never whole), the sums in float64 around the
    first chunk's mean so that an offset cancels. predict(x (B, N, w), mask (B, N)) gives (K, hidden, w)."""
    sse, n, s1, s2, shift = 0.0, 0, 0.0, 0.0, None
    for x, mask in split.chunks(batch_size):
        y = x[mask].double()
        shift = y.mean() if shift is None else shift
        sse = sse + ((predict(x, mask).double() - y) ** 2).flatten(1).sum(1)
        n, s1, s2 = n + y.numel(), s1 + (y - shift).sum(), s2 + ((y - shift) ** 2).sum()
    sst = s2 - s1 * s1 / n
    return [((e / n).item(), (1 - e / sst).item()) for e in sse]


def model_predictions(models, device, forward, x, mask):
    """Each model's prediction of the hidden tokens of windows x (B, N, w), mask (B, N): (K, hidden, w)."""
    k = len(models)
    out = forward(models, x.expand(k, *x.shape).to(device), None, mask.expand(k, *mask.shape).to(device))
    return out.float().cpu()[:, mask]


@torch.no_grad()
def evaluate(models, task, device, forward=forward_models, batch_size=1024):
    """Every split of a task, for each of K models (a dict each): loss and accuracy, with accuracy per class, of a
    classifier; MSE and R^2 (masked_scores) over the hidden tokens, with the split's fixed masks, of masked
    prediction."""
    for model in models:
        model.eval()
    out = [{} for _ in models]
    for name, s in task.splits.items():
        if task.head == "token":
            for m, (mse, r2) in zip(out, masked_scores(s, partial(model_predictions, models, device, forward),
                                                       batch_size)):
                m[f"{name}_mse"], m[f"{name}_r2"] = mse, r2
            continue
        chunks = []
        for i in range(0, len(s["y"]), batch_size):  # every model sees the same samples
            x, readout = (s[k][i:i + batch_size].expand(len(models), -1, *s[k].shape[1:]).to(device)
                          for k in ("x", "readout"))
            chunks.append(forward(models, x, readout).float().cpu())
        for m, pred in zip(out, torch.cat(chunks, dim=1)):
            correct = (pred.argmax(1) == s["y"]).float()
            m[f"{name}_loss"] = F.cross_entropy(pred, s["y"]).item()
            m[f"{name}_acc"] = correct.mean().item()
            for k, cls in enumerate(task.classes):
                m[f"{name}_acc_{cls}"] = correct[s["cls"] == k].mean().item()
    for model in models:
        model.train()
    return out


def fitted(m, args, task):
    """Whether an eval fits the training set (--stop-train-acc, else 0.999); None for a regression."""
    if task.head != "cls":
        return None
    return m["train_acc"] >= (args.stop_train_acc if args.stop_train_acc is not None else 0.999)


# ----------------------------------------------------------------------------- the PE
def cosine_matrix(P):
    """Token x token cosine similarity of the rows of P (N, d); zero rows give similarity 0."""
    P = np.asarray(P, dtype=np.float64)
    P = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
    return P @ P.T


def distance_matrix(C):
    C = np.asarray(C, dtype=np.float64)
    return np.linalg.norm(C[:, None] - C[None], axis=-1)


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


def rsa_matrix(P, S, method="spearman"):
    """Correlation between the upper triangles of the PE's cosine similarities and a reference similarity
    matrix S (N, N): second-order similarity. With S the negative true distances (rsa) this is our own
    measure; with S the fixed sinusoid's cosine similarities (sin_rsa) it is the paper's comparison."""
    correlate = spearman if method == "spearman" else pearson
    return correlate(upper(cosine_matrix(P)), upper(np.asarray(S, dtype=np.float64)))


def rsa(P, C, method="spearman"):
    """RSA against the negative true distances: 1 when nearer tokens always have more similar encodings."""
    return rsa_matrix(P, -distance_matrix(C), method)


def sinusoid_reference(C, d):
    """Cosine similarities of the fixed sinusoid (`sinnd`) on the same coordinates, at the nearest
    width the sinusoid can split over the axes."""
    k = C.shape[1]
    width = 2 * k * max(1, d // (2 * k))
    return cosine_matrix(pe_lib.sinusoid(torch.as_tensor(np.asarray(C), dtype=torch.float64), width))


def principal_coords(P, k):
    """Classical MDS of the rows of P on Euclidean distance (= PCA of the centred rows): (N, k)."""
    X = np.asarray(P, dtype=np.float64)
    U, S, _ = np.linalg.svd(X - X.mean(0), full_matrices=False)
    return U[:, :k] * S[:k]


def procrustes(X, Y):
    """Align Y onto X by translation, rotation/reflection and scale. Returns (Y aligned, in X's units;
    R^2 = 1 - disparity), the disparity measured with both centred at unit norm as scipy's procrustes."""
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    nx, ny = np.linalg.norm(Xc), np.linalg.norm(Yc)
    if nx == 0 or ny == 0:
        return np.zeros_like(X) + X.mean(0), float("nan")
    U, s, Vt = np.linalg.svd((Yc / ny).T @ (Xc / nx))
    aligned = s.sum() * (Yc / ny) @ (U @ Vt)  # best scale is the nuclear norm at unit norms
    return aligned * nx + X.mean(0), float(s.sum() ** 2)


def layout_r2(P, C):
    """Recovered geometry: how much of the true layout the PE's top-k principal coordinates explain."""
    return procrustes(C, principal_coords(P, C.shape[1]))[1]


def neighbour_recovery(P, C, n_neighbours=None):
    """Mean fraction of each token's n nearest rows of P (Euclidean) that are among its n true nearest
    neighbours (ties at the n-th true distance count). n defaults to 2k: the 4 grid neighbours in 2D."""
    n = n_neighbours or 2 * C.shape[1]
    D, E = distance_matrix(C), distance_matrix(np.asarray(P, dtype=np.float64) - np.mean(P, 0))
    np.fill_diagonal(D, np.inf)
    np.fill_diagonal(E, np.inf)
    true = D <= np.sort(D, axis=1)[:, n - 1:n]
    found = np.argsort(E, axis=1, kind="stable")[:, :n]
    return float(np.take_along_axis(true, found, axis=1).mean())


def participation_ratio(P):
    """Effective dimensionality (sum l)^2 / sum l^2 of the covariance spectrum of the rows of P:
    k for a cloud spread equally along k orthogonal axes."""
    lam = np.linalg.svd(np.asarray(P, dtype=np.float64) - np.mean(P, 0), compute_uv=False) ** 2
    return float(lam.sum() ** 2 / (lam ** 2).sum()) if lam.sum() > 0 else float("nan")


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


def pe_metrics(P, C, references=None, twins=None):
    """Every metric of one PE table against the true coordinates, RSA against each named reference
    similarity matrix (a task's coupling, functional connectivity) and, where the task has left/right
    twins (brain layouts), the twin rank and the modularity of the PE's cosine similarities."""
    out = {"dim": participation_ratio(P), "norm": float(np.linalg.norm(P, axis=1).mean())}
    if C.shape[1]:  # positions known (a series file without coords gives none)
        out |= {"rsa": rsa(P, C), "rsa_pearson": rsa(P, C, "pearson"),
                "sin_rsa": rsa_matrix(P, sinusoid_reference(C, P.shape[1])), "layout_r2": layout_r2(P, C),
                "neighbours": neighbour_recovery(P, C)}
    out |= {f"rsa_{name}": rsa_matrix(P, S) for name, S in (references or {}).items()}
    if twins is not None and len(twins):
        S = cosine_matrix(P)
        out |= {"twin_rank": twin_rank(S, twins), "modularity": modularity(S)[0]}
    return out


def pe_tables(model):
    """The additive PE tables (T, N, d) of a model's N tokens with coordinates (an appended readout token's row left
    out) as numpy, or None for a PE without a table."""
    if not isinstance(model.pe, pe_lib.AdditivePE):
        return None
    return model.pe.weight[:, :model.cfg.n_tokens].detach().float().cpu().numpy()


def training_tokens(task, n_samples=256, seed=0):
    """The non-blank tokens (M, in_dim) of a seeded draw of n_samples training samples: what the token
    embedding sees, for its norm (a blank grid2d cell is the zero vector and adds only the bias)."""
    x = task.splits["train"]
    x = x["x"] if isinstance(x, dict) else x  # a masked split's windows are its inputs
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_samples]].flatten(0, 1)
    return x[x.abs().sum(1) > 0]


@torch.no_grad()
def token_norm(model, tokens):
    """Mean norm of the embedded tokens W x + b: the stream a PE is added to at the input."""
    if model.cfg.readout == "cls":  # a cell's token is 0 in the readout token's own input channel
        tokens = torch.nn.functional.pad(tokens, (0, 1))
    return model.embed(tokens.to(model.embed.weight.device)).float().norm(dim=-1).mean().item()


@torch.no_grad()
def norm_ratios(model, tokens):
    """sigma in the unit that matters: pe_tok_ratio, the PE's mean row norm (table 0) over the embedded tokens'
    mean norm; pe_stream_ratio (one table per block), the later tables' mean row norm over sqrt(d), the row norm
    of the post-LayerNormed stream they are added to. None where the PE has no table."""
    tables = pe_tables(model)
    if tables is None:
        return {"pe_tok_ratio": None, "pe_stream_ratio": None}
    rows = np.linalg.norm(tables, axis=-1)
    stream = float(rows[1:].mean() / np.sqrt(tables.shape[-1])) if len(tables) > 1 else None
    return {"pe_tok_ratio": float(rows[0].mean()) / token_norm(model, tokens), "pe_stream_ratio": stream}


def identifiability(model, coords, references=None, twins=None, tokens=None):
    """The PE metrics as train.py logs them: pe_<metric> averaged over the tables (one per block for
    --pe-layers all), pe_rsa per table, and, given the training tokens, their embedding's mean norm."""
    tok = {} if tokens is None else {"tok_norm": token_norm(model, tokens)}
    tables = pe_tables(model)
    if tables is None or not np.isfinite(tables).all():  # no table, or a broken one: nothing to measure
        return {"pe_rsa": None, "pe_rsa_tables": None, "pe_norm": 0.0 if model.pe is None else None} | tok
    per_table = [pe_metrics(t, coords.numpy(), references, twins) for t in tables]
    mean = {"pe_rsa": None} | {f"pe_{k}": float(np.mean([m[k] for m in per_table])) for k in per_table[0]}
    return mean | {"pe_rsa_tables": [m["rsa"] for m in per_table] if coords.shape[1] else None} | tok


def chance_levels(shape, coords, references=None, twins=None, draws=100, seed=0):
    """What a table that learned nothing scores: every scale-free PE metric of `draws` i.i.d. Gaussian tables of
    shape (T, N, d) on the same coordinates, averaged over the T tables as identifiability does.
    Returns {pe_<metric>: {"mean", "sd", "p95"}}; sigma does not matter, since no metric here depends on scale."""
    rng = np.random.default_rng(seed)
    C = np.asarray(coords)
    draws = [[pe_metrics(t, C, references, twins) for t in rng.standard_normal(shape)] for _ in range(draws)]
    values = {k: [np.mean([m[k] for m in d]) for d in draws] for k in draws[0][0] if k != "norm"}
    return {f"pe_{k}": {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "p95": float(np.percentile(v, 95))}
            for k, v in values.items()}


def sample_rows(x, idx):
    """Rows idx (M, n) of each sample of x (M, N, w): (M, n, w)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))


def sample_blocks(S, a, b):
    """Per-sample blocks S[a_m, b_m] (M, n_a, n_b) of a matrix S (N, N), for index rows a (M, n_a) and b (M, n_b)."""
    return S[a[:, :, None], b[:, None, :]]


@torch.no_grad()
def linear_r2(task, batch_size=1024):
    """R² of the best linear guess of each masked task's hidden tokens from its visible ones at the same
    time step (the Gaussian conditional mean under the training split's covariance), scored as evaluate scores a
    model (masked_scores) on every evaluation split's fixed masks: the bar a PE-free linear model that knows every
    token sets."""
    train = task.splits["train"]
    n, total = len(train) * train.window, 0.0
    for x, _ in train.chunks(batch_size):  # each token's mean over samples and time steps, then their covariance
        total = total + x.double().sum((0, 2))
    mu, S = (total / n)[:, None], 0.0
    for x, _ in train.chunks(batch_size):
        S = S + torch.einsum("mit,mjt->ij", x.double() - mu, x.double() - mu) / n
    return {f"{name}_r2": masked_scores(s, partial(linear_prediction, S, mu), batch_size)[0][1]
            for name, s in task.splits.items() if name != "train"}


def linear_prediction(S, mu, x, mask):
    """The Gaussian conditional mean of windows x's (B, N, w) hidden tokens (mask (B, N)) given their visible ones,
    under token covariance S and means mu: (1, hidden, w)."""
    x = x.double()
    n_hid = int(mask[0].sum())  # every sample hides the same number of tokens
    hid = mask.nonzero()[:, 1].view(len(x), n_hid)
    vis = (~mask).nonzero()[:, 1].view(len(x), -1)
    solved = torch.linalg.solve(sample_blocks(S, vis, vis), sample_rows(x, vis) - mu[vis])
    return (mu[hid] + sample_blocks(S, hid, vis) @ solved).flatten(0, 1)[None]


def estimated_positions(P, dims):
    """The tokens' positions as a PE table P (N, d) suggests them when the true ones are unknown: its rows'
    top-`dims` principal coordinates (classical MDS), (N, dims)."""
    return principal_coords(P, dims)


def position_recovery(estimated, true, shuffles=100, seed=0):
    """How well estimated positions (N, k) match the true ones (N, k'): R² after the best similarity transform
    (procrustes), and its chance level: the same with the channels shuffled (mean and 95th percentile)."""
    k = min(estimated.shape[1], true.shape[1])
    estimated, true = np.asarray(estimated)[:, :k], np.asarray(true, dtype=np.float64)[:, :k]
    rng = np.random.default_rng(seed)
    chance = [procrustes(true, estimated[rng.permutation(len(true))])[1] for _ in range(shuffles)]
    return {"r2": procrustes(true, estimated)[1], "chance_mean": float(np.mean(chance)),
            "chance_p95": float(np.percentile(chance, 95))}


def pe_drift(init, tables):
    """How far a PE's tables (T, N, d) moved from init: ||P - P0|| / ||P0|| (Frobenius), the mean over the tables."""
    return float(np.mean([np.linalg.norm(p - p0) / np.linalg.norm(p0) for p, p0 in zip(tables, init)]))


def update_rsa(init, tables, coords):
    """RSA with the true distances of what training added to each table, P - P0 (the mean over the tables): the
    learned part's geometry, which pe_rsa cannot see under an init much larger than the update."""
    return float(np.mean([rsa(p - p0, coords) for p, p0 in zip(tables, init)]))
