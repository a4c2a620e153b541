// The CPU kernels' entry points: paged attention (cpu_attention.cpp), the experts of a
// mixture-of-experts layer (cpu_moe.cpp), weight-only quantized linear layers
// (cpu_quant_gemm.cpp) and the small ops (cpu_ops.cpp), registered as one Python
// module in cpu_bindings.cpp.
#pragma once

#include <string>

#include <ATen/ATen.h>

namespace pagedserve {

// Attention of query [T, H, D] over the K/V blocks each sequence's table names (the
// last `window` positions a query sees, when window > 0); writes `out` [T, H, D] (the
// rows of the listed `sequences`, all when empty). Caches of an fp8 dtype are read
// times k_scale and v_scale.
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                           const at::Tensor& sequences, double scale, int64_t window,
                           double k_scale, double v_scale, at::Tensor out);

// The float32 experts of a MoE layer over hidden [T, H], on weights packed by
// cpu_kernels.pack_moe, for each token's top-k (weights, global ids): out [T, H].
at::Tensor fused_moe(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                     const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                     int64_t first_expert);

// x [M, K] float32 times a weight of `format` (int4, int8 or fp8_e4m3) packed by
// cpu_kernels.pack_quantized (q * scale + offset per group of inputs), transposed:
// [M, out_features].
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& offsets, const std::string& format,
                        int64_t out_features);

// torch.argmax(logits, dim=-1) of contiguous float32 rows [S, V]: [S] int64.
at::Tensor argmax_rows(const at::Tensor& logits);

// Rotate-half rotary embedding of q [T, H, D] and k [T, H_kv, D] in place.
void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin,
             const at::Tensor& positions);

// SiLU(gate) * up of float32 rows [T, 2 I] (gate, then up): [T, I].
at::Tensor silu_and_mul(const at::Tensor& x);

// RMSNorm of float32 rows [T, H], after adding them into `residual` when it is given.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    c10::optional<at::Tensor> residual);

// key and value rows [T, H_kv, D] into the slots slot_mapping [T] names of caches of
// their dtype [blocks, block_size, H_kv, D]; negative slots write nothing.
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache,
                    at::Tensor value_cache, const at::Tensor& slot_mapping);

}  // namespace pagedserve
