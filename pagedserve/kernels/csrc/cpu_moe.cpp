// Mixture-of-experts MLP on the CPU, float32: every expert's SwiGLU MLP over the
// tokens that chose it, weighted by the router and summed per token, in one call.
//
//   hidden        [T, H]
//   w13 (packed)  [E, I_pad / 16, H, 32]      gate features j*16.. then up features
//   w2  (packed)  [E, H_pad / 32, I_pad, 32]  32 output features per block
//   topk_weights  [T, k] float32, topk_ids [T, k] int64 (global expert ids)
//   out           [T, H]: sum_j weight[t, j] * expert_{id[t, j]}(hidden[t])
// Experts outside [first_expert, first_expert + E) belong to other ranks: their
// pairs add nothing here. kernels/cpu_kernels.py packs the weights, and
// kernels/reference.py's `moe` is the oracle.
//
// Why a kernel of our own: at decode sizes an expert sees a few rows, and a
// library GEMM per expert (oneDNN) spends more on each call's set-up and on
// reading the weight than on the products. Here the (token, expert) pairs are
// sorted by expert once, each expert's weights stream through once per tile of
// up to kMaxRows rows, the gate and up products meet in registers (SiLU(gate) *
// up is written, not the two), and the down products land in a per-pair buffer
// that the last pass sums per token in a fixed order, so results do not depend
// on the number of threads.
//
// A packed block holds 32 output features for every reduction index k, so the
// inner loop loads two vectors of weights and updates two accumulators per row:
// 12 rows take 24 of the 32 AVX-512 registers.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t ivec16 __attribute__((vector_size(64)));

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 2 * kLanes;  // output features of one packed block
// How far ahead of the products the weights are asked for (64 reduction indices, 8 KB):
// without it a tile of 8 rows waits on memory, then computes, about twice as long as
// either alone; the hardware prefetcher alone does not run far enough ahead.
constexpr int64_t kPrefetchFloats = 2048;
#if defined(__AVX512F__)
constexpr int kMaxRows = 12;
#else
constexpr int kMaxRows = 2;  // 16-byte or 32-byte registers: a vec16 takes two or four
#endif

inline vec16 load(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec16 v) { std::memcpy(p, &v, sizeof v); }

// acc + a * b, fused. Written out: C++20 (the extension's standard) turns off GCC's
// contraction of `acc + a * b`, which would halve the arithmetic rate.
inline vec16 fma(vec16 a, float b, vec16 acc) {
#if defined(__AVX512F__)
  return (vec16)_mm512_fmadd_ps((__m512)a, _mm512_set1_ps(b), (__m512)acc);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 lo, hi, alo, ahi;
  std::memcpy(&lo, &acc, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&acc) + 32, 32);
  std::memcpy(&alo, &a, 32);
  std::memcpy(&ahi, reinterpret_cast<const char*>(&a) + 32, 32);
  const __m256 s = _mm256_set1_ps(b);
  lo = _mm256_fmadd_ps(alo, s, lo);
  hi = _mm256_fmadd_ps(ahi, s, hi);
  vec16 out;
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  return acc + a * b;
#endif
}

// exp(x) lane-wise, Cephes' single-precision method (within 2 ulp): x = n ln2 + r,
// |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n put in the exponent bits.
inline vec16 exp16(vec16 x) {
  const vec16 hi = vec16{} + 88.3762626647949f, lo = vec16{} - 87.3365447504f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  vec16 fx = x * 1.44269504088896341f + 0.5f;
  vec16 n = __builtin_convertvector(__builtin_convertvector(fx, ivec16), vec16);
  n = n > fx ? n - 1.f : n;  // floor
  vec16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const ivec16 bits = (__builtin_convertvector(n, ivec16) + 127) << 23;
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// rows[r] . block[k][0:32] for R rows over K reduction indices: acc[r][0] the first 16
// features, acc[r][1] the next 16.
template <int R>
inline void block_products(const float* const* rows, const float* block, int64_t K,
                           vec16 (&acc)[kMaxRows][2]) {
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vec16{};
  for (int64_t k = 0; k < K; ++k) {
    const vec16 w0 = load(block + k * kBlock), w1 = load(block + k * kBlock + kLanes);
    __builtin_prefetch(block + k * kBlock + kPrefetchFloats);
    __builtin_prefetch(block + k * kBlock + kLanes + kPrefetchFloats);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const float x = rows[r][k];
      acc[r][0] = fma(w0, x, acc[r][0]);
      acc[r][1] = fma(w1, x, acc[r][1]);
    }
  }
}

// One block of up to kMaxRows rows: gate/up (activation) or down (store) products.
template <int R>
inline void tile(const float* const* rows, const float* block, int64_t K, bool gate_up,
                 float* const* dst) {
  vec16 acc[kMaxRows][2];
  block_products<R>(rows, block, K, acc);
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    if (gate_up) {  // SiLU(gate) * up: 16 intermediate features
      const vec16 gate = acc[r][0];
      store(dst[r], gate / (1.f + exp16(-gate)) * acc[r][1]);
    } else {
      store(dst[r], acc[r][0]);
      store(dst[r] + kLanes, acc[r][1]);
    }
  }
}

