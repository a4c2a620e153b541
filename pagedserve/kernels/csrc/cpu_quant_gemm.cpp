// Weight-only quantized linear layers on the CPU: y = x W^T with W held as 4-bit or
// 8-bit integers, or float8_e4m3 values, and a scale and an offset per group of
// input features,
//
//   W[n, k] = q[n, k] * scale[n, k / G] + offset[n, k / G]
//
// which is every weight-only format we load: GGUF's Q4_0 (offset -8 d), Q4_1
// (offset m), Q8_0 (no offset), zero-point formats (offset -z s: AWQ, GPTQ,
// compressed-tensors) and FP8 (per channel: one group of K; or blocks).
// kernels/cpu_kernels.py's `pack_quantized` lays the weights out; reference.py's
// `quant_linear` is the oracle.
//
// Layout, by blocks of 32 output features (N padded to a multiple of 32):
//   qweight  4-bit: uint8 [N / 32, K, 16]  byte j of row k: feature j (low nibble),
//                                           feature j + 16 (high nibble)
//            8-bit: int8  [N / 32, K, 32]
//            fp8:   float8_e4m3fn bytes [N / 32, K, 32]
//   scales, offsets: float32 or float16 [N / 32, K / G, 32] (both the same)
// A block's weights are read once per tile of up to kMaxRows rows of x and turned
// into floats in registers; no float copy of a layer is ever made. Within a group
// the products of the integers are summed, then scaled: acc += scale * sum_k x q,
// and the offsets add offset * sum_k x, each row's sums over a group taken once.
// Scales and offsets are float16 where that holds them exactly (GGUF's Q4_0, Q4_1
// and Q8_0 store float16): a group of 32 4-bit weights then reads 5 bits a weight
// instead of 6, and decode is a stream of weights.
//
// An e4m3 byte becomes a float32 exactly in three integer ops and a multiply:
// (byte & 0x7F) << 20 is its exponent and mantissa at float32's places, read
// with float32's bias of 127 instead of e4m3's 7, so the value is off by 2^-120
// (subnormals too: they land on float32 subnormals with the same mantissa), and
// the sign bit moves from bit 7 to 31. The 2^120 is multiplied back in registers
// before the products, so no subnormal float32 enters an accumulation.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 2 * kLanes;
// Bytes of weights asked for ahead of the products, as in cpu_moe.cpp.
constexpr int64_t kPrefetchBytes = 4096;

enum class Format { kInt4, kInt8, kFloat8 };

inline float to_float(float value) { return value; }
inline float to_float(at::Half value) { return static_cast<float>(value); }
constexpr int64_t row_bytes_of(Format format) { return format == Format::kInt4 ? kLanes : kBlock; }
constexpr float kE4m3Unbias = 1.329227995784916e36f;  // 2^120

#if defined(__AVX512F__)
constexpr int kMaxRows = 6;  // 4 accumulators a row: 24 of the 32 registers

inline __m512 e4m3_to_float(const uint8_t* q) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512i magnitude = _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x7F)), 20);
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x80)), 24);
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(magnitude, sign)),
                       _mm512_set1_ps(kE4m3Unbias));
}

// 16 scales or offsets, as floats.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The 32 weights of one input index, turned into floats.
template <Format kFormat>
inline void weights_at(const uint8_t* q, __m512& w0, __m512& w1) {
  if constexpr (kFormat == Format::kInt4) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    w0 = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF)));
    w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
  } else if constexpr (kFormat == Format::kFloat8) {
    w0 = e4m3_to_float(q);
    w1 = e4m3_to_float(q + kLanes);
  } else {
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    w1 = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kLanes))));
  }
}

