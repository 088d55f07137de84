"""
The transformer encoder: one config dataclass, fused QKV attention through
F.scaled_dot_product_attention, post- or pre-LayerNorm blocks, and a PE from pe.py; and the training
step of K independent models at once (K = 1: one model), as one vmap over their stacked weights or a loop.

Every layer keeps PyTorch's default initialisation (attention: nn.MultiheadAttention's with attn_init="mha", as the
authors' model has it); there is deliberately no global `apply(_init_weights)`, because it would silently re-draw the
PE table whose init is under study.
"""
import contextlib
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pe as pe_lib

READOUTS = ("query", "last", "cls")

def std_or_torch(text):
    """--embed-std: a std, or 'torch' for PyTorch's default init (None)."""
    return None if text == "torch" else float(text)


@dataclass
class ModelConfig:
    """The model. A field with a help text is also train.py's flag of the same name (--n-layer for n_layer), checked
    against its choices and bounds (ge: >=, gt: >, lt: <) and named in a run's label when changed unless label=False
    (config.py); the others come from the task."""
    n_tokens: int = 16
    in_dim: int = 5  # features per token, embedded by a linear map
    n_out: int = 4  # classes (head="cls") or regression targets per token (head="token")
    head: str = "cls"  # cls: classify from the readout token; token: per-token regression
    masked: bool = False  # masked-token prediction: a learned embedding replaces the tokens a mask hides
    mlp_ratio: int = 4
    pe: str = field(default="learned", metadata=dict(help="positional encoding", choices=pe_lib.KINDS))
    init: str = field(default="normal", metadata=dict(help="learned/random: distribution of the entries",
                                                      choices=pe_lib.INITS))
    init_std: float = field(default=0.02, metadata=dict(help="learned/random: std sigma of each entry (0 = zeros)",
                                                        ge=0))
    pe_layers: str = field(default="input", metadata=dict(
        help="additive PEs: added once at the input, or at every block with its own table (the paper)",
        choices=("input", "all")))
    n_layer: int = field(default=4, metadata=dict(help="transformer blocks", gt=0, label=False))
    n_head: int = field(default=1, metadata=dict(help="attention heads", gt=0))
    n_embd: int = field(default=160, metadata=dict(help="model width d", gt=0, label=False))
    norm: str = field(default="post", metadata=dict(help="LayerNorm after (the paper) or before each sublayer",
                                                    choices=("post", "pre")))
    dropout: float = field(default=0.0, metadata=dict(help="dropout on attention and MLP outputs", ge=0))
    pe_dropout: float = field(default=0.0, metadata=dict(
        help="additive PEs: dropout on the stream where each table is added (the authors' fixed sinusoids: 0.1, in "
             "training and, since their evaluation never calls model.eval(), at test too; here in training only)",
        ge=0, lt=1))
    embed_std: float = field(default=0.02, metadata=dict(
        help="init std of the token embedding (zero bias), or 'torch' (None) for PyTorch's default (embedded-token "
             "norm ~4.7 at d=160, the paper's)", type=std_or_torch, none="torch"))
    readout: str = field(default="query", metadata=dict(
        help="grid2d: classify from the query cell's token, the last cell (the authors' public code), or an appended "
             "readout token with its own input channel and PE row (cls, the authors' logged model)", choices=READOUTS))
    mlp_out_gelu: bool = field(default=False, metadata=dict(
        help="a GELU after the MLP's output projection too (the authors' block)"))
    attn_init: str = field(default="linear", metadata=dict(
        help="attention weights as nn.Linear initialises them, or as nn.MultiheadAttention (the authors')",
        choices=("linear", "mha")))


