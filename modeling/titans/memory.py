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
from .rows import realign, tail, unalign, window_before, write_slots


_INV_SQRT_2PI = 0.3989422804014327


def _gelu_derivatives(z, second=False):
    """GELU's f'(z) (exact, erf form), and with `second` also f''(z)."""
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    slope = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476)) + z * pdf
    return (slope, pdf * (2.0 - z * z)) if second else slope


def _silu_derivatives(z, second=False):
    """SiLU's f'(z), and with `second` also f''(z)."""
    s = torch.sigmoid(z)
    slope = s * (1.0 + z * (1.0 - s))
    return (slope, s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))) if second else slope


class _WithSlope(torch.autograd.Function):
    """(f(z), f'(z)) for the key pass, keeping only z for the backward: written as plain ops, autograd
    kept four z-sized temporaries per call, the largest share of a Titans step's saved memory."""

    @staticmethod
    def forward(ctx, z, activation):
        ctx.activation = activation
        ctx.save_for_backward(z)
        return ACTIVATION_FUNCTIONS[activation](z), _DERIVATIVES[activation](z)

    @staticmethod
    def backward(ctx, d_value, d_slope):
        (z,) = ctx.saved_tensors
        slope, curvature = _DERIVATIVES[ctx.activation](z, second=True)
        return d_value * slope + d_slope * curvature, None


ACTIVATION_FUNCTIONS = {"gelu": F.gelu, "silu": F.silu}
_DERIVATIVES = {"gelu": _gelu_derivatives, "silu": _silu_derivatives}
ACTIVATIONS = {name: (lambda z, name=name: _WithSlope.apply(z, name)) for name in _DERIVATIVES}  # -> (f(z), f'(z))


def mlp_read(weights, x, activation="gelu"):
    """M(x): x [B, T, H, i] through per-row weights [B, H, i, o] (activation between layers)."""
    for n, w in enumerate(weights):
        if n:
            x = ACTIVATION_FUNCTIONS[activation](x)
        x = torch.einsum("bthi,bhio->btho", x, w)
    return x


def _segment_sums(x):
    """x [..., c] -> [..., c, c] with (i, j) = Σ_{j<l≤i} x_l on and below the diagonal, −inf above.

    Sums, never differences of cumsums, so a log-gate of −inf (η = 0) stays exact."""
    c = x.shape[-1]
    lower = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
    y = x.unsqueeze(-1).expand(*x.shape, c).masked_fill(~lower.tril(-1), 0.0).cumsum(-2)
    return y.masked_fill(~lower, float("-inf"))


def _coefficients(lr, log_eta, log_keep):
    """What a chunk's gates do, for gates [..., c] (θ, log η, log(1 − α)), as
    M_i = keep_i M_0 + from_momentum_i S_0 − Σ_{j≤i} coef_ij u_j and
    S_i = eta_from_start_i S_0 − Σ_{j≤i} momentum_coef_ij u_j, u_j the gradient of token j at M_0."""
    eta_between = _segment_sums(log_eta).exp()  # (m, j): Π_{j<l≤m} η_l
    keep_between = _segment_sums(log_keep).exp()  # (i, m): Π_{m<l≤i} (1 − α_l)
    eta_from_start = log_eta.cumsum(-1).exp()
    return dict(keep=log_keep.cumsum(-1).exp(),
                from_momentum=(keep_between @ eta_from_start.unsqueeze(-1)).squeeze(-1),
                coef=(keep_between @ eta_between) * lr.unsqueeze(-2),  # Σ_{m=j..i} Π(1 − α) Π η, times θ_j
                eta_from_start=eta_from_start, momentum_coef=eta_between * lr.unsqueeze(-2))


def _key_pass(weights, k, v, activation):
    """The keys through the chunk-start weights and back: per layer, its inputs and ∂ℓ/∂(its output)
    (the per-token gradient of layer n is inputs[n]ᵀ grads[n]). k [B, c, H, dk], weights [B, H, i, o]."""
    act = ACTIVATIONS[activation]
    inputs, slopes, h = [], [], k
    for n, w in enumerate(weights):
        if n:
            h, slope = act(z)
            slopes.append(slope)
        inputs.append(h)
        z = torch.einsum("bchi,bhio->bcho", h, w)
    grads = [z - v]  # ∂ ½‖M(k) − v‖² / ∂M(k)
    for n in range(len(weights) - 1, 0, -1):
        grads.insert(0, torch.einsum("bcho,bhio->bchi", grads[0], weights[n]) * slopes[n - 1])
    return inputs, grads


