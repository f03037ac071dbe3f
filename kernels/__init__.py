"""The hot ops of a step, behind one small interface the model code calls (it never names a backend).

Each op has a plain-torch reference (any device; slow, obviously right) and a fast version; tests
compare the two on random inputs with ragged batches (tests/kernels; on a GPU tests/cuda).
On CPU the fast versions are C++ (kernels/csrc, built once per machine: kernels.build); the chunked
DeltaNet prefill and the sampler are batched torch. On other devices: batched torch versions of
every op, torch._grouped_mm for the routed experts, and on CUDA the GPU's own kernels (kernels.gpu:
Triton paged attention and DeltaNet decode step; flash-linear-attention's chunked prefill in 16-bit
when installed).

| op | module | fast CPU |
|---|---|---|
| linear (row-wise: a row's result does not depend on its batch) | linear | C++ |
| rms_norm, add_rms_norm, gated_rms_norm | norms | C++ |
| causal_conv1d (decode and prefill, conv state slots in place) | conv | C++ |
| delta_rule = delta_rule_decode + delta_rule_prefill on a mixed step (slots in place) | delta_rule | C++ (*) |
| qk_norm_rope (q/k norms + rotary), paged_attention (+ write_kv; Triton on CUDA) | attention | C++ |
| topk_softmax (router), moe_experts (grouped SwiGLU + weighted sum), add_shared_expert | moe | C++ |
| sample (penalties, temperature, top-k/p, min-p, seeded draws, logprobs) | sampling | batched torch |
| deltanet_mixer, attention_mixer, moe_block: a sublayer's ops above in one call (**) | layers | C++ |
| decoder_layers: every layer of a forward in one call (***) | layers | C++ |

(*) one sweep over the state per row; elsewhere the chunked prefill runs batched in torch.
(**) when `one_call(x)`: the same kernels in the same order as the model's op-by-op path (their
reference: the same bits), without the Python and small tensor calls between them.
(***) when `one_call_forward(x)`: the sublayers' composites above, layer after layer (the same bits).
`fuse_weights` concatenates sibling projections (q/k/v, gate/up, ...) for one matmul each (FP8
weights kept as stored, `Fp8Weight`, with their scales); `weight_of` is a layer's weight as `linear` takes it;
`use_fp8_activations` turns W8A8 on for FP8 weights' prefill-sized GEMMs on GPUs (kernels.gpu.fp8_activations).
Functions marked `@glue` (backend.glue: the plain-torch work between GEMMs and kernels) run through
torch.compile inside `compiled_glue()`, which CUDA decode graphs enter while capturing.
"""

from .attention import paged_attention, qk_norm_rope, write_kv
from .backend import (
    cpu_kernels_loaded, one_call, one_call_forward, reference_kernels, separate_layers, separate_sublayers,
)
from .conv import causal_conv1d
from .delta_rule import delta_rule, delta_rule_decode, delta_rule_prefill
from .fuse import fuse_weights, weight_of
from .gpu.fp8_activations import fp8_activations_on, use_fp8_activations
from .layers import ATTENTION_LAYER, DELTANET_LAYER, attention_mixer, decoder_layers, deltanet_mixer, moe_block
from .linear import Fp8Weight, linear
from .moe import add_shared_expert, moe_experts, topk_softmax
from .norms import add_rms_norm, gated_rms_norm, rms_norm
from .sampling import SamplingTensors, sample, uniform_draw

__all__ = [
    "ATTENTION_LAYER", "DELTANET_LAYER", "Fp8Weight", "SamplingTensors", "add_rms_norm", "add_shared_expert",
    "attention_mixer", "causal_conv1d", "cpu_kernels_loaded", "decoder_layers", "delta_rule", "delta_rule_decode",
    "delta_rule_prefill", "deltanet_mixer", "fp8_activations_on", "fuse_weights", "gated_rms_norm", "linear",
    "moe_block", "moe_experts",
    "one_call", "one_call_forward", "paged_attention", "qk_norm_rope", "reference_kernels", "rms_norm", "sample",
    "separate_layers", "separate_sublayers", "topk_softmax", "uniform_draw", "use_fp8_activations", "weight_of",
    "write_kv",
]