# The authors' model (Ito et al.'s companion code): 4 post-LN blocks, 1 head, a PE table per block, PyTorch's default
# token embedding, their block (trailing GELU, MultiheadAttention's init) and their readout; the width is the task's.
PAPER_MODEL = dict(n_layer=4, n_head=1, norm="post", pe_layers="all", embed_std=None, readout="last",
                   mlp_out_gelu=True, attn_init="mha")


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        if cfg.attn_init == "mha":  # nn.MultiheadAttention: xavier over the whole (3d, d) in-projection, zero biases
            nn.init.xavier_uniform_(self.qkv.weight)
            nn.init.zeros_(self.qkv.bias)
            nn.init.zeros_(self.proj.bias)
        # A key bias b adds q.b to all of a query's scores, which softmax ignores: its gradient is rounding noise that
        # Adam scales up to lr-sized steps. So only q and v keep theirs (dropped after the draw, so every other weight
        # starts as before), but under rotary, whose rotation of b by the key's position makes it a positional term.
        self.key_bias = cfg.pe in pe_lib.ROTARY
        if not self.key_bias:
            q, _, v = self.qkv.bias.detach().chunk(3)
            self.qkv.bias = nn.Parameter(torch.cat([q, v]))

    def forward(self, x, rotary=None, bias=None):
        B, N, D = x.shape
        b = self.qkv.bias if self.key_bias else torch.cat([self.qkv.bias[:D], self.qkv.bias.new_zeros(D),
                                                           self.qkv.bias[D:]])
        q, k, v = F.linear(x, self.qkv.weight, b).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        bias = None if bias is None else bias.to(q.dtype)  # SDPA wants the mask in the query's dtype
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pre = cfg.norm == "pre"
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd), nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd), *([nn.GELU()] if cfg.mlp_out_gelu else []),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x, rotary=None, bias=None):
        if self.pre:
            x = x + self.attn(self.ln1(x), rotary, bias)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, rotary, bias))
        return self.ln2(x + self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, cfg, coords=None):
        super().__init__()
        for f in fields(cfg):  # the choices a flag offers are the only values the model knows
            if "choices" in f.metadata and getattr(cfg, f.name) not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {f.metadata['choices']}, got {getattr(cfg, f.name)!r}")
        if cfg.readout == "cls" and cfg.head != "cls":
            raise ValueError("readout 'cls' appends a token to the inputs of a classifier")
        self.cfg = cfg
        n_tables = cfg.n_layer if cfg.pe_layers == "all" else 1
        extra = int(cfg.readout == "cls")  # the readout token has no coordinate: pe.build gives it its own row
        self.pe = pe_lib.build(cfg.pe, cfg.n_tokens, coords, cfg.n_embd, cfg.n_head, n_tables, cfg.init, cfg.init_std,
                               n_extra=extra)
        self.embed = nn.Linear(cfg.in_dim + extra, cfg.n_embd)
        if cfg.embed_std is not None:
            nn.init.normal_(self.embed.weight, std=cfg.embed_std)
            nn.init.zeros_(self.embed.bias)
        if cfg.masked:
            self.mask_embd = nn.Parameter(torch.randn(cfg.n_embd) * 0.02)  # MAE's mask-token init
        self.pe_drop = nn.Dropout(cfg.pe_dropout) if cfg.pe_dropout else nn.Identity()  # p = 0: no RNG draw
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd) if cfg.norm == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.n_embd, cfg.n_out)

    def forward(self, x, readout=None, mask=None):
        """x: (B, N, in_dim) floats. readout: (B,) token index per sample for head='cls' (unused
        when cfg.readout is 'last').
        mask: (B, N) bools, True where the token's content is hidden (needs cfg.masked).
        Returns (B, n_out) logits for 'cls', (B, N, n_out) for 'token'."""
        if self.cfg.readout == "cls":  # one more token and one more channel, set on that token only
            x = F.pad(x, (0, 1, 0, 1))
            x[:, -1, -1] = 1
        h = self.embed(x)
        if mask is not None:  # replaced, not added to: nothing of a hidden token's content gets through
            h = torch.where(mask[..., None], self.mask_embd.to(h.dtype), h)
        kind = self.cfg.pe  # how it enters: added to the stream, rotating q and k, or biasing the scores
        additive = kind in pe_lib.ADDITIVE and self.pe is not None  # "none" builds no module
        rotary = self.pe if kind in pe_lib.ROTARY else None
        bias = self.pe() if kind in pe_lib.BIAS else None
        for i, block in enumerate(self.blocks):
            if additive and i < self.pe.weight.shape[0]:  # the dropped stream is also the block's residual
                h = self.pe_drop(h + self.pe(i))
            h = block(h, rotary, bias)
        h = self.ln_f(h)
        if self.cfg.head == "cls":
            last = self.cfg.readout in ("last", "cls")
            h = h[:, -1] if last else h[torch.arange(h.shape[0], device=h.device), readout]
        return self.head(h)

    def param_groups(self, weight_decay, pe_weight_decay):
        """AdamW groups with the PE's decay explicit: decay shrinks the very norm under study."""
        pe_params = [p for n, p in self.named_parameters() if n.startswith("pe.")]
        decay = [p for n, p in self.named_parameters() if not n.startswith("pe.") and p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if not n.startswith("pe.") and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return groups + ([{"params": pe_params, "weight_decay": pe_weight_decay}] if pe_params else [])


def init_model(cfg, coords, seed):
    """The model a run starts from: a pure function of its config, coordinates and seed, so its initial PE can be
    rebuilt from a checkpoint's config."""
    torch.manual_seed(seed)
    return Transformer(cfg, coords)


def settings(device="auto", dtype="auto", compile=None, vmap=None):
    """(device, autocast dtype, compile, vmap) with the defaults of train.py and bench.py filled in: the best
    device there is; on CUDA bf16 autocast, torch.compile and one vmap over K models; elsewhere none of them."""
    device = device if device != "auto" else (
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return device, dtype, cuda if compile is None else compile, cuda if vmap is None else vmap


def check_device(name):
    """Refuse (ValueError) a device this machine does not have, naming the ones it has."""
    have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    have += ["mps"] if torch.backends.mps.is_available() else []
    try:
        device = None if name == "auto" else torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; this machine has {', '.join(have)}") from None
    if device is not None and not (device.type == "cpu" or (device.type == "cuda" and (device.index or 0) <
                                   torch.cuda.device_count()) or (device.type == "mps" and "mps" in have)):
        raise ValueError(f"--device {name}: this machine has no such device; it has {', '.join(have)}")


def adamw(groups, device, **kw):
    """AdamW as train.py and bench.py build it: fused (one kernel over all parameters) on CPU and CUDA, 3x faster
    than the loop over them on CPU (1.3 vs 4.2 ms a step of the paper's model) and the same up to rounding."""
    return torch.optim.AdamW(groups, fused=torch.device(device).type in ("cpu", "cuda"), **kw)


def loss_fn(out, y, head, mask=None):
    """Cross-entropy of the classifier, or the MSE over the hidden tokens only (the rest are given)."""
    if head == "cls":
        return F.cross_entropy(out, y)
    return F.mse_loss(out[mask], y[mask])


def stacked(models, named):
    """{name: the models' tensors stacked along a new leading axis}; torch.stack is differentiable, so
    gradients flow back to each model's own parameters."""
    tensors = [dict(named(m)) for m in models]
    return {n: torch.stack([t[n] for t in tensors]) for n in tensors[0]}


def forward_models(models, x, readout=None, mask=None, vmap=False):
    """K independent models of one architecture on K batches: x (K, B, ...), readout (K, B), mask (K, B, N);
    returns (K, B, ...). vmap (K > 1): one batched computation over their stacked weights (dropout draws
    differ from K separate runs'); otherwise K plain calls, faster on CPU, where the batched bias, LayerNorm
    and attention cost more than K small calls' overhead (README, Speed)."""
    inputs = (x, readout, mask)
    if not vmap or len(models) == 1:
        return torch.stack([m(*(None if t is None else t[k] for t in inputs)) for k, m in enumerate(models)])
    weights = (stacked(models, nn.Module.named_parameters), stacked(models, nn.Module.named_buffers))

    def call(w, *args):  # models[0]'s code, model k's weights
        return torch.func.functional_call(models[0], w, args)

    in_dims = (0, *(None if t is None else 0 for t in inputs))
    with sdpa_kernel(SDPBackend.MATH):  # CUDA's fused attention has no backward under vmap ("LSE is not aligned")
        return torch.func.vmap(call, in_dims=in_dims, randomness="different")(weights, *inputs)


def train_step(models, optimizers, batch, head, forward=forward_models, ctx=contextlib.nullcontext()):
    """One optimiser step of each of K models on its own batch (a dict of (K, B, ...) tensors): one backward
    of the summed losses gives each model the gradient of its own loss. Returns outputs (K, B, ...), losses (K,)."""
    with ctx:
        out = forward(models, batch["x"], batch.get("readout"), batch.get("mask")).float()
        losses = torch.stack([loss_fn(out[k], batch["y"][k], head, batch["mask"][k] if "mask" in batch else None)
                              for k in range(len(models))])
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    losses.sum().backward()
    for opt in optimizers:
        opt.step()
    return out, losses.detach()