def _chunk(co, i):
    return {name: t[:, i] for name, t in co.items()}


def _state_at(weights, momentum, inputs, grads, co, at):
    """(weights, momentum) after token `at` (an int, or per row [B]) of a chunk that started at
    (weights, momentum): co holds the chunk's coefficients ([B, H, c], [B, H, c, c]), inputs and grads
    its key pass."""
    B, H, c = co["keep"].shape
    if isinstance(at, int):
        row = lambda t: t[..., at, None, None]  # noqa: E731  [B, H, 1, 1]
        rows = lambda t: t[..., at, :]  # noqa: E731  [B, H, c]
    else:
        row = lambda t: t.gather(-1, at.view(B, 1, 1).expand(B, H, 1))[..., None]  # noqa: E731
        rows = lambda t: t.gather(-2, at.view(B, 1, 1, 1).expand(B, H, 1, c))[:, :, 0]  # noqa: E731
    update = lambda by: [torch.einsum("bhj,bjhi,bjho->bhio", by, x, g) for x, g in zip(inputs, grads)]  # noqa: E731
    new_w = [w * row(co["keep"]) + s * row(co["from_momentum"]) - u
             for w, s, u in zip(weights, momentum, update(rows(co["coef"])))]
    new_s = [s * row(co["eta_from_start"]) - u for s, u in zip(momentum, update(rows(co["momentum_coef"])))]
    return new_w, new_s


def _chunk_reads(weights, momentum, inputs, grads, co, q, activation):
    """Every token's read of one chunk through its own weights, q [B, c, H, dk]:
    x M_i = keep_i·(x M_0) + from_momentum_i·(x S_0) − Σ_j coef_ij (x · input_j) grad_j, layer by layer."""
    keep, from_momentum = (co[name].transpose(-1, -2)[..., None] for name in ("keep", "from_momentum"))  # [B, c, H, 1]
    e = q
    for layer, (w, s, x, g) in enumerate(zip(weights, momentum, inputs, grads)):
        if layer:
            e = ACTIVATION_FUNCTIONS[activation](e)
        y = torch.einsum("bchi,bhio->bcho", e, w) * keep + torch.einsum("bchi,bhio->bcho", e, s) * from_momentum
        scores = torch.einsum("bihd,bjhd->bhij", e, x) * co["coef"]
        e = y - torch.einsum("bhij,bjho->biho", scores, g)
    return e


