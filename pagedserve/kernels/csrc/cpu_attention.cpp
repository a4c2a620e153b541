// Paged attention on the CPU, reading K and V from the pool's blocks where they lie.
//
// Shapes as in kernels/reference.py:
//   query          [num_tokens, num_heads, head_dim]
//   key/value      [num_blocks, block_size, num_kv_heads, head_dim]
//   block_tables   [num_seqs, max_blocks] int32
//   seq_lens       [num_seqs] int32, context length after this step
//   query_start_loc[num_seqs + 1] int32
// Query row j of a sequence with q_len queries sees context positions
// 0 .. seq_len - q_len + j (causal over a paged prefix; a decode token sees all);
// with a sliding `window` W > 0, only the last W of them (p - W + 1 .. p for the
// query at position p), and the blocks before a tile's first such position are
// not read.
//
// One work item is (sequence, KV head, a tile of up to kQueryTile query rows):
// the query heads that share the KV head and the tile's rows are processed
// together, so each K and V row is read once per item. Scores are kept for the
// whole context (float32), then softmaxed, then V is accumulated: two passes
// over the blocks, no gather, no padding. `sequences` (int32) lists the
// sequences to compute, all of them when empty; the others' rows are left as
// they are.
//
// The caches hold the query's dtype, or fp8 (float8_e4m3fn or float8_e5m2, both
// caches the same): then a K or V row is read as bytes, each looked up in a table
// of the format's 256 values times the layer's k_scale or v_scale (built once per
// call). The table is exact for every code, subnormals included, and involves no
// arithmetic on denormal floats, which would stall the vector units; a float
// cache ignores the scales.
#include "cpu_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kQueryTile = 16;
constexpr int64_t kTransposeFrom = 8;  // vectors per item from which Q is held transposed
constexpr int64_t kPrefetch = 4;  // positions ahead whose K or V row is prefetched
constexpr int64_t kVRows = 4;  // rows of V per accumulator update (the FMA below names 4)

struct Item {
  int64_t seq, kv_head, row_begin, row_end;
};

using Fp8Table = std::array<float, 256>;

// A K or V row as float32: in place for float32, converted into `buffer` otherwise.
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, float* buffer, int64_t n, const Fp8Table*) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) buffer[d] = static_cast<float>(src[d]);
    return buffer;
  }
}

// An fp8 row (its bytes) as float32, scaled: each byte's entry of `table`.
inline const float* as_float(const uint8_t* src, float* buffer, int64_t n, const Fp8Table* table) {
  const float* values = table->data();
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) buffer[d] = values[src[d]];
  return buffer;
}

// The value of every byte of an fp8 `type`, times `scale`.
Fp8Table fp8_table(at::ScalarType type, double scale) {
  Fp8Table table;
  for (int code = 0; code < 256; ++code) {
    const auto bits = static_cast<uint8_t>(code);
    const float value =
        type == at::kFloat8_e4m3fn
            ? static_cast<float>(c10::Float8_e4m3fn(bits, c10::Float8_e4m3fn::from_bits()))
            : static_cast<float>(c10::Float8_e5m2(bits, c10::Float8_e5m2::from_bits()));
    table[code] = value * static_cast<float>(scale);
  }
  return table;
}

// Asks for the cache lines of a K or V row a few positions ahead (a prefetch never
// faults, so rows past the block's end cost a wasted request at most). The rows of
// one KV head lie a whole token's heads apart, a stride the hardware prefetcher
// does not follow across pages.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(scalar_t)); b += 64)
    __builtin_prefetch(bytes + b);
}

