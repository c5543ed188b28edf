"""Titans' neural long-term memory (arXiv 2501.00663 §3): an MLP whose weights are the state.

Per head, M maps keys to values. Each token stores itself by one gradient step on
ℓ = ½‖M(k_t) − v_t‖², with momentum and forgetting (eqs. 13–14):

    S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t'}; k_t, v_t),     M_t = (1 − α_t) M_{t−1} + S_t,

the gradient taken at M_{t'}, the weights at the start of the token's chunk of b tokens (the
paper's mini-batch rule, eqs. 16–18). Token t reads y_t = M_t(q_t): its own update included, as
titans-pytorch (chunk_size=1, batch_size=b) and gated_delta_rule (o_t = q_t S_t) do.

Inside a chunk both recurrences are linear in the gradients, and a layer's per-token gradient is
an outer product (layer input)ᵀ(output gradient). So the chunk-end weights and every token's read
through its own weights come from b×b coefficient matrices (TTT's "dual form"), without forming
per-token weights; only the chunks run one after another. The memory's backward pass is written
out (no autograd inside the forward), so the outer training differentiates through it as usual.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import GatedRMSNorm, ShortConvolution
from .rows import realign, tail, unalign


def _gelu(z):
    cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
    return z * cdf, cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327


def _silu(z):
    s = torch.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))


ACTIVATIONS = {"gelu": _gelu, "silu": _silu}  # each returns (f(z), f'(z))


def mlp_read(weights, x, activation="gelu"):
    """M(x): x [B, T, H, i] through per-row weights [B, H, i, o] (activation between layers)."""
    for n, w in enumerate(weights):
        if n:
            x = ACTIVATIONS[activation](x)[0]
        x = torch.einsum("bthi,bhio->btho", x, w)
    return x


def _segment_sums(x):
    """x [..., c] -> [..., c, c] with (i, j) = Σ_{j<l≤i} x_l on and below the diagonal, −inf above.

    Sums, never differences of cumsums, so a log-gate of −inf (η = 0) stays exact."""
    c = x.shape[-1]
    lower = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
    y = x.unsqueeze(-1).expand(*x.shape, c).masked_fill(~lower.tril(-1), 0.0).cumsum(-2)
    return y.masked_fill(~lower, float("-inf"))


def memory_chunk(weights, momentum, k, v, q, lr, log_eta, log_keep, activation="gelu"):
    """One chunk of c tokens from its start weights and momentum (lists of [B, H, i, o]).

    k, q [B, c, H, dk]; v [B, c, H, dv]; lr = θ, log_eta = log η, log_keep = log(1 − α) [B, c, H].
    Returns (reads [B, c, H, dv], weights after the chunk, momentum after the chunk).
    """
    act = ACTIVATIONS[activation]
    # the keys through the start weights, keeping each layer's input and activation slope
    inputs, slopes, h = [], [], k
    for n, w in enumerate(weights):
        if n:
            h, slope = act(z)
            slopes.append(slope)
        inputs.append(h)
        z = torch.einsum("bchi,bhio->bcho", h, w)
    # ∂ℓ/∂(each layer's output), back to front: per-token gradient of layer n = inputs[n]ᵀ grads[n]
    grads = [z - v]
    for n in range(len(weights) - 1, 0, -1):
        grads.insert(0, torch.einsum("bcho,bhio->bchi", grads[0], weights[n]) * slopes[n - 1])

    lr, log_eta, log_keep = (t.transpose(1, 2) for t in (lr, log_eta, log_keep))  # [B, H, c]
    eta_between = _segment_sums(log_eta).exp()  # (m, j): Π_{j<l≤m} η_l
    keep_between = _segment_sums(log_keep).exp()  # (i, m): Π_{m<l≤i} (1 − α_l)
    keep_from_start = log_keep.cumsum(-1).exp()  # coefficient of M_0 in M_i
    from_momentum = (keep_between @ log_eta.cumsum(-1).exp().unsqueeze(-1)).squeeze(-1)  # of S_0 in M_i
    coef = (keep_between @ eta_between) * lr.unsqueeze(-2)  # (i, j): of −u_j in M_i (θ_j included)

    # reads: x M_i = keep·(x M_0) + from_momentum·(x S_0) − Σ_j coef_ij (x · input_j) grad_j, layer by layer
    e = q
    for n, (w, s) in enumerate(zip(weights, momentum)):
        if n:
            e = act(e)[0]
        y = (torch.einsum("bchi,bhio->bcho", e, w) * keep_from_start.transpose(1, 2)[..., None]
             + torch.einsum("bchi,bhio->bcho", e, s) * from_momentum.transpose(1, 2)[..., None])
        scores = torch.einsum("bihd,bjhd->bhij", e, inputs[n]) * coef
        e = y - torch.einsum("bhij,bjho->biho", scores, grads[n])

    last = lambda t: t[..., -1, None, None]  # noqa: E731  the chunk end, as [B, H, 1, 1]
    to_weights, to_momentum = coef[..., -1, :], eta_between[..., -1, :] * lr  # [B, H, c]
    new_weights = [w * last(keep_from_start) + s * last(from_momentum)
                   - torch.einsum("bhj,bjhi,bjho->bhio", to_weights, x, g)
                   for w, s, x, g in zip(weights, momentum, inputs, grads)]
    new_momentum = [s * last(log_eta.cumsum(-1).exp()) - torch.einsum("bhj,bjhi,bjho->bhio", to_momentum, x, g)
                    for s, x, g in zip(momentum, inputs, grads)]
    return e, new_weights, new_momentum


def memory_scan(weights, momentum, k, v, q, lr, log_eta, log_keep, chunk_size, activation="gelu", lengths=None):
    """`memory_chunk` over consecutive chunks of [B, L] tokens (float32 or wider inputs).

    A row's tokens at or past `lengths` [B] (right padding) change none of its state: the returned
    weights and momentum are those after each row's last complete chunk. Returns (reads [B, L, H, dv],
    weights, momentum).
    """
    L, reads = k.shape[1], []
    for start in range(0, L, chunk_size):
        end = min(start + chunk_size, L)
        part = lambda t: t[:, start:end]  # noqa: E731
        r, new_w, new_s = memory_chunk(weights, momentum, *map(part, (k, v, q, lr, log_eta, log_keep)), activation)
        reads.append(r)
        if end - start < chunk_size:
            break  # an open chunk: nothing settles
        if lengths is None:
            weights, momentum = new_w, new_s
        else:
            done = (lengths >= end)[:, None, None, None]
            weights = [torch.where(done, a, b) for a, b in zip(new_w, weights)]
            momentum = [torch.where(done, a, b) for a, b in zip(new_s, momentum)]
    return torch.cat(reads, 1), weights, momentum


def _l2norm(x, weight, heads):
    """Per-head L2 normalisation with a learned per-channel scale (ones at init)."""
    x = x.unflatten(-1, (heads, -1))
    return F.normalize(x, dim=-1) * weight.view(heads, -1).to(x.dtype)


class NeuralMemory(nn.Module):
    """The long-term memory module: q, k, v = SiLU(depthwise-conv(linear(x))), q and k L2-normalised;
    per-token gates θ, η, α; the memory; the read normalised per head, gated by a linear map of x,
    projected back (paper §4.4).

    State (a dict of tensors, constant size): the three conv windows, `weights` and `momentum` (per
    layer [B, H, i, o], float32), and the open chunk's stored tokens (`pending`: k, v, θ, log η,
    log(1 − α) in b − 1 slots, `count` of them) whose update waits for the chunk to fill.
    """

    def __init__(self, config):
        super().__init__()
        D, H, K = config.hidden_size, config.num_heads, config.head_dim
        self.num_heads, self.head_dim, self.chunk_size = H, K, config.memory_chunk_size
        self.activation, self.max_lr, self.use_momentum = config.memory_activation, config.memory_max_lr, config.use_momentum
        hidden = int(K * config.memory_expansion)
        dims = [K] + [hidden] * (config.memory_depth - 1) + [K]
        # the memory's weights at a document start: learned, one MLP per head (x @ W layout)
        self.initial_weights = nn.ParameterList(nn.Parameter(torch.empty(H, i, o)) for i, o in zip(dims, dims[1:]))
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, H * K, bias=False) for _ in range(3))
        conv = lambda: ShortConvolution(H * K, config.memory_conv_size, bias=False, activation="silu")  # noqa: E731
        self.q_conv, self.k_conv, self.v_conv = conv(), conv(), conv()
        self.q_norm_weight = nn.Parameter(torch.ones(H * K))
        self.k_norm_weight = nn.Parameter(torch.ones(H * K))
        self.lr_proj, self.decay_proj = nn.Linear(D, H), nn.Linear(D, H)
        self.momentum_proj = nn.Linear(D, H) if config.use_momentum else None
        self.out_gate = nn.Linear(D, H * K, bias=False)
        self.out_norm = GatedRMSNorm(H * K, eps=config.rms_norm_eps, group_size=K)
        self.o_proj = nn.Linear(H * K, D, bias=False)

    def reset_parameters(self):
        """Memory weights Xavier-normal; θ = max_lr/2, η ≈ 0.9, α ≈ 0.01 at a zero input."""
        for w in self.initial_weights:
            nn.init.normal_(w, std=math.sqrt(2.0 / (w.shape[-2] + w.shape[-1])))
        nn.init.ones_(self.q_norm_weight)
        nn.init.ones_(self.k_norm_weight)
        nn.init.zeros_(self.lr_proj.bias)
        nn.init.constant_(self.decay_proj.bias, -4.6)
        if self.momentum_proj is not None:
            nn.init.constant_(self.momentum_proj.bias, 2.2)

    def initial_state(self, batch: int, device=None) -> dict:
        dt = torch.promote_types(self.initial_weights[0].dtype, torch.float32)
        weights = tuple(w.to(dt).unsqueeze(0).expand(batch, *w.shape) for w in self.initial_weights)
        H, K, P = self.num_heads, self.head_dim, self.chunk_size - 1
        device = device or weights[0].device
        zeros = lambda *shape: torch.zeros(batch, *shape, dtype=dt, device=device)  # noqa: E731
        window = torch.zeros(batch, self.q_conv.kernel_size - 1, H * K, dtype=self.q_proj.weight.dtype, device=device)
        return {"conv_q": window, "conv_k": window, "conv_v": window,
                "weights": weights, "momentum": tuple(torch.zeros_like(w) for w in weights),
                "pending": (zeros(P, H, K), zeros(P, H, K), zeros(P, H), zeros(P, H), zeros(P, H)),
                "count": torch.zeros(batch, dtype=torch.long, device=device)}

    def gates(self, x):
        """θ, log η, log(1 − α) [B, T, H] in float32 (or wider)."""
        dt = torch.promote_types(x.dtype, torch.float32)
        lr = self.max_lr * torch.sigmoid(self.lr_proj(x).to(dt))
        if self.momentum_proj is None:  # η = 0
            log_eta = torch.full_like(lr, float("-inf"))
        else:
            log_eta = F.logsigmoid(self.momentum_proj(x).to(dt))
        return lr, log_eta, F.logsigmoid(-self.decay_proj(x).to(dt))

    def _stream(self, name, proj, conv, x, keep, state, new_state):
        u = proj(x)
        if keep is not None:  # pads enter no conv window
            u = u * keep[..., None].to(u.dtype)
        u, new_state[name] = conv(u, None, None if state is None else state[name])
        return u

    def retrieve(self, x, keep=None, state=None, want_state=False, lengths=None):
        """The raw reads M_t(q_t) [B, T, H, dk] and, if `want_state` or a state was given, the new state.

        x [B, T, D]; keep [B, T] bool (False = pad: neither stored nor read). `lengths` [B] instead
        says the rows are right-padded and start a chunk (MAC's segments): nothing to realign."""
        B, T, _ = x.shape
        H = self.num_heads
        new_state = {}
        q = self._stream("conv_q", self.q_proj, self.q_conv, x, keep, state, new_state)
        k = self._stream("conv_k", self.k_proj, self.k_conv, x, keep, state, new_state)
        v = self._stream("conv_v", self.v_proj, self.v_conv, x, keep, state, new_state)
        dt = torch.promote_types(x.dtype, torch.float32)
        q, k = _l2norm(q.to(dt), self.q_norm_weight, H), _l2norm(k.to(dt), self.k_norm_weight, H)
        v = v.to(dt).unflatten(-1, (H, -1))
        lr, log_eta, log_keep = self.gates(x)
        memory = state if state is not None else self.initial_state(B, x.device)
        tokens = [k, v, lr, log_eta, log_keep, q]
        index = None
        if lengths is None:
            cached = None if state is None else [*memory["pending"], torch.zeros_like(memory["pending"][0])]
            tokens, lengths, index = realign(tokens, keep, cached, None if state is None else memory["count"])
        k, v, lr, log_eta, log_keep, q = tokens
        weights = [w.to(dt) for w in memory["weights"]]
        momentum = [s.to(dt) for s in memory["momentum"]]
        reads, weights, momentum = memory_scan(weights, momentum, k, v, q, lr, log_eta, log_keep, self.chunk_size,
                                               self.activation, lengths)
        reads = unalign(reads, index, keep)
        if state is None and not want_state:
            return reads, None
        if lengths is None:
            lengths = torch.full((B,), k.shape[1], dtype=torch.long, device=x.device)
        pending, count = tail([k, v, lr, log_eta, log_keep], lengths, self.chunk_size, self.chunk_size - 1)
        new_state.update(weights=tuple(weights), momentum=tuple(momentum), pending=tuple(pending), count=count)
        return reads, new_state

    def output(self, reads, x):
        """Normalise each head's read, gate it with a linear map of x, project back to the model width."""
        return self.o_proj(self.out_norm(reads.flatten(-2).to(x.dtype), self.out_gate(x)))

    def forward(self, x, keep=None, state=None, want_state=False, lengths=None):
        reads, state = self.retrieve(x, keep, state, want_state, lengths)
        return self.output(reads, x), state
