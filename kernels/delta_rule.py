"""The gated delta rule of Gated DeltaNet: decode steps and chunked prefill over a flat batch of
sequences whose states live in a slot pool, with plain-torch references beside the fast versions.

Per value head, with state S [dk, dv] kept in fp32:
    S <- exp(g_t) * S;  delta = beta_t * (v_t - S^T k_t);  S <- S + k_t (x) delta;  o_t = S^T q_t
q and k are L2-normalised, q is scaled by dk^-0.5, and q/k heads are repeated to the value heads;
g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b) come from the raw projections a, b.

Shapes: T rows (B sequences, one after another), Hk key heads, H value heads, dk / dv head dims,
M state slots. Inputs q, k [T, Hk, dk], v [T, H, dv], a and b [T, H]; the pool state [M, H, dk, dv]
(fp32) is read at `slots` [B] and written at `out_slots` [B] (None: in place; other rows keep the
state from before the step, which a failed step then still has); outputs o [T, H, dv] in v's dtype.
On CPU one C++ kernel walks every sequence's rows with its state in cache (decode and prefill
alike); on CUDA decodes run kernels.gpu.delta_rule's Triton kernel on the slots in place and
prefills flash-linear-attention's chunked kernel when installed (kernels.gpu.fla); elsewhere decodes
take one batched recurrent step and prefills the chunked form, batched over every chunk of the step.
The sequence-level rules (`recurrent_gated_delta_rule`, `chunked_gated_delta_rule`) take
[B, L, heads, d] and return (o, final state): they are the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import batched, glue, native
from .gpu import delta_rule as gpu_delta_rule
from .gpu import fla
from .gpu.triton_guard import KernelUnavailable

Tensors = tuple[torch.Tensor, ...]
CHUNK = 64  # the reference's chunk size (transformers' torch_chunk_gated_delta_rule)


@glue
def gating(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> Tensors:
    """g = -exp(A_log) * softplus(a + dt_bias) in fp32, beta = sigmoid(b) in b's dtype."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias), torch.sigmoid(b)


# -- sequence-level rules (the references) --------------------------------------------------------
def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta) -> Tensors:
    """fp32, heads-first [B, H, L, d], normalised q/k, scaled q, q/k repeated to value heads."""
    repeat = v.shape[2] // k.shape[2]
    if repeat > 1:
        q, k = q.repeat_interleave(repeat, dim=2), k.repeat_interleave(repeat, dim=2)
    q, k, v, g, beta = (x.transpose(1, 2).float().contiguous() for x in (q, k, v, g, beta))
    q, k = _l2norm(q), _l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def _initial_state(state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, H, _, dk = q.shape
    if state is None:
        return q.new_zeros(B, H, dk, v.shape[-1])
    return state.float()


def recurrent_gated_delta_rule(q, k, v, g, beta, state=None) -> Tensors:
    """Token by token: the definition. q, k [B, L, Hk, dk], v [B, L, H, dv], g, beta [B, L, H]."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    S = _initial_state(state, q, v)  # [B, H, dk, dv]
    out = torch.empty_like(v)
    for t in range(q.shape[2]):
        S = S * g[:, :, t].exp()[..., None, None]
        predicted = (S * k[:, :, t, :, None]).sum(dim=-2)  # S^T k: [B, H, dv]
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (S * q[:, :, t, :, None]).sum(dim=-2)
    return out.transpose(1, 2).to(out_dtype), S


def _chunk_terms(q, k, v, g, beta) -> Tensors:
    """The within-chunk solve, for chunks [..., C, d] with g, beta [..., C] (any leading dims).

    Within a chunk with cumulative log-decay c_i and start state S0, the written values u solve
        u_i = beta_i v_i - beta_i e^{c_i} S0^T k_i - sum_{j<i} beta_i e^{c_i - c_j} (k_i.k_j) u_j,
    a unit lower-triangular system: u = values - state_keys @ S0. Then
        o = q_decayed @ S0 + scores @ u,   S_end = e^{c_last} S0 + k_to_end^T @ u.
    Returns (values, state_keys, scores, q_decayed, k_to_end, end_decay)."""
    C = q.shape[-2]
    cum = g.cumsum(dim=-1)  # c_i
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    system = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)  # strictly lower part
    unit = system + torch.eye(C, dtype=system.dtype, device=q.device)
    values = torch.linalg.solve_triangular(unit, v * beta[..., None], upper=False)
    state_keys = torch.linalg.solve_triangular(unit, k_beta * cum.exp()[..., None], upper=False)
    scores = (q @ k.transpose(-1, -2)) * decay  # lower incl. diagonal
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    return values, state_keys, scores, q_decayed, k_to_end, cum[..., -1].exp()


def chunked_gated_delta_rule(q, k, v, g, beta, state=None, chunk_size: int = CHUNK) -> Tensors:
    """Chunk by chunk (one state hand-off per chunk); same result as the recurrent form up to fp32
    rounding. Shapes as `recurrent_gated_delta_rule`."""
    out_dtype, L = v.dtype, q.shape[1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    S = _initial_state(state, q, v)
    pad = (-L) % chunk_size  # padded steps have g = 0, beta = 0, k = 0: they change nothing
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    B, H, Lp, _ = q.shape
    n, C = Lp // chunk_size, chunk_size
    q, k, v = (x.view(B, H, n, C, -1) for x in (q, k, v))
    values, state_keys, scores, q_decayed, k_to_end, end_decay = _chunk_terms(
        q, k, v, g.view(B, H, n, C), beta.view(B, H, n, C))
    out = torch.empty_like(v)
    for c in range(n):
        u = values[:, :, c] - state_keys[:, :, c] @ S  # [B, H, C, dv]
        out[:, :, c] = q_decayed[:, :, c] @ S + scores[:, :, c] @ u
        S = S * end_decay[:, :, c, None, None] + k_to_end[:, :, c].transpose(-1, -2) @ u
    out = out.view(B, H, Lp, -1)[:, :, :L]
    return out.transpose(1, 2).to(out_dtype), S


# -- flat batches on the slot pool ----------------------------------------------------------------
def delta_rule_decode_reference(q, k, v, a, b, A_log, dt_bias, state, slots, out_slots=None) -> torch.Tensor:
    """One token per sequence (T = B): gathers the slots' states, steps, writes them back."""
    g, beta = gating(a, b, A_log, dt_bias)
    out, final = recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                            state[slots])
    state[slots if out_slots is None else out_slots] = final
    return out[:, 0]


