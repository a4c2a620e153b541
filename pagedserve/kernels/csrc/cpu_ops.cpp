// The small CPU ops of a forward pass and of greedy sampling: the argmax of logits
// rows, rotary embeddings applied in place, RMSNorm fused with the residual add, the
// MLP's SiLU(gate) * up in one pass, and the write of new K/V rows into their slots.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace pagedserve {

// The first index of each row's largest value (of its first NaN, if it has one), as
// torch.argmax: one vectorized pass finds the maximum, a second stops at its index.
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be a contiguous [rows, vocab] float32 tensor");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "logits have no columns");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* data = logits.data_ptr<float>();
  int64_t* index = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = data + r * vocab;
      // Lane-wise maxima and NaN flags (what the compiler turns into vector selects).
      constexpr int64_t kLanes = 16;
      float lanes[kLanes];
      int nan_lanes[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) {
        lanes[j] = -std::numeric_limits<float>::infinity();
        nan_lanes[j] = 0;
      }
      int64_t full = vocab - vocab % kLanes;
      for (int64_t i = 0; i < full; i += kLanes) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const float v = x[i + j];
          lanes[j] = v > lanes[j] ? v : lanes[j];
          nan_lanes[j] |= v != v;
        }
      }
      float best = -std::numeric_limits<float>::infinity();
      int nan = 0;
      for (int64_t j = 0; j < kLanes; ++j) {
        best = std::max(best, lanes[j]);
        nan |= nan_lanes[j];
      }
      for (int64_t i = full; i < vocab; ++i) {
        best = std::max(best, x[i]);
        nan |= x[i] != x[i];
      }
      int64_t i = 0;
      if (nan) {
        while (x[i] == x[i]) ++i;
      } else {
        while (x[i] != best) ++i;
      }
      index[r] = i;
    }
  });
  return out;
}

// Rotate-half rotary embedding of q [T, H, D] and k [T, H_kv, D] in place (any row and
// head strides, contiguous head_dim), by rows `positions` [T] of cos and sin
// [max_position, D]: x[i] <- x[i] cos[i] - x[i + D/2] sin[i] and
// x[i + D/2] <- x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2], as transformers computes
// x * cos + rotate_half(x) * sin.
void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin,
             const at::Tensor& positions) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
              cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rotary_ takes float32 tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1,
              "q and k must be [T, H, D] with a contiguous head_dim");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
              cos.size(1) == q.size(2) && k.size(2) == q.size(2) && q.size(2) % 2 == 0,
              "cos and sin must be contiguous [max_position, head_dim], head_dim even");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
              positions.size(0) == q.size(0) && k.size(0) == q.size(0),
              "positions must be a contiguous int64 [T], T as in q and k");
  const int64_t tokens = q.size(0), half = q.size(2) / 2, head_dim = q.size(2);
  const int64_t max_position = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_position, "positions[", t, "]=", pos[t],
                " is outside the rotary table (", max_position, ")");
  const float* cos_data = cos.data_ptr<float>();
  const float* sin_data = sin.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos_data + pos[t] * head_dim;
      const float* s = sin_data + pos[t] * head_dim;
      for (at::Tensor* tensor : {&q, &k}) {
        float* base = tensor->data_ptr<float>() + t * tensor->stride(0);
        for (int64_t h = 0; h < tensor->size(1); ++h) {
          float* x = base + h * tensor->stride(1);
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = x[i], x2 = x[i + half];
            x[i] = x1 * c[i] - x2 * s[i];
            x[i + half] = x2 * c[i + half] + x1 * s[i + half];
          }
        }
      }
    }
  });
}

// RMSNorm of float32 rows [T, H] by `weight` [H], as Llama's reference computes it:
// x * rsqrt(mean(x^2) + eps) * weight. With `residual` defined, x is first added into
// it in place (residual += x) and the sum is what is normalized: the residual stream
// and the next sublayer's input in one pass.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous [T, H] float32 tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
              weight.numel() == x.size(1), "weight must be a contiguous float32 [H]");
  const bool add = residual.has_value() && residual->defined();
  if (add)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == at::kFloat &&
                residual->is_contiguous(), "residual must be a contiguous float32 like x");
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* sum = add ? residual->data_ptr<float>() : nullptr;
  const float* w = weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * hidden;
      if (add) {
        float* acc = sum + r * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) acc[i] += row[i];
        row = acc;
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < hidden; ++i) squares += row[i] * row[i];
      const float inverse = 1.f / std::sqrt(squares / static_cast<float>(hidden) +
                                            static_cast<float>(eps));
      float* o = dst + r * hidden;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) o[i] = w[i] * (row[i] * inverse);
    }
  });
  return out;
}

// SiLU(gate) * up of rows [T, 2 I] holding gate then up: [T, I]. One pass, where torch
// takes a split, the SiLU and the product, each a dispatched op with its own output.
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.size(1) % 2 == 0,
              "x must be a contiguous [T, 2 I] float32 tensor");
  const int64_t rows = x.size(0), inter = x.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, x.options());
  const float* in = x.data_ptr<float>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, rows * inter, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / inter, j = i % inter;
      const float gate = in[r * 2 * inter + j], up = in[r * 2 * inter + inter + j];
      y[i] = gate / (1.f + std::exp(-gate)) * up;
    }
  });
  return out;
}

// key and value rows [T, H_kv, D] copied into the slots of the caches [blocks,
// block_size, H_kv, D] of their dtype; a negative slot (a padding row) writes nothing.
// One call, where torch takes a mask, a check read back to the host and two
// index_copy_ calls.
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache,
                    at::Tensor value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "key and value must be [T, H_kv, D]");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes(),
              "the caches must be contiguous [blocks, block_size, H_kv, D] tensors of one shape");
  TORCH_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
              "key rows are [", key.size(1), ", ", key.size(2), "], cache rows [",
              key_cache.size(2), ", ", key_cache.size(3), "]");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() &&
                  value.scalar_type() == value_cache.scalar_type(),
              "key and value must have the caches' dtype");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.size(0) == key.size(0),
              "slot_mapping must be [T] int64");
  const int64_t tokens = key.size(0), row = key.size(1) * key.size(2);
  const int64_t slots = key_cache.size(0) * key_cache.size(1);
  const at::Tensor k = key.stride(2) == 1 && key.stride(1) == key.size(2) ? key : key.contiguous();
  const at::Tensor v =
      value.stride(2) == 1 && value.stride(1) == value.size(2) ? value : value.contiguous();
  const int64_t bytes = row * key.element_size();
  const char* k_src = static_cast<const char*>(k.data_ptr());
  const char* v_src = static_cast<const char*>(v.data_ptr());
  char* k_dst = static_cast<char*>(key_cache.data_ptr());
  char* v_dst = static_cast<char*>(value_cache.data_ptr());
  const int64_t k_stride = k.stride(0) * k.element_size(), v_stride = v.stride(0) * v.element_size();
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot[t] < slots, "slot ", slot[t], " is past the cache's ", slots, " slots");
  }
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slot[t] < 0) continue;
      std::memcpy(k_dst + slot[t] * bytes, k_src + t * k_stride, bytes);
      std::memcpy(v_dst + slot[t] * bytes, v_src + t * v_stride, bytes);
    }
  });
}

}  // namespace pagedserve