// Rows [0, R) of one block of 32 features: y[r][0:32] over all K, groups of G.
template <Format kFormat, int R, typename S>
void block_rows(const float* const* x, const float* xsum, int64_t groups, const uint8_t* q,
                const S* scale, const S* offset, int64_t K, int64_t G, float* const* y) {
  constexpr int64_t kRowBytes = row_bytes_of(kFormat);
  __m512 total[R][2];
  for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[R][2];
    for (int r = 0; r < R; ++r) part[r][0] = part[r][1] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; ++k) {
      const uint8_t* row = q + k * kRowBytes;
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchBytes), _MM_HINT_T0);
      __m512 w0, w1;
      weights_at<kFormat>(row, w0, w1);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m512 v = _mm512_set1_ps(x[r][k]);
        part[r][0] = _mm512_fmadd_ps(w0, v, part[r][0]);
        part[r][1] = _mm512_fmadd_ps(w1, v, part[r][1]);
      }
    }
    const __m512 s0 = load16(scale + g * kBlock);
    const __m512 s1 = load16(scale + g * kBlock + kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      total[r][0] = _mm512_fmadd_ps(part[r][0], s0, total[r][0]);
      total[r][1] = _mm512_fmadd_ps(part[r][1], s1, total[r][1]);
    }
    if (offset != nullptr) {
      const __m512 o0 = load16(offset + g * kBlock);
      const __m512 o1 = load16(offset + g * kBlock + kLanes);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m512 sum = _mm512_set1_ps(xsum[r * groups + g]);
        total[r][0] = _mm512_fmadd_ps(o0, sum, total[r][0]);
        total[r][1] = _mm512_fmadd_ps(o1, sum, total[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y[r], total[r][0]);
    _mm512_storeu_ps(y[r] + kLanes, total[r][1]);
  }
}
#else
constexpr int kMaxRows = 1;

// The portable path: the same sums, one row at a time, left to the compiler.
template <Format kFormat, int R, typename S>
void block_rows(const float* const* x, const float* xsum, int64_t groups, const uint8_t* q,
                const S* scale, const S* offset, int64_t K, int64_t G, float* const* y) {
  constexpr int64_t kRowBytes = row_bytes_of(kFormat);
  for (int r = 0; r < R; ++r) {
    float total[kBlock] = {};
    for (int64_t g = 0; g < groups; ++g) {
      float part[kBlock] = {};
      for (int64_t k = g * G; k < (g + 1) * G; ++k) {
        const uint8_t* row = q + k * kRowBytes;
        const float v = x[r][k];
        for (int64_t j = 0; j < kBlock; ++j) {
          float value;
          if constexpr (kFormat == Format::kInt4) {
            value = static_cast<float>(j < kLanes ? (row[j] & 0xF) : (row[j - kLanes] >> 4));
          } else if constexpr (kFormat == Format::kFloat8) {
            const uint32_t bits = (static_cast<uint32_t>(row[j] & 0x7F) << 20) |
                                  (static_cast<uint32_t>(row[j] & 0x80) << 24);
            std::memcpy(&value, &bits, sizeof value);
            value *= kE4m3Unbias;
          } else {
            value = static_cast<float>(static_cast<int8_t>(row[j]));
          }
          part[j] += value * v;
        }
      }
      for (int64_t j = 0; j < kBlock; ++j) {
        total[j] += part[j] * to_float(scale[g * kBlock + j]);
        if (offset != nullptr)
          total[j] += to_float(offset[g * kBlock + j]) * xsum[r * groups + g];
      }
    }
    std::memcpy(y[r], total, sizeof total);
  }
}
#endif

template <Format kFormat, typename S, int R = kMaxRows>
void rows_of_block(int rows, const float* const* x, const float* xsum, int64_t groups,
                   const uint8_t* q, const S* scale, const S* offset, int64_t K,
                   int64_t G, float* const* y) {
  if constexpr (R > 0) {
    if (rows == R) return block_rows<kFormat, R, S>(x, xsum, groups, q, scale, offset, K, G, y);
    rows_of_block<kFormat, S, R - 1>(rows, x, xsum, groups, q, scale, offset, K, G, y);
  }
}