def delta_rule(q, k, v, a, b, A_log, dt_bias, state, slots, query_start, query_lens: list[int],
               num_decodes: int, out_slots=None) -> torch.Tensor:
    """A step's rows: sequences 0 .. num_decodes - 1 have one row each, the rest are prefill chunks;
    query_start [B + 1] row offsets (query_lens the same on the host)."""
    if native(q):
        return torch.ops.epserve.delta_rule(q, k, v, a, b, A_log, dt_bias, state, slots, query_start,
                                            slots if out_slots is None else out_slots)
    d, args, out = num_decodes, (A_log, dt_bias, state), slots if out_slots is None else out_slots
    if d == len(query_lens):
        return delta_rule_decode(q, k, v, a, b, *args, slots, out)
    if d == 0:
        return delta_rule_prefill(q, k, v, a, b, *args, slots, query_lens, out_slots=out)
    return torch.cat([delta_rule_decode(q[:d], k[:d], v[:d], a[:d], b[:d], *args, slots[:d], out[:d]),
                      delta_rule_prefill(q[d:], k[d:], v[d:], a[d:], b[d:], *args, slots[d:], query_lens[d:],
                                         out_slots=out[d:])])


def _offsets(query_lens: list[int], device) -> torch.Tensor:
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, device=device)


def delta_rule_decode(q, k, v, a, b, A_log, dt_bias, state, slots, out_slots=None) -> torch.Tensor:
    """One token per sequence (T = B) on the pool: the state is read and written once."""
    if native(q):
        query_start = torch.arange(q.shape[0] + 1, device=q.device)
        return torch.ops.epserve.delta_rule(q, k, v, a, b, A_log, dt_bias, state, slots, query_start,
                                            slots if out_slots is None else out_slots)
    if batched(q) and gpu_delta_rule.usable(q):
        try:
            return gpu_delta_rule.decode(q, k, v, a, b, A_log, dt_bias, state, slots,
                                         slots if out_slots is None else out_slots)
        except KernelUnavailable:  # logged once; from now on FLA's kernel or the batched version
            pass
    if fla.usable(q):
        return fla.decode(q, k, v, *gating(a, b, A_log, dt_bias), state, slots,
                          slots if out_slots is None else out_slots)
    return delta_rule_decode_reference(q, k, v, a, b, A_log, dt_bias, state, slots, out_slots)


