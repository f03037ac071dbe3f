"""Every fast kernel against its plain-torch reference on random inputs, ragged batches included."""

from __future__ import annotations

import contextlib

import pytest
import torch

import kernels
from kernels import reference_kernels

DTYPES = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    assert kernels.cpu_kernels_loaded(), "the C++ CPU kernels did not build"


def both(fn, *args):
    """(fast, reference) results of fn on the same inputs (in-place state arguments cloned)."""
    fast_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    ref_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    fast = fn(*fast_args)
    with reference_kernels():
        ref = fn(*ref_args)
    return fast, ref, fast_args, ref_args


def close(a, b, tol):
    if isinstance(a, tuple):
        return all(close(x, y, tol) for x, y in zip(a, b))
    scale = max(1.0, b.abs().max().item())
    return (a.float() - b.float()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=g).to(dtype)
    w = (0.1 * torch.randn(64, generator=g)).to(dtype)
    strided = torch.randn(7, 3, 128, generator=g).to(dtype)[..., :64]  # heads sliced from a projection
    for inp in (x, strided, x[:, 0]):
        fast, ref, *_ = both(kernels.rms_norm, inp, w, 1e-6)
        assert close(fast, ref, DTYPES[dtype])
    fast, ref, *_ = both(kernels.add_rms_norm, x[:, 0], x[:, 1], w, 1e-6)
    assert close(fast, ref, DTYPES[dtype])
    z = torch.randn(7, 3, 64, generator=g).to(dtype)
    fast, ref, *_ = both(kernels.gated_rms_norm, x, z, 1 + w, 1e-6)
    assert close(fast, ref, DTYPES[dtype])


def ragged(lens):
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts)


LENS = [1, 1, 5, 64, 65, 130, 3]  # decodes, short and long prefill chunks around the chunk size


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d(dtype):
    g = torch.Generator().manual_seed(1)
    T, C, K, M = sum(LENS), 96, 4, 10
    x = torch.randn(T, 2 * C, generator=g).to(dtype)[:, :C]  # strided rows, as the fused projection
    weight = torch.randn(C, K, generator=g).to(dtype)
    state = torch.randn(M, K - 1, C, generator=g).to(dtype)
    slots = torch.tensor([7, 2, 0, 9, 4, 1, 5])
    for backend in ("native", "batched"):
        with backend_named(backend):
            fast, ref, fast_args, ref_args = both(kernels.causal_conv1d, x, weight, state, slots, ragged(LENS), LENS)
        assert close(fast, ref, DTYPES[dtype]), backend
        assert torch.equal(fast_args[2], ref_args[2]), backend  # the slots' last inputs, untouched elsewhere


