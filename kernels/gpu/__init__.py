"""The GPU's own kernels behind kernels/ ops, each imported only where its library is present:
`attention` (paged attention as Triton kernels), `delta_rule` (the Gated DeltaNet decode step as a
Triton kernel, the state slots updated in place), `moe` (the routed experts: SwiGLU and the weighted
sum around their grouped GEMMs, a Triton pass each, and for decode-sized batches matrix-vector
kernels instead of the GEMMs, over 16-bit or FP8 banks; grouped kernels over banks as stored; FP8
banks' dequantisation; dense FP8 weights), `fp8_activations` (W8A8: the grouped kernels' activations
in e4m3, FP8 x FP8), `fla` (flash-linear-attention's chunked prefill and recurrent kernels);
`rounding` and `triton_guard` serve them. Triton comes with torch's CUDA builds; without a GPU the
tests run the Triton kernels on CPU tensors through Triton's interpreter."""