def delta_rule_prefill_reference(q, k, v, a, b, A_log, dt_bias, state, slots, query_lens: list[int],
                                 out_slots=None):
    """Sequence by sequence through `chunked_gated_delta_rule`."""
    out_slots = slots if out_slots is None else out_slots
    g, beta = gating(a, b, A_log, dt_bias)
    out = v.new_empty(v.shape)
    start = 0
    for i, n in enumerate(query_lens):
        rows = slice(start, start + n)
        o, final = chunked_gated_delta_rule(q[None, rows], k[None, rows], v[None, rows], g[None, rows],
                                            beta[None, rows], state[slots[i : i + 1]])
        out[rows], state[out_slots[i : i + 1]] = o[0], final
        start += n
    return out


def delta_rule_prefill(q, k, v, a, b, A_log, dt_bias, state, slots, query_lens: list[int],
                       chunk_size: int = CHUNK, out_slots=None) -> torch.Tensor:
    """Every sequence's chunks at once: each sequence is cut into chunks (the last one padded), the
    within-chunk solves run batched over all chunks of all sequences, and the state hand-off runs
    once per chunk index, batched over the sequences that have that chunk. query_lens [B] (host)."""
    if native(q):
        query_start = _offsets(query_lens, q.device)
        return torch.ops.epserve.delta_rule(q, k, v, a, b, A_log, dt_bias, state, slots, query_start,
                                            slots if out_slots is None else out_slots)
    if fla.usable(q):
        return fla.prefill(q, k, v, *gating(a, b, A_log, dt_bias), state, slots,
                           slots if out_slots is None else out_slots, _offsets(query_lens, "cpu"))
    if not batched(q):
        return delta_rule_prefill_reference(q, k, v, a, b, A_log, dt_bias, state, slots, query_lens, out_slots)
    T, H = v.shape[0], v.shape[1]
    g, beta = gating(a, b, A_log, dt_bias)
    repeat = H // k.shape[1]
    qf, kf = (x.repeat_interleave(repeat, dim=1).float() for x in (q, k))
    qf, kf = _l2norm(qf) * qf.shape[-1] ** -0.5, _l2norm(kf)
    C, device = chunk_size, q.device
    # padded layout: chunk c of sequence i holds its rows c*C .. c*C + C - 1; pads read row T (zeros)
    chunks = [-(-n // C) for n in query_lens]
    rows, first_chunk, start = [], [], 0
    for n, num in zip(query_lens, chunks):
        first_chunk.append(len(rows) // C)
        rows.extend(start + i if i < n else T for i in range(num * C))
        start += n
    rows_t = torch.tensor(rows, device=device)
    valid = torch.tensor([i for i, r in enumerate(rows) if r < T], device=device)

    def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, ...] -> [N, H, C, ...]
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[rows_t]
        return x.view(-1, C, *x.shape[1:]).transpose(1, 2)

    qp, kp, vp = padded(qf), padded(kf), padded(v.float())
    gp, betap = padded(g), padded(beta.float())
    values, state_keys, scores, q_decayed, k_to_end, end_decay = _chunk_terms(qp, kp, vp, gp, betap)
    out = torch.empty_like(vp)  # [N, H, C, dv]
    S = state[slots]  # [B, H, dk, dv]
    for c in range(max(chunks)):
        active = [i for i, num in enumerate(chunks) if num > c]
        ids = torch.tensor([first_chunk[i] + c for i in active], device=device)
        sel = None if len(active) == len(chunks) else torch.tensor(active, device=device)
        S_act = S if sel is None else S[sel]
        u = values[ids] - state_keys[ids] @ S_act
        out[ids] = q_decayed[ids] @ S_act + scores[ids] @ u
        S_new = S_act * end_decay[ids][..., None, None] + k_to_end[ids].transpose(-1, -2) @ u
        if sel is None:
            S = S_new
        else:
            S[sel] = S_new
    state[slots if out_slots is None else out_slots] = S
    flat = out.transpose(1, 2).reshape(-1, H, v.shape[2])  # [N * C, H, dv]
    return flat[valid].to(v.dtype)