template <Format kFormat, typename S>
void quant_linear_impl(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& offsets, at::Tensor& padded_out) {
  const int64_t M = x.size(0), K = x.size(1), blocks = qweight.size(0);
  const int64_t groups = scales.size(1), G = K / groups;
  const int64_t row_bytes = row_bytes_of(kFormat), n_pad = blocks * kBlock;
  const float* xd = x.data_ptr<float>();
  // Each row's sum over each group, for the offsets.
  std::vector<float> xsum(M * groups, 0.f);
  const bool has_offset = offsets.defined();
  if (has_offset)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        float sum = 0.f;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) sum += xd[m * K + k];
        xsum[m * groups + g] = sum;
      }
  const uint8_t* qd = static_cast<const uint8_t*>(qweight.data_ptr());
  const S* sd = scales.data_ptr<S>();
  const S* od = has_offset ? offsets.data_ptr<S>() : nullptr;
  float* yd = padded_out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> rows(kMaxRows);
    std::vector<float*> outs(kMaxRows);
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* q = qd + b * K * row_bytes;
      const S* scale = sd + b * groups * kBlock;
      const S* offset = has_offset ? od + b * groups * kBlock : nullptr;
      for (int64_t m = 0; m < M; m += kMaxRows) {
        const int count = static_cast<int>(std::min<int64_t>(kMaxRows, M - m));
        for (int r = 0; r < count; ++r) {
          rows[r] = xd + (m + r) * K;
          outs[r] = yd + (m + r) * n_pad + b * kBlock;
        }
        rows_of_block<kFormat, S>(count, rows.data(), xsum.data() + m * groups, groups, q, scale,
                             offset, K, G, outs.data());
      }
    }
  });
}

template <typename S>
void dispatch_format(Format kind, const at::Tensor& x, const at::Tensor& qweight,
                     const at::Tensor& scales, const at::Tensor& offsets, at::Tensor& out) {
  if (kind == Format::kInt4)
    quant_linear_impl<Format::kInt4, S>(x, qweight, scales, offsets, out);
  else if (kind == Format::kInt8)
    quant_linear_impl<Format::kInt8, S>(x, qweight, scales, offsets, out);
  else
    quant_linear_impl<Format::kFloat8, S>(x, qweight, scales, offsets, out);
}

void dispatch(Format kind, bool half, const at::Tensor& x, const at::Tensor& qweight,
              const at::Tensor& scales, const at::Tensor& offsets, at::Tensor& out) {
  if (half)
    dispatch_format<at::Half>(kind, x, qweight, scales, offsets, out);
  else
    dispatch_format<float>(kind, x, qweight, scales, offsets, out);
}

}  // namespace

namespace pagedserve {

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& offsets, const std::string& format,
                        int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous [M, K] float32 tensor");
  TORCH_CHECK(format == "int4" || format == "int8" || format == "fp8_e4m3",
              "format must be int4, int8 or fp8_e4m3, got ", format);
  const Format kind = format == "int4" ? Format::kInt4
                      : format == "int8" ? Format::kInt8 : Format::kFloat8;
  const int64_t K = x.size(1), row_bytes = row_bytes_of(kind);
  TORCH_CHECK(qweight.dim() == 3 && qweight.is_contiguous() && qweight.size(1) == K &&
                  qweight.size(2) == row_bytes && qweight.element_size() == 1,
              "qweight must be packed [N_pad / 32, K, ", row_bytes,
              "] bytes (cpu_kernels.pack_quantized)");
  const int64_t blocks = qweight.size(0);
  const bool half = scales.scalar_type() == at::kHalf;
  TORCH_CHECK(scales.dim() == 3 && (half || scales.scalar_type() == at::kFloat) &&
                  scales.is_contiguous() && scales.size(0) == blocks &&
                  scales.size(2) == kBlock && scales.size(1) > 0 && K % scales.size(1) == 0,
              "scales must be float32 or float16 [N_pad / 32, K / group, 32]");
  at::Tensor offset_tensor;
  if (offsets.has_value() && offsets->defined()) {
    offset_tensor = *offsets;
    TORCH_CHECK(offset_tensor.sizes() == scales.sizes() &&
                    offset_tensor.scalar_type() == scales.scalar_type() &&
                    offset_tensor.is_contiguous(),
                "offsets must be shaped like scales, in their dtype");
  }
  TORCH_CHECK(out_features > 0 && out_features <= blocks * kBlock,
              "out_features=", out_features, " does not fit ", blocks, " blocks of 32");
  at::Tensor padded = at::empty({x.size(0), blocks * kBlock}, x.options());
  dispatch(kind, half, x, qweight, scales, offset_tensor, padded);
  return out_features == blocks * kBlock ? padded : padded.narrow(1, 0, out_features).contiguous();
}

}  // namespace pagedserve