def paged_inputs(dtype, heads, cache_dtype, block_size, hd, lens, past, width=12, seed=5):
    """paged_attention's arguments for sequences of lens[i] new rows after past[i] cached ones (heads
    = (query heads, kv heads)), their blocks scattered over the cache, the query's heads strided
    (sliced from a wider tensor), K/V in cache_dtype (None: the query's)."""
    H, KV = heads
    g = torch.Generator().manual_seed(seed)
    context = [n + p for n, p in zip(lens, past)]
    num_blocks = sum(-(-L // block_size) for L in context) + 3
    key_cache = torch.randn(num_blocks, KV, block_size, hd, generator=g).to(cache_dtype or dtype)
    value_cache = torch.randn(num_blocks, KV, block_size, hd, generator=g).to(cache_dtype or dtype)
    blocks, tables = torch.randperm(num_blocks, generator=g).tolist(), []
    for L in context:
        n = -(-L // block_size)
        tables.append(blocks[:n] + [0] * (width - n))
        blocks = blocks[n:]
    query = torch.randn(sum(lens), H, 2 * hd, generator=g).to(dtype)[..., :hd]
    return (query, key_cache, value_cache, torch.tensor(tables), ragged(lens), torch.tensor(context), hd**-0.5, lens)


def delta_inputs(T, Hk, H, dk, dv, M, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, 2 * Hk * dk + H * dv + 7, generator=g).to(dtype)  # strided views
    q = qkv[:, : Hk * dk].view(T, Hk, dk)
    k = qkv[:, Hk * dk : 2 * Hk * dk].view(T, Hk, dk)
    v = qkv[:, 2 * Hk * dk : 2 * Hk * dk + H * dv].view(T, H, dv)
    ab = torch.randn(T, 2 * H, generator=g).to(dtype)
    A_log = torch.rand(H, generator=g).to(dtype)
    dt_bias = torch.randn(H, generator=g).to(dtype)
    state = 0.1 * torch.randn(M, H, dk, dv, generator=g)
    return q, k, v, ab[:, :H], ab[:, H:], A_log, dt_bias, state


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_rule_decode(dtype):
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(5, 2, 4, 32, 16, 8, dtype, seed=2)
    slots = torch.tensor([3, 0, 7, 5, 1])
    fast, ref, fast_args, ref_args = both(kernels.delta_rule_decode, q, k, v, a, b, A_log, dt_bias, state, slots)
    assert close(fast, ref, DTYPES[dtype])
    assert close(fast_args[7], ref_args[7], 2e-5)  # states stay fp32


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_rule_prefill(dtype):
    lens = [5, 64, 65, 130, 1, 17]
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(sum(lens), 2, 4, 32, 16, 8, dtype, seed=3)
    slots = torch.tensor([3, 0, 7, 5, 1, 6])
    fast, ref, fast_args, ref_args = both(kernels.delta_rule_prefill, q, k, v, a, b, A_log, dt_bias, state,
                                          slots, lens)
    assert close(fast, ref, DTYPES[dtype])
    assert close(fast_args[7], ref_args[7], 2e-5)


def test_prefill_then_decode_equals_recurrence():
    """A prefill chunk followed by decode steps continues the same recurrence as token-by-token."""
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(40, 2, 4, 32, 16, 2, torch.float32, seed=4)
    state.zero_()
    slots = torch.tensor([1])
    whole = kernels.delta_rule_prefill(q, k, v, a, b, A_log, dt_bias, state.clone(), slots, [40])
    split_state = state.clone()
    first = kernels.delta_rule_prefill(q[:30], k[:30], v[:30], a[:30], b[:30], A_log, dt_bias, split_state,
                                       slots, [30])
    rest = [kernels.delta_rule_decode(q[t : t + 1], k[t : t + 1], v[t : t + 1], a[t : t + 1], b[t : t + 1],
                                      A_log, dt_bias, split_state, slots) for t in range(30, 40)]
    assert close(torch.cat([first, *rest]), whole, 2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (8, 1), (2, 2)])
@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn])  # None: the query's
@pytest.mark.parametrize("block_and_head", [(4, 16), (32, 41)])  # blocks of more than 16 keys; a ragged head
def test_paged_attention(dtype, heads, cache_dtype, block_and_head):
    if cache_dtype == dtype:
        pytest.skip("the same as the query's")
    S, hd = block_and_head
    args = paged_inputs(dtype, heads, cache_dtype, S, hd, [1, 1, 9, 3, 17], [0, 20, 3, 0, 14])
    for backend in ("native", "batched"):
        with backend_named(backend):
            fast, ref, *_ = both(kernels.paged_attention, *args)
        assert close(fast, ref, DTYPES[dtype]), backend


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn])  # None: the rows'
def test_write_kv_stores_the_same_bits_as_torch(dtype, cache_dtype):
    """Rows land at their slots rounded exactly as torch's .to() rounds them (e4m3 saturated at 448,
    e5m2 overflowing to inf), strided heads included; the rest of the cache is untouched."""
    g = torch.Generator().manual_seed(14)
    N, KV, S, hd, T = 8, 2, 16, 40, 11
    key = (300 * torch.randn(T, KV, 2 * hd, generator=g)).to(dtype)[..., :hd]  # strided heads; some past 448
    value = (3 * torch.randn(T, KV * hd, generator=g)).to(dtype).view(T, KV, hd)
    key[0, 0, :2] = torch.tensor([1e5, -7e4])  # past e5m2's largest finite value too
    slots = torch.randperm(N * S, generator=g)[:T]
    caches = [torch.randn(N, KV, S, hd, generator=g).to(cache_dtype or dtype) for _ in range(2)]
    fast, ref, fast_args, ref_args = both(kernels.write_kv, *caches, key, value, slots)
    for a, b in zip(fast_args[:2], ref_args[:2]):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert not torch.equal(fast_args[0].view(torch.uint8), caches[0].view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_softmax(dtype):
    g = torch.Generator().manual_seed(6)
    # distinct values (bf16 has few): tie order is up to each implementation
    logits = torch.stack([torch.randperm(64, generator=g) for _ in range(9)]).to(dtype) / 8
    (idx, w), (ref_idx, ref_w), *_ = both(kernels.topk_softmax, logits, 6)
    assert torch.equal(idx, ref_idx) and close(w, ref_w, DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_experts(dtype):
    g = torch.Generator().manual_seed(7)
    R, K, N, D, I = 40, 3, 6, 32, 8
    x = torch.randn(R, D, generator=g).to(dtype)
    idx = torch.randint(-1, N, (R, K), generator=g)  # -1: not in this bank
    idx[:20, 0] = 2  # a hot expert: more rows than one task takes
    weights = torch.rand(R, K, generator=g).to(dtype)
    gate_up = (0.3 * torch.randn(N, 2 * I, D, generator=g)).to(dtype)
    down = (0.3 * torch.randn(N, D, I, generator=g)).to(dtype)
    fast, ref, *_ = both(kernels.moe_experts, x, idx, weights, gate_up, down)
    assert close(fast, ref, DTYPES[dtype])
    # obviously right, row by row
    expected = torch.zeros(R, D)
    for r in range(R):
        for k in range(K):
            e = int(idx[r, k])
            if e >= 0:
                gate, up = (gate_up[e].float() @ x[r].float()).chunk(2)
                expected[r] += weights[r, k].float() * (down[e].float() @ (torch.nn.functional.silu(gate) * up))
    assert close(fast, expected, DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partial", [False, True])
def test_grouped_and_padded_gemm_experts_match_the_reference(dtype, partial, monkeypatch):
    """The GPU paths (torch._grouped_mm; the padded batched matmuls of large steps), run here on CPU
    tensors: same sums as the reference. The padded one declines skewed routing before any GEMM."""
    from kernels import moe
    from kernels.moe import moe_experts_grouped, moe_experts_padded, moe_experts_reference

    g = torch.Generator().manual_seed(8)
    R, K, N, D, I = 37, 4, 9, 32, 16
    x = torch.randn(R, D, generator=g).to(dtype)
    idx = torch.randint(-1, N, (R, K), generator=g)
    idx[:, 0] = torch.where(torch.arange(R) < 25, 3, idx[:, 0])  # a hot expert; expert 5 may get none
    idx[idx == 5] = -1
    weights = torch.rand(R, K, generator=g).to(dtype)
    gate_up = (0.3 * torch.randn(N, 2 * I, D, generator=g)).to(dtype)
    down = (0.3 * torch.randn(N, D, I, generator=g)).to(dtype)
    grouped = moe_experts_grouped(x, idx, weights, gate_up, down, partial)
    ref = moe_experts_reference(x, idx, weights, gate_up, down, partial)
    assert grouped.dtype == ref.dtype and close(grouped, ref, DTYPES[dtype])
    # expert 3 holds 25+ of ~110 pairs in the bank: 9 x its count is over 1.5 x the pairs
    assert moe_experts_padded(x, idx, weights, gate_up, down, partial) is None
    monkeypatch.setattr(moe, "PADDED_MAX_WASTE", 10.0)
    padded = moe_experts_padded(x, idx, weights, gate_up, down, partial)
    assert padded.dtype == ref.dtype and close(padded, ref, DTYPES[dtype])
    monkeypatch.undo()  # the default bound again
    even = torch.arange(R * K).view(R, K) % N  # 16-17 pairs each: 9 x 17 < 1.5 x 148
    padded = moe_experts_padded(x, even, weights, gate_up, down, partial)
    assert close(padded, moe_experts_reference(x, even, weights, gate_up, down, partial), DTYPES[dtype])
    # the dispatch on a step the padded path declines: the grouped GEMMs take its sort (sorted once)
    sorts, sort = [], moe._pairs_by_expert
    monkeypatch.setattr(moe, "_pairs_by_expert", lambda *a: sorts.append(1) or sort(*a))
    monkeypatch.setattr(moe, "native", lambda *a: False)  # no C++ kernel: the GPU's dispatch
    monkeypatch.setattr(moe.gpu_moe, "few_rows_usable", lambda *a: False)
    monkeypatch.setattr(moe, "padded_usable", lambda *a: True)
    served = moe.moe_experts(x, idx, weights, gate_up, down, partial)
    assert sorts == [1] and torch.equal(served, grouped)


def test_empty_batch_runs_through_every_op():
    """An attention worker with no sequences still runs the forward (it joins the collectives)."""
    T, none = 0, torch.zeros(0, dtype=torch.long)
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(T, 2, 4, 32, 16, 8, torch.float32, seed=8)
    assert kernels.delta_rule_decode(q, k, v, a, b, A_log, dt_bias, state, none).shape == (0, 4, 16)
    assert kernels.gated_rms_norm(v, v, torch.ones(16), 1e-6).shape == (0, 4, 16)
    assert kernels.rms_norm(q, torch.ones(32), 1e-6).shape == (0, 2, 32)
    conv = kernels.causal_conv1d(torch.zeros(0, 8), torch.zeros(8, 4), torch.zeros(2, 3, 8), none,
                                 torch.zeros(1, dtype=torch.long), [])
    assert conv.shape == (0, 8)
    cache = torch.zeros(4, 2, 4, 16)
    out = kernels.paged_attention(torch.zeros(0, 4, 16), cache, cache, torch.zeros(0, 1, dtype=torch.long),
                                  torch.zeros(1, dtype=torch.long), none, 0.25, [])
    assert out.shape == (0, 4, 16)
    idx, w = kernels.topk_softmax(torch.zeros(0, 8), 2)
    assert idx.shape == w.shape == (0, 2)
    assert kernels.moe_experts(torch.zeros(0, 16), idx, w, torch.zeros(8, 8, 16), torch.zeros(8, 16, 4)).shape == (0, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_rule_on_a_mixed_step(dtype):
    """Decode rows first, then prefill chunks, in one call, as a layer makes it."""
    lens = [1, 1, 1, 70, 5]
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(sum(lens), 2, 4, 32, 16, 8, dtype, seed=9)
    slots = torch.tensor([6, 2, 4, 0, 7])
    fast, ref, fast_args, ref_args = both(kernels.delta_rule, q, k, v, a, b, A_log, dt_bias, state, slots,
                                          ragged(lens), lens, 3)
    assert close(fast, ref, DTYPES[dtype])
    assert close(fast_args[7], ref_args[7], 2e-5)


def test_batched_chunked_prefill_equals_per_sequence():
    """The batched torch prefill (the path for devices without their own kernel) against the
    sequence-by-sequence reference."""
    from kernels import backend
    from kernels.delta_rule import delta_rule_prefill_reference

    lens = [5, 64, 65, 130, 1, 17]
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(sum(lens), 2, 4, 32, 16, 8, torch.float32, seed=3)
    slots = torch.tensor([3, 0, 7, 5, 1, 6])
    batched_state, ref_state = state.clone(), state.clone()
    loaded, backend._cpu_kernels = backend._cpu_kernels, False  # as on a device without C++ kernels
    try:
        out = kernels.delta_rule_prefill(q, k, v, a, b, A_log, dt_bias, batched_state, slots, lens)
    finally:
        backend._cpu_kernels = loaded
    ref = delta_rule_prefill_reference(q, k, v, a, b, A_log, dt_bias, ref_state, slots, lens)
    assert close(out, ref, 2e-5) and close(batched_state, ref_state, 2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linear_few_rows(dtype, rows):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(rows, 2 * 100, generator=g).to(dtype)[:, :100]  # strided rows, K not a multiple of 16
    weight = torch.randn(67, 100, generator=g).to(dtype)
    fast, ref, *_ = both(kernels.linear, x, weight)
    assert close(fast, ref, DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [100, 300])
def test_linear_row_is_the_same_bits_in_any_batch(dtype, K):
    """Batch invariance at its root: a row's output does not depend on how many rows share the call
    or where it sits among them (groups of up to four, a short last group)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(9, K, generator=g).to(dtype)
    weight = torch.randn(37, K, generator=g).to(dtype)
    alone = torch.cat([kernels.linear(x[r:r + 1], weight) for r in range(9)])
    for rows in range(2, 10):
        assert torch.equal(kernels.linear(x[:rows], weight), alone[:rows])
    assert torch.equal(kernels.linear(x[3:8], weight), alone[3:8])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 12])
def test_add_shared_expert(dtype, rows):
    g = torch.Generator().manual_seed(11)
    D, I = 48, 24
    x = torch.randn(rows, D, generator=g).to(dtype)
    gate_up = (0.3 * torch.randn(2 * I, D, generator=g)).to(dtype)
    down = (0.3 * torch.randn(D, I, generator=g)).to(dtype)
    logits = torch.randn(rows, 9, generator=g).to(dtype)  # the shared gate's logit is the last column
    routed = torch.randn(rows, D, generator=g).to(dtype)
    fast, ref, *_ = both(kernels.add_shared_expert, x, gate_up, down, logits[:, 8:], routed)
    assert close(fast, ref, DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope(dtype):
    g = torch.Generator().manual_seed(12)
    T, H, KV, hd = 6, 4, 2, 32
    q_and_gate = torch.randn(T, H, 2 * hd, generator=g).to(dtype)
    key = torch.randn(T, KV, hd, generator=g).to(dtype)
    weights = [(0.1 * torch.randn(hd, generator=g)).to(dtype) for _ in range(2)]
    positions = torch.tensor([0, 1, 7, 100, 4095, 60000])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))  # rotary on 8 of 32 dims
    fast, ref, *_ = both(kernels.qk_norm_rope, q_and_gate[..., :hd], key, *weights, 1e-6, positions, inv_freq)
    assert close(fast, ref, DTYPES[dtype])
    # multimodal rows: a position per rotary frequency (time / row / column interleaved)
    per_freq = torch.stack([positions, positions + 3, positions - 1, positions], dim=1).clamp(min=0)
    fast, ref, *_ = both(kernels.qk_norm_rope, q_and_gate[..., :hd], key, *weights, 1e-6, per_freq, inv_freq)
    assert close(fast, ref, DTYPES[dtype])
    plain, *_ = both(kernels.qk_norm_rope, q_and_gate[..., :hd], key, *weights, 1e-6, positions, inv_freq)
    assert not close(fast, plain, DTYPES[dtype])


@contextlib.contextmanager
def backend_named(name):
    """'native': the C++ kernels; 'batched': the batched torch versions (a device without its own
    kernels); 'reference': the plain-torch references."""
    from kernels import backend
    if name == "reference":
        with reference_kernels():
            yield
        return
    loaded = backend._cpu_kernels
    backend._cpu_kernels = name == "native"
    try:
        yield
    finally:
        backend._cpu_kernels = loaded


@pytest.mark.parametrize("name", ["native", "batched", "reference"])
def test_state_written_to_other_rows_equals_in_place(name):
    """A double-buffered state cache reads a slot's row and writes the other one: the same outputs
    and new states as in place, and the rows read (the state before the step) left as they were."""
    lens = [1, 1, 1, 70, 5]
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(sum(lens), 2, 4, 32, 16, 16, torch.float32, seed=10)
    C, K = 96, 4
    g = torch.Generator().manual_seed(11)
    x, weight = torch.randn(sum(lens), C, generator=g), torch.randn(C, K, generator=g)
    conv_state = torch.randn(16, K - 1, C, generator=g)
    read, write = torch.tensor([6, 2, 4, 0, 7]), torch.tensor([9, 14, 8, 3, 12])
    with backend_named(name):
        in_place, elsewhere = state.clone(), state.clone()
        o1 = kernels.delta_rule(q, k, v, a, b, A_log, dt_bias, in_place, read, ragged(lens), lens, 3)
        o2 = kernels.delta_rule(q, k, v, a, b, A_log, dt_bias, elsewhere, read, ragged(lens), lens, 3, write)
        conv_in_place, conv_elsewhere = conv_state.clone(), conv_state.clone()
        y1 = kernels.causal_conv1d(x, weight, conv_in_place, read, ragged(lens), lens)
        y2 = kernels.causal_conv1d(x, weight, conv_elsewhere, read, ragged(lens), lens, write)
    untouched = [i for i in range(16) if i not in write.tolist()]
    for out1, out2, new1, new2, before in ((o1, o2, in_place, elsewhere, state),
                                          (y1, y2, conv_in_place, conv_elsewhere, conv_state)):
        assert torch.equal(out1, out2)
        assert torch.equal(new2[write], new1[read])
        assert torch.equal(new2[untouched], before[untouched])