def memory_scan(weights, momentum, k, v, q, lr, log_eta, log_keep, chunk_size, activation="gelu", lengths=None,
                current=False):
    """The memory over [B, L] tokens from (weights, momentum) (lists of [B, H, i, o], float32 or wider).

    k, q [B, L, H, dk]; v [B, L, H, dv]; lr = θ, log_eta = log η, log_keep = log(1 − α) [B, L, H].
    The gate coefficients are batched over all chunks; the key pass, the reads and the state update
    go chunk after chunk (reads batched over all chunks would need stacked copies of every chunk's
    weights, 11% more memory kept for the backward, which kept MAC at 32K from fitting in 24 GB).
    A row's tokens at or past `lengths` [B] (right padding) change none of its state. Returns
    (reads [B, L, H, dv], weights, momentum) with the state after each row's last complete chunk, and
    with `current` also (weights, momentum) after each row's last token (what a token-by-token step
    goes on from).
    """
    B, L, H, _ = k.shape
    c, n = chunk_size, math.ceil(L / chunk_size)
    grow = n * c - L  # the open chunk's missing tokens: zeros, after every real one
    chunks = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, grow)).unflatten(1, (n, c))  # noqa: E731
    k, v, q = chunks(k), chunks(v), chunks(q)  # [B, n, c, H, d]
    gates = [chunks(t).permute(0, 1, 3, 2) for t in (lr, log_eta, log_keep)]  # [B, n, H, c]
    co = _coefficients(*gates)
    anchors, saved, reads = [], [], []
    for i in range(n):
        inputs, grads = _key_pass(weights, k[:, i], v[:, i], activation)
        anchors.append((weights, momentum))
        saved.append((inputs, grads))
        reads.append(_chunk_reads(weights, momentum, inputs, grads, _chunk(co, i), q[:, i], activation))
        if i == n - 1 and grow:
            break  # an open chunk: nothing settles
        new_w, new_s = _state_at(weights, momentum, inputs, grads, _chunk(co, i), c - 1)
        if lengths is None:
            weights, momentum = new_w, new_s
        else:
            done = (lengths >= (i + 1) * c)[:, None, None, None]
            weights = [torch.where(done, a, b) for a, b in zip(new_w, weights)]
            momentum = [torch.where(done, a, b) for a, b in zip(new_s, momentum)]
    reads = torch.cat(reads, 1)[:, :L]
    if not current:
        return reads, weights, momentum
    last = (torch.full((B,), L, device=k.device) if lengths is None else lengths) - 1
    now = anchors[0]
    for i in (last.clamp(min=0) // c).unique().tolist():  # the chunks that hold a row's last token
        w, s = _state_at(*anchors[i], *saved[i], _chunk(co, i), last % c)
        pick = ((last >= 0) & (last // c == i)).view(B, 1, 1, 1)
        now = tuple([torch.where(pick, a, b) for a, b in zip(new, old)] for new, old in zip((w, s), now))
    return reads, weights, momentum, now


def one_token_step(x, keep, state) -> bool:
    """Whether a call can take the one-token decoding path: a cache, one token per row, no pads."""
    return bool(state) and x.shape[1] == 1 and (keep is None or bool(keep.all()))


def l2norm_heads(x, weight, heads):
    """Per-head L2 normalisation with a learned per-channel scale (ones at init)."""
    x = x.unflatten(-1, (heads, -1))
    return F.normalize(x, dim=-1) * weight.view(heads, -1).to(x.dtype)


class NeuralMemory(nn.Module):
    """The long-term memory module: q, k, v = SiLU(depthwise-conv(linear(x))), q and k L2-normalised;
    per-token gates θ, η, α; the memory; the read normalised per head, gated by a linear map of x,
    projected back (paper §4.4).

    State (a dict of tensors, constant size): the three conv windows, `weights` and `momentum` (per
    layer [B, H, i, o], float32) at the open chunk's start, the open chunk's stored tokens (`pending`:
    k, v, θ, log η, log(1 − α) in b − 1 slots, `count` of them) whose update waits for the chunk to
    fill, and `current`, `current_momentum`: the state after the last token, from which decoding
    steps one token at a time (`step`) instead of redoing the open chunk.
    """

    def __init__(self, config):
        super().__init__()
        D, H, K = config.hidden_size, config.num_heads, config.head_dim
        self.num_heads, self.head_dim, self.chunk_size = H, K, config.memory_chunk_size
        self.activation, self.max_lr = config.memory_activation, config.memory_max_lr
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
        momentum = tuple(torch.zeros_like(w) for w in weights)
        return {"conv_q": window, "conv_k": window, "conv_v": window,
                "weights": weights, "momentum": momentum, "current": weights, "current_momentum": momentum,
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

    def _stream(self, name, proj, conv, x, keep, state, new_state, lengths=None):
        u = proj(x)
        if keep is not None:  # pads enter no conv window
            u = u * keep[..., None].to(u.dtype)
        before = None if state is None else state[name]
        out, new_state[name] = conv(u, None, before)
        if lengths is not None:  # right-padded rows: the window ends at each row's last token
            new_state[name] = window_before(before, u, lengths, conv.kernel_size - 1)
        return out

    def retrieve(self, x, keep=None, state=None, want_state=False, lengths=None, current=True):
        """The raw reads M_t(q_t) [B, T, H, dk] and, if `want_state` or a state was given, the new state.

        x [B, T, D]; keep [B, T] bool (False = pad: neither stored nor read). `lengths` [B] instead
        says the rows are right-padded and start a chunk (MAC's segments): nothing to realign.
        current=False leaves the state after the last token out (no decoding follows)."""
        B, T, _ = x.shape
        new_state = {}
        if lengths is None and one_token_step(x, keep, state):
            return self.step(x, state)
        k, v, q, lr, log_eta, log_keep = self._tokens(x, keep, state, new_state, lengths)
        memory = state if state is not None else self.initial_state(B, x.device)
        tokens = [k, v, lr, log_eta, log_keep, q]
        index = None
        if lengths is None:
            cached = None if state is None else [*memory["pending"], torch.zeros_like(memory["pending"][0])]
            tokens, lengths, index = realign(tokens, keep, cached, None if state is None else memory["count"])
        k, v, lr, log_eta, log_keep, q = tokens
        dt = k.dtype
        weights = [w.to(dt) for w in memory["weights"]]
        momentum = [s.to(dt) for s in memory["momentum"]]
        stateful = state is not None or want_state
        reads, weights, momentum, *now = memory_scan(weights, momentum, k, v, q, lr, log_eta, log_keep,
                                                     self.chunk_size, self.activation, lengths,
                                                     current=stateful and current)
        reads = unalign(reads, index, keep)
        if not stateful:
            return reads, None
        if lengths is None:
            lengths = torch.full((B,), k.shape[1], dtype=torch.long, device=x.device)
        pending, count = tail([k, v, lr, log_eta, log_keep], lengths, self.chunk_size, self.chunk_size - 1)
        new_state.update(weights=tuple(weights), momentum=tuple(momentum), pending=tuple(pending), count=count)
        if now:
            new_state.update(current=tuple(now[0][0]), current_momentum=tuple(now[0][1]))
        return reads, new_state

    def _tokens(self, x, keep, state, new_state, lengths=None):
        """k, v, q [B, T, H, d] (float32 or wider) and the gates θ, log η, log(1 − α) [B, T, H]."""
        H = self.num_heads
        q = self._stream("conv_q", self.q_proj, self.q_conv, x, keep, state, new_state, lengths)
        k = self._stream("conv_k", self.k_proj, self.k_conv, x, keep, state, new_state, lengths)
        v = self._stream("conv_v", self.v_proj, self.v_conv, x, keep, state, new_state, lengths)
        dt = torch.promote_types(x.dtype, torch.float32)
        q, k = l2norm_heads(q.to(dt), self.q_norm_weight, H), l2norm_heads(k.to(dt), self.k_norm_weight, H)
        return (k, v.to(dt).unflatten(-1, (H, -1)), q, *self.gates(x))

    def step(self, x, state):
        """One token for every row, x [B, 1, D]: the recurrence itself on the current state,
        S = η S − θ u, M = (1 − α) M + S with u the token's gradient at the chunk-start weights; the
        token also joins the open chunk, and when the chunk fills the anchor moves to M, S (`settle`)."""
        new_state = {}
        k, v, q, lr, log_eta, log_keep = (t[:, 0] for t in self._tokens(x, None, state, new_state))
        dt, b = k.dtype, self.chunk_size
        anchor = [w.to(dt) for w in state["weights"]]
        inputs, grads = _key_pass(anchor, k[:, None], v[:, None], self.activation)
        gate = lambda g: g[..., None, None]  # noqa: E731  [B, H] -> [B, H, 1, 1]
        momentum = [gate(log_eta.exp()) * s.to(dt) - gate(lr) * torch.einsum("bhi,bho->bhio", a[:, 0], g[:, 0])
                    for s, a, g in zip(state["current_momentum"], inputs, grads)]
        weights = [gate(log_keep.exp()) * w.to(dt) + s for w, s in zip(state["current"], momentum)]
        read = mlp_read(weights, q[:, None], self.activation)
        count = state["count"]
        pending = write_slots(state["pending"], count, (k, v, lr, log_eta, log_keep))
        new_state.update(weights=state["weights"], momentum=state["momentum"], pending=pending,
                         count=torch.where(count + 1 == b, 0, count + 1), current=tuple(weights),
                         current_momentum=tuple(momentum))
        if not torch.compiler.is_compiling():  # compiled, the step has no branch on the data: the caller settles
            new_state = self.settle(new_state)
        return read, new_state

    @staticmethod
    def settle(state):
        """Rows whose chunk just filled (count 0) start the next chunk from their current state; a
        no-op elsewhere. A branch on the data, so that the weights are copied only when a chunk closes."""
        if state is None or "current" not in state:
            return state
        closed = state["count"] == 0  # also a row at a chunk boundary after a prefill: anchor = current there
        if not closed.any():
            return state
        pick = lambda new, old: tuple(torch.where(closed.view(-1, 1, 1, 1), n, o.to(n.dtype))  # noqa: E731
                                      for n, o in zip(new, old))
        return {**state, "weights": pick(state["current"], state["weights"]),
                "momentum": pick(state["current_momentum"], state["momentum"])}

    def output(self, reads, x):
        """Normalise each head's read, gate it with a linear map of x, project back to the model width."""
        return self.o_proj(self.out_norm(reads.flatten(-2).to(x.dtype), self.out_gate(x)))

    def forward(self, x, keep=None, state=None, want_state=False, lengths=None, current=True):
        reads, state = self.retrieve(x, keep, state, want_state, lengths, current)
        return self.output(reads, x), state