// A dot product in one vector register, summed across its lanes at the end. Written
// with intrinsics where the machine has them: the compiler's own reduction of an
// `omp simd` loop sums the lanes one by one through memory, which costs more than
// the products.
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t d = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= n; d += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= n; d += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  sum = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
#endif
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// cache_t: scalar_t for a float cache, uint8_t for an fp8 one (read through k_table and
// v_table, which a float cache leaves null).
template <typename scalar_t, typename cache_t>
void attend(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
            const at::Tensor& block_tables, const at::Tensor& seq_lens,
            const at::Tensor& query_start_loc, const at::Tensor& sequences, double scale,
            int64_t window, const Fp8Table* k_table, const Fp8Table* v_table, at::Tensor& out) {
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t num_seqs = seq_lens.size(0);
  const scalar_t* q_data = query.data_ptr<scalar_t>();
  const cache_t* k_data = static_cast<const cache_t*>(key_cache.const_data_ptr());
  const cache_t* v_data = static_cast<const cache_t*>(value_cache.const_data_ptr());
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int64_t token_stride = num_kv_heads * head_dim;  // between rows of one block
  const int64_t block_stride = block_size * token_stride;

  std::vector<int64_t> chosen;
  if (sequences.numel() == 0) {
    for (int64_t s = 0; s < num_seqs; ++s) chosen.push_back(s);
  } else {
    const int32_t* listed = sequences.data_ptr<int32_t>();
    for (int64_t i = 0; i < sequences.numel(); ++i) {
      TORCH_CHECK(listed[i] >= 0 && listed[i] < num_seqs, "sequences[", i, "]=", listed[i],
                  " is not a sequence of the batch (", num_seqs, ")");
      chosen.push_back(listed[i]);
    }
  }
  std::vector<Item> items;
  for (const int64_t s : chosen) {
    const int64_t q_len = starts[s + 1] - starts[s];
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t r = 0; r < q_len; r += kQueryTile)
        items.push_back({s, h, r, std::min(q_len, r + kQueryTile)});
  }

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_buf, scores, acc, row(kVRows * head_dim);
    std::vector<int64_t> limits_buf;
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      const int64_t q_start = starts[item.seq], q_len = starts[item.seq + 1] - q_start;
      const int64_t seq_len = lens[item.seq], prefix = seq_len - q_len;
      const int64_t rows = item.row_end - item.row_begin, m_count = rows * group;
      const int64_t context = prefix + item.row_end;  // what the tile's last row sees
      // The first position the tile's first row sees: with a window, the positions
      // before it are never read, and scores are kept from it on.
      const int64_t low = window > 0 ? std::max<int64_t>(0, prefix + item.row_begin + 1 - window)
                                     : 0;
      const int32_t* table = tables + item.seq * max_blocks;
      TORCH_CHECK((context + block_size - 1) / block_size <= max_blocks,
                  "seq_lens[", item.seq, "]=", seq_len, " needs more blocks than block_tables has (",
                  max_blocks, ")");
      // Vector m is query row (row_begin + m / group), head (kv_head * group + m % group).
      // Scores are position-major, [context][m_count], so that one position's scores for
      // every vector are side by side. Few vectors (a decode token's group) take one dot
      // product each; many (a prompt tile) are held transposed, [head_dim][m_count], so
      // that a K row updates all their scores with vector FMAs and no horizontal sums.
      const bool transposed = m_count >= kTransposeFrom;
      q_buf.resize(m_count * head_dim);
      scores.resize((context - low) * m_count);
      acc.assign(m_count * head_dim, 0.f);
      limits_buf.resize(m_count);
      for (int64_t m = 0; m < m_count; ++m) {
        const int64_t token = q_start + item.row_begin + m / group;
        const int64_t head = item.kv_head * group + m % group;
        const scalar_t* q_row = q_data + (token * num_heads + head) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) {
          const float value = static_cast<float>(q_row[d]) * static_cast<float>(scale);
          q_buf[transposed ? d * m_count + m : m * head_dim + d] = value;
        }
        limits_buf[m] = prefix + item.row_begin + m / group + 1;  // positions it sees
      }
      // Both passes walk the table block by block (a division per position would cost
      // more than the position's arithmetic).
      const int64_t num_blocks = (context + block_size - 1) / block_size;
      // Pass 1: scores of every vector against every context position it may see. Rows
      // are causal: the vectors from `first` on see position t; with a window, those
      // before `last`.
      for (int64_t b = low / block_size; b < num_blocks; ++b) {
        const int64_t block_start = b * block_size;
        const int64_t end = std::min(context, block_start + block_size);
        const int64_t t_begin = std::max(block_start, low);
        const cache_t* k_row = k_data + table[b] * block_stride + item.kv_head * head_dim +
                               (t_begin - block_start) * token_stride;
        for (int64_t t = t_begin; t < end; ++t, k_row += token_stride) {
          prefetch_row(k_row + kPrefetch * token_stride, head_dim);
          const float* k = as_float(k_row, row.data(), head_dim, k_table);
          const int64_t first = std::max<int64_t>(0, t - prefix - item.row_begin) * group;
          const int64_t last = window > 0 ? std::min<int64_t>(
              m_count, (t + window - prefix - item.row_begin) * group) : m_count;
          float* score = &scores[(t - low) * m_count];
          if (transposed) {
            std::fill(score + first, score + last, 0.f);
            for (int64_t d = 0; d < head_dim; ++d) {
              const float kd = k[d];
              const float* qd = &q_buf[d * m_count];
#pragma omp simd
              for (int64_t m = first; m < last; ++m) score[m] += qd[m] * kd;
            }
          } else {
            for (int64_t m = first; m < last; ++m)
              score[m] = dot(&q_buf[m * head_dim], k, head_dim);
          }
        }
      }
      // Softmax of each vector over the positions it sees; the others weigh 0.
      for (int64_t m = 0; m < m_count; ++m) {
        const int64_t seen = limits_buf[m];
        // Positions from - low .. seen - low of the kept scores, which start at `low`.
        const int64_t from = (window > 0 ? std::max<int64_t>(low, seen - window) : 0) - low;
        const int64_t to = seen - low;
        float* score = &scores[m];
        float max_score = -std::numeric_limits<float>::infinity();
        for (int64_t t = from; t < to; ++t) max_score = std::max(max_score, score[t * m_count]);
        float sum = 0.f;
        for (int64_t t = from; t < to; ++t) {
          const float p = std::exp(score[t * m_count] - max_score);
          score[t * m_count] = p;
          sum += p;
        }
        const float inverse = 1.f / sum;
        for (int64_t t = from; t < to; ++t) score[t * m_count] *= inverse;
        for (int64_t t = 0; t < from; ++t) score[t * m_count] = 0.f;
        for (int64_t t = to; t < context - low; ++t) score[t * m_count] = 0.f;
      }
      // Pass 2: the probabilities times V, kVRows positions of a block at a time, so that
      // each vector's accumulator is loaded and stored once per kVRows rows of V.
      for (int64_t b = low / block_size; b < num_blocks; ++b) {
        const int64_t block_start = b * block_size;
        const int64_t end = std::min(context, block_start + block_size);
        const cache_t* v_block = v_data + table[b] * block_stride + item.kv_head * head_dim;
        for (int64_t t0 = std::max(block_start, low); t0 < end; t0 += kVRows) {
          const int64_t count = std::min<int64_t>(kVRows, end - t0);
          for (int64_t j = 0; j < kVRows; ++j)
            prefetch_row(v_block + (t0 - block_start + kPrefetch + j) * token_stride, head_dim);
          const float* v[kVRows];
          for (int64_t j = 0; j < kVRows; ++j) {
            const int64_t t = t0 + std::min(j, count - 1);  // a short group repeats its last row
            v[j] = as_float(v_block + (t - block_start) * token_stride, &row[j * head_dim],
                            head_dim, v_table);
          }
          const int64_t first = std::max<int64_t>(0, t0 - prefix - item.row_begin) * group;
          for (int64_t m = first; m < m_count; ++m) {
            float p[kVRows];
            for (int64_t j = 0; j < kVRows; ++j)
              p[j] = j < count ? scores[(t0 + j - low) * m_count + m] : 0.f;
            float* a = &acc[m * head_dim];
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d)
              a[d] += p[0] * v[0][d] + p[1] * v[1][d] + p[2] * v[2][d] + p[3] * v[3][d];
          }
        }
      }
      for (int64_t m = 0; m < m_count; ++m) {
        const int64_t token = q_start + item.row_begin + m / group;
        const int64_t head = item.kv_head * group + m % group;
        scalar_t* dst = out_data + (token * num_heads + head) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<scalar_t>(acc[m * head_dim + d]);
      }
    }
  });
}

}  // namespace

