"""The gated delta rule, in a recurrent (reference, decode) and a chunked (prefill) form.

Per value head, with state S [dk, dv] kept in fp32:
    S <- exp(g_t) * S;  delta = beta_t * (v_t - S^T k_t);  S <- S + k_t (x) delta;  o_t = S^T q_t
q and k are L2-normalised, q is scaled by dk^-0.5, and q/k heads are repeated to the value heads.

Shapes: B sequences, L tokens, Hk key heads, H value heads, dk key dim, dv value dim.
Inputs q, k [B, L, Hk, dk], v [B, L, H, dv], g and beta [B, L, H]; state [B, H, dk, dv] or None.
Both return (o [B, L, H, dv] in v's dtype, final state [B, H, dk, dv] fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensors = tuple[torch.Tensor, ...]


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
    """Token by token: the definition, used for decode and as the reference for the chunked form."""
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


def chunked_gated_delta_rule(q, k, v, g, beta, state=None, chunk_size: int = 64) -> Tensors:
    """Chunk by chunk: within a chunk the updates are solved at once (UT transform), then one
    state hand-off per chunk. Same result as the recurrent form up to fp32 rounding.

    Within a chunk with cumulative log-decay c_i and start state S0, the written values u solve
        u_i = beta_i v_i - beta_i e^{c_i} S0^T k_i - sum_{j<i} beta_i e^{c_i - c_j} (k_i.k_j) u_j,
    a unit lower-triangular system; then o_i = e^{c_i} S0^T q_i + sum_{j<=i} e^{c_i - c_j} (q_i.k_j) u_j
    and S_end = e^{c_last} S0 + sum_j e^{c_last - c_j} k_j (x) u_j.
    """
    out_dtype, L = v.dtype, q.shape[1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    S = _initial_state(state, q, v)
    pad = (-L) % chunk_size  # padded steps have g = 0, beta = 0, k = 0: they change nothing
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    B, H, Lp, dk = q.shape
    n, C = Lp // chunk_size, chunk_size
    q, k, v = (x.view(B, H, n, C, -1) for x in (q, k, v))
    g, beta = g.view(B, H, n, C), beta.view(B, H, n, C)

    cum = g.cumsum(dim=-1)  # c_i: [B, H, n, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    system = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)  # strictly lower part
    eye = torch.eye(C, dtype=system.dtype, device=q.device)
    values = torch.linalg.solve_triangular(system + eye, v * beta[..., None], upper=False)
    state_keys = torch.linalg.solve_triangular(system + eye, k_beta * cum.exp()[..., None], upper=False)
    scores = (q @ k.transpose(-1, -2)) * decay  # [B, H, n, C, C], lower incl. diagonal
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]

    out = torch.empty_like(v)
    for c in range(n):
        u = values[:, :, c] - state_keys[:, :, c] @ S  # [B, H, C, dv]
        out[:, :, c] = q_decayed[:, :, c] @ S + scores[:, :, c] @ u
        S = S * cum[:, :, c, -1].exp()[..., None, None] + k_to_end[:, :, c].transpose(-1, -2) @ u
    out = out.view(B, H, Lp, -1)[:, :, :L]
    return out.transpose(1, 2).to(out_dtype), S
