"""
Every positional encoding (PE) and every initialiser, written once against true token coordinates.

A task hands out a float tensor `coords` of shape (N, k): (row, col) on a grid, 3D centres in a
brain, ... Every encoding below reads only that tensor, so one implementation serves 1D, 2D, 3D and
non-square layouts. Three families, by where they enter the transformer:
  additive  (none/sin1d/sinnd/learned/random): a table (T, N, d) added to the residual stream,
            T = 1 (added once at the input) or T = n_layer (each block its own table).
  rotary    (rope/ropend): rotates queries and keys inside attention.
  bias      (relative/alibi): an additive (H, N, N) term on the attention scores.
A token without a coordinate (an appended readout token, n_extra) comes after the N tokens: a learned/random table
draws its row like the others; a fixed table gives it zeros, rotary leaves it unrotated, a bias adds nothing to its
scores, so a fixed PE tells it nothing.
"""
import math

import torch
import torch.nn as nn

ADDITIVE = ("none", "sin1d", "sinnd", "learned", "random")
ROTARY = ("rope", "ropend")
BIAS = ("relative", "alibi")
KINDS = ADDITIVE + ROTARY + BIAS
INITS = ("normal", "uniform")
NEEDS_COORDS = ("sinnd", "ropend", "relative", "alibi")
DRAWN = ("learned", "random")  # the tables drawn at init with a std sigma: the PEs whose init is under study


def has_sigma(kind):
    """Whether PE `kind` is drawn with an init std sigma (--init-std means something to it)."""
    return kind in DRAWN


def flat_coords(n):
    """1D coordinates 0..n-1 as an (n, 1) tensor: the flat token index."""
    return torch.arange(n, dtype=torch.float64)[:, None]


def sinusoid(coords, d, base=10000.0):
    """Vaswani sinusoid over the axes of coords (N, k): each axis gets d/k channels, (sin, cos) pairs
    of geometric frequencies. k = 1 is the original 1D encoding; k = 2 the 2D one of ViT/MAE."""
    n, k = coords.shape
    if d % (2 * k):
        raise ValueError(f"sinusoid over {k} axes needs n_embd divisible by {2 * k}, got {d}")
    per_axis = d // k
    freq = base ** (-torch.arange(0, per_axis, 2, dtype=torch.float64) / per_axis)  # (per_axis/2,)
    ang = coords.double()[:, :, None] * freq  # (N, k, per_axis/2)
    out = torch.stack([ang.sin(), ang.cos()], dim=-1)  # (N, k, per_axis/2, 2): sin, cos interleaved
    return out.reshape(n, d).float()


def init_table(shape, init, std):
    """A learned/random table drawn i.i.d. with standard deviation std (0 gives zeros)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {INITS}")
    if std < 0:
        raise ValueError(f"init std must be >= 0, got {std}")
    if init == "normal":
        return torch.randn(shape) * std
    a = std * math.sqrt(3.0)  # U(-a, a) has std a/sqrt(3)
    return (torch.rand(shape) * 2 - 1) * a


class AdditivePE(nn.Module):
    """A (T, N, d) table added to the residual stream; table(i) is what block i receives.
    learned: an nn.Parameter; random/sin1d/sinnd: a fixed buffer (saved in the state dict)."""

    def __init__(self, kind, coords, d, n_tables, init="normal", std=0.02, n_extra=0):
        super().__init__()
        n = coords.shape[0]
        if has_sigma(kind):
            table = init_table((n_tables, n + n_extra, d), init, std)
        else:
            table = sinusoid(flat_coords(n) if kind == "sin1d" else coords, d)
            table = torch.cat([table, table.new_zeros(n_extra, d)]).expand(n_tables, n + n_extra, d).clone()
        self.kind = kind
        if kind == "learned":
            self.weight = nn.Parameter(table)
        else:
            self.register_buffer("weight", table)

    def forward(self, i):
        return self.weight[i]


def rotary_angles(coords, head_dim, base=10000.0):
    """Rotation angles (N, head_dim/2): the head's channel pairs are split evenly across the k
    axes, each axis rotating its pairs by coordinate * geometric frequencies (axial RoPE)."""
    k = coords.shape[1]
    if head_dim % (2 * k):
        raise ValueError(f"rotary over {k} axes needs head_dim (n_embd/n_head) divisible by {2 * k}, got {head_dim}")
    pairs = head_dim // (2 * k)
    freq = base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)  # (pairs,)
    return (coords.double()[:, :, None] * freq).reshape(coords.shape[0], k * pairs)


class Rotary(nn.Module):
    """Rotary PE: q, k of shape (B, H, N, hd) rotated pairwise (rotate-half layout) by angles of
    each token's coordinates, so q_i . k_j depends only on coords_i - coords_j."""

    def __init__(self, coords, head_dim, n_extra=0):
        super().__init__()
        ang = rotary_angles(coords, head_dim)
        ang = torch.cat([ang, ang.new_zeros(n_extra, ang.shape[1])])  # angle 0: the extra tokens are not rotated
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def offset_index(coords, decimals=4):
    """Map every token pair (i, j) to the id of its coordinate offset coords_i - coords_j, so a
    bias table indexed by it is shift invariant by construction. Returns (index (N, N), n_offsets)."""
    diff = (coords[:, None, :] - coords[None, :, :]).double()
    diff = torch.round(diff * 10**decimals).long().reshape(-1, coords.shape[1])
    uniq, inv = torch.unique(diff, dim=0, return_inverse=True)
    return inv.reshape(coords.shape[0], coords.shape[0]), uniq.shape[0]