template <int R = kMaxRows>
inline void tile_rows(int rows, const float* const* src, const float* block, int64_t K,
                      bool gate_up, float* const* dst) {
  if constexpr (R > 0) {
    if (rows == R) return tile<R>(src, block, K, gate_up, dst);
    tile_rows<R - 1>(rows, src, block, K, gate_up, dst);
  }
}

// The pairs of expert e are pair_rows[offsets[e] .. offsets[e + 1]); a work item is one
// (expert, block) and runs over that expert's rows kMaxRows at a time.
void expert_blocks(const std::vector<int64_t>& offsets, int64_t blocks,
                   const std::vector<const float*>& src, const float* weights,
                   int64_t weight_block, int64_t K, bool gate_up,
                   const std::vector<float*>& dst, int64_t dst_block) {
  std::vector<int64_t> items;
  const int64_t experts = static_cast<int64_t>(offsets.size()) - 1;
  for (int64_t e = 0; e < experts; ++e)
    if (offsets[e + 1] > offsets[e])
      for (int64_t b = 0; b < blocks; ++b) items.push_back(e * blocks + b);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float*> out(kMaxRows);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = items[i] / blocks, b = items[i] % blocks;
      const float* block = weights + (e * blocks + b) * weight_block;
      for (int64_t p = offsets[e]; p < offsets[e + 1]; p += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, offsets[e + 1] - p));
        for (int r = 0; r < rows; ++r) out[r] = dst[p + r] + b * dst_block;
        tile_rows(rows, src.data() + p, block, K, gate_up, out.data());
      }
    }
  });
}

}  // namespace

namespace pagedserve {

at::Tensor fused_moe(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                     const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                     int64_t first_expert) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kFloat && hidden.is_contiguous(),
              "hidden must be a contiguous [T, H] float32 tensor");
  const int64_t tokens = hidden.size(0), H = hidden.size(1);
  TORCH_CHECK(w13.dim() == 4 && w13.scalar_type() == at::kFloat && w13.is_contiguous() &&
              w13.size(2) == H && w13.size(3) == kBlock,
              "w13 must be packed [E, I_pad / 16, H, 32] float32 (cpu_kernels.pack_moe)");
  const int64_t experts = w13.size(0), inter = w13.size(1) * kLanes;
  TORCH_CHECK(w2.dim() == 4 && w2.scalar_type() == at::kFloat && w2.is_contiguous() &&
              w2.size(0) == experts && w2.size(1) * kBlock >= H && w2.size(2) == inter &&
              w2.size(3) == kBlock,
              "w2 must be packed [E, H_pad / 32, I_pad, 32] float32 (cpu_kernels.pack_moe)");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == tokens &&
              topk_ids.scalar_type() == at::kLong && topk_ids.is_contiguous() &&
              topk_weights.sizes() == topk_ids.sizes() &&
              topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
              "topk_ids (int64) and topk_weights (float32) must be contiguous [T, k]");
  const int64_t top_k = topk_ids.size(1), h_blocks = w2.size(1), h_pad = h_blocks * kBlock;
  const int64_t* ids = topk_ids.data_ptr<int64_t>();

  // The pairs this rank computes, sorted by expert (a counting sort, stable).
  std::vector<int64_t> offsets(experts + 1, 0), position(tokens * top_k, -1);
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    const int64_t e = ids[i] - first_expert;
    if (e >= 0 && e < experts) ++offsets[e + 1];
  }
  for (int64_t e = 0; e < experts; ++e) offsets[e + 1] += offsets[e];
  const int64_t pairs = offsets[experts];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  std::vector<const float*> token_rows(pairs);
  const float* x = hidden.data_ptr<float>();
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    const int64_t e = ids[i] - first_expert;
    if (e >= 0 && e < experts) {
      position[i] = next[e]++;
      token_rows[position[i]] = x + (i / top_k) * H;
    }
  }

  // SiLU(x W_gate) * (x W_up) per pair, then its down projection per pair.
  at::Tensor act = at::empty({pairs, inter}, hidden.options());
  at::Tensor down = at::empty({pairs, h_pad}, hidden.options());
  std::vector<float*> act_rows(pairs), down_rows(pairs);
  std::vector<const float*> act_in(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    act_rows[p] = act.data_ptr<float>() + p * inter;
    act_in[p] = act_rows[p];
    down_rows[p] = down.data_ptr<float>() + p * h_pad;
  }
  expert_blocks(offsets, inter / kLanes, token_rows, w13.data_ptr<float>(), H * kBlock, H,
                true, act_rows, kLanes);
  expert_blocks(offsets, h_blocks, act_in, w2.data_ptr<float>(), inter * kBlock, inter, false,
                down_rows, kBlock);

  // Each token's pairs, weighted, summed in the order of its top-k.
  at::Tensor out = at::empty({tokens, H}, hidden.options());
  const float* weight = topk_weights.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* o = dst + t * H;
      std::memset(o, 0, H * sizeof(float));
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t p = position[t * top_k + j];
        if (p < 0) continue;
        const float w = weight[t * top_k + j];
        const float* y = down_rows[p];
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) o[h] += w * y[h];
      }
    }
  });
  return out;
}

}  // namespace pagedserve