namespace pagedserve {

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                           const at::Tensor& sequences, double scale, int64_t window,
                           double k_scale, double v_scale, at::Tensor out) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "query must be [T, H, D] and key_cache "
              "[blocks, block_size, H_kv, D]");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
              out.is_contiguous(), "query, key_cache, value_cache and out must be contiguous");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "key_cache and value_cache differ in shape");
  TORCH_CHECK(query.size(2) == key_cache.size(3), "head_dim of query (", query.size(2),
              ") and of key_cache (", key_cache.size(3), ") differ");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "num_heads=", query.size(1),
              " is not a multiple of num_kv_heads=", key_cache.size(2));
  const at::ScalarType cache_type = key_cache.scalar_type();
  const bool fp8 = cache_type == at::kFloat8_e4m3fn || cache_type == at::kFloat8_e5m2;
  TORCH_CHECK(query.scalar_type() == out.scalar_type() && cache_type == value_cache.scalar_type() &&
              (fp8 || cache_type == query.scalar_type()), "query and out must share a dtype, "
              "and key_cache and value_cache hold it too, or both one fp8 dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
              query_start_loc.scalar_type() == at::kInt && sequences.scalar_type() == at::kInt,
              "block_tables, seq_lens, query_start_loc and sequences must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous() &&
              query_start_loc.is_contiguous() && sequences.is_contiguous(),
              "the index tensors must be contiguous");
  TORCH_CHECK(query_start_loc.size(0) == seq_lens.size(0) + 1 &&
              block_tables.size(0) == seq_lens.size(0),
              "query_start_loc must have num_seqs + 1 entries and block_tables num_seqs rows");
  Fp8Table k_table, v_table;
  if (fp8) {
    k_table = fp8_table(cache_type, k_scale);
    v_table = fp8_table(cache_type, v_scale);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention",
                                  [&] {
    if (fp8) {
      attend<scalar_t, uint8_t>(query, key_cache, value_cache, block_tables, seq_lens,
                                query_start_loc, sequences, scale, window, &k_table, &v_table,
                                out);
    } else {
      attend<scalar_t, scalar_t>(query, key_cache, value_cache, block_tables, seq_lens,
                                 query_start_loc, sequences, scale, window, nullptr, nullptr,
                                 out);
    }
  });
  return out;
}

}  // namespace pagedserve