def distance_buckets(coords, n_buckets=16):
    """T5's bucketing of relative position, by Euclidean distance in nearest-neighbour steps: one bucket per step
    below n_buckets/2, then logarithmic up to the largest distance. Returns (index (N, N), n_buckets)."""
    d = unit_distances(coords)
    exact = n_buckets // 2
    span = max(d.max().item(), exact + 1.0)
    far = exact + torch.log(d.clamp(min=exact) / exact) / math.log(span / exact) * (n_buckets - exact - 1)
    near = torch.where(d > 0, d.round().clamp(min=1), 0)  # bucket 0 is the token itself, however close the rest
    index = torch.where(d < exact, near, far.floor()).long().clamp(max=n_buckets - 1)
    return index, n_buckets


class RelativeBias(nn.Module):
    """T5-style learned relative bias, shared by all blocks, zero at init: one scalar per head for each distinct
    coordinate offset on an integer lattice (bidirectional: a (2n-1)^2 table on an n x n grid); elsewhere (a brain,
    a point cloud: every pair its own offset) one per T5 distance bucket, so it stays relative."""

    def __init__(self, coords, n_head, n_extra=0):
        super().__init__()
        lattice = torch.equal(coords, coords.round())
        index, n_off = offset_index(coords) if lattice else distance_buckets(coords)
        self.register_buffer("index", index, persistent=False)
        self.weight = nn.Parameter(torch.zeros(n_off, n_head))
        self.n_extra = n_extra

    def forward(self):
        bias = self.weight[self.index].permute(2, 0, 1)  # (H, N, N)
        return nn.functional.pad(bias, (0, self.n_extra, 0, self.n_extra))


def alibi_slopes(n_head):
    """Press et al.'s geometric slopes 2^(-8h/H); with fewer than 8 heads we take the first H of the
    8-head schedule, since one head's own slope (2^-8) would be negligible on tens of tokens."""
    h = max(n_head, 8)
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(n_head)])


def unit_distances(coords):
    """Euclidean distances (N, N) in units of the mean nearest-neighbour distance (grid step = 1)."""
    dist = torch.cdist(coords.double(), coords.double())
    nn_dist = (dist + torch.eye(len(coords), dtype=dist.dtype) * dist.max()).min(1).values.mean()
    return dist / nn_dist


class ALiBi(nn.Module):
    """Fixed per-head linear penalty -slope_h * ||c_i - c_j|| on the attention scores."""

    def __init__(self, coords, n_head, n_extra=0):
        super().__init__()
        bias = -alibi_slopes(n_head)[:, None, None] * unit_distances(coords).float()
        bias = nn.functional.pad(bias, (0, n_extra, 0, n_extra))
        self.register_buffer("bias", bias, persistent=False)

    def forward(self):
        return self.bias


def build(kind, n_tokens, coords, n_embd, n_head, n_tables, init="normal", std=0.02, n_extra=0):
    """The PE module for `kind` over n_tokens tokens at coords (N, k) (None where a task has no
    geometry) and n_extra tokens after them without a coordinate, or None for `none`. Raises ValueError on a bad
    combination."""
    if kind not in KINDS:
        raise ValueError(f"unknown pe {kind!r}; choose from {KINDS}")
    if kind in NEEDS_COORDS and coords is None:
        raise ValueError(f"pe {kind!r} needs token coordinates, which this task does not provide")
    if coords is not None and coords.shape[1] == 0 and not (has_sigma(kind) or kind == "none"):  # positions unknown
        raise ValueError(f"pe {kind!r} needs the tokens' positions, which these data do not give (no coords): "
                         f"choose from {DRAWN + ('none',)}")
    if has_sigma(kind):
        init_table((1,), init, std)  # validates init and std before anything is built
    if n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} must be divisible by n_head {n_head}")
    if kind == "none":
        return None
    if kind in ADDITIVE:
        return AdditivePE(kind, flat_coords(n_tokens) if coords is None else coords, n_embd, n_tables, init, std,
                          n_extra)
    if kind in ROTARY:
        return Rotary(flat_coords(n_tokens) if kind == "rope" else coords, n_embd // n_head, n_extra)
    return (RelativeBias if kind == "relative" else ALiBi)(coords, n_head, n_extra)
