// CPU kernels of the model runner's fast path (built and loaded by kernels/cpu.py, which also
// documents them; the tests compare each with its torch version).
//
//   paged_decode_attention  one query token per sequence; K/V read in place through the block table
//   prefill_attention       one chunk of one sequence against its keys, causal (and a sliding window)
//   rms_norm                HF RMSNorm, optionally fused with the residual add (residual updated in place)
//   silu_and_mul            gated MLP activation
//   rotary_store_kv         NeoX rotary of q and k in place, rotated k and v stored at their slots
//
// Element-wise kernels round where torch rounds (each op of HF's bf16 code stores a bf16), so in
// bf16 they give HF's values; float32 runs the same ops without rounding. Work is split with
// at::parallel_for, torch's own thread pool: no second OpenMP runtime.
// at::vec's Vectorized for this machine's widest ISA (-march=native defines the __AVX*__ macros;
// ATen's headers name the ISA CPU_CAPABILITY): 16 floats a vector with AVX-512, 8 with AVX2.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <sys/syscall.h>  // arch_prctl: AMX's tile state (cpu_prefill_bf16.h)
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kF = fVec::size();

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }  // round to nearest even (c10)

// x rounded to T's precision, kept as a float: what a torch op computing in T stores
template <typename T>
inline float round_to(float x) { return to_float(from_float<T>(x)); }

// kF elements of T as floats; kF floats stored as T (rounded); a float vector rounded to T
template <typename T>
inline fVec load_f(const T* p) {
  fVec v;
  at::vec::load_to_float<T>(p, v);
  return v;
}
template <>
inline fVec load_f<float>(const float* p) { return fVec::loadu(p); }
template <typename T>
inline void store_f(T* p, const fVec& v) { at::vec::convert_from_float<T>(v, v).store(p, kF); }
template <>
inline void store_f<float>(float* p, const fVec& v) { v.store(p); }
template <typename T>
inline fVec round_v(const fVec& v) { return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v))); }
template <>
inline fVec round_v<float>(const fVec& v) { return v; }
#if defined(CPU_CAPABILITY_AVX512)
// bf16 rounding as at::vec's conversion does it (nearest even; NaN -> 0xFFFF), kept in the fp32 bit
// layout: 7 instructions, where convert_from_float(v, v) + convert_to_float converts two vectors,
// packs, permutes and unpacks (the element-wise kernels round 2-6 times per element)
inline __m512i bf16_bits(const fVec& v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                                     _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  return _mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), r);
}
template <>
inline fVec round_v<c10::BFloat16>(const fVec& v) { return _mm512_castsi512_ps(bf16_bits(v)); }
template <>
inline void store_f<c10::BFloat16>(c10::BFloat16* p, const fVec& v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(v), 16)));
}
#endif

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kF <= n; i += kF) load_f(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  fVec acc(0.f);
  int64_t i = 0;
  for (; i + kF <= n; i += kF) acc = at::vec::fmadd(fVec::loadu(a + i), fVec::loadu(b + i), acc);
  float sum = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a x
  const fVec av(a);
  int64_t i = 0;
  for (; i + kF <= n; i += kF) at::vec::fmadd(av, fVec::loadu(x + i), fVec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

inline void softmax_inplace(float* s, int64_t n) {
  const float mx = at::vec::reduce_all<float>([](fVec& x, fVec& y) { return at::vec::maximum(x, y); }, s, n);
  at::vec::map([mx](fVec x) { return (x - fVec(mx)).exp_u20(); }, s, s, n);
  const float inv = 1.f / at::vec::reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, s, n);
  at::vec::map([inv](fVec x) { return x * fVec(inv); }, s, s, n);
}

// ---- paged decode attention ----------------------------------------------------------------------
// Into L2 (prefetcht2), not L1: a block's rows are 192-384 lines at once, and prefetcht0's L1 fill
// buffers stalled on them (half the decode attention's samples sat on the prefetches). A decode step
// at batch 64 x 236 tokens, 30 layers of distinct pools, one core: fp32 86-89 -> 70-72 ms, bf16
// 57-61 -> 45-48 ms (docs/benchmarks.md, issue 19's fp32 section)
template <typename T>
inline void prefetch_rows(const T* first_row, int64_t rows, int64_t stride, int64_t D) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(first_row + r * stride) + off, 0, 1);
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kBlock16 = true;
// v[16] -> one vector whose lane t is the sum of v[t]'s lanes (a transpose-and-add tree: 45 ops
// for 16 dot products instead of a horizontal sum each)
inline __m512 reduce16(const __m512* v) {
  __m512 u[8], w[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of 4 vectors
    const __m512d x = _mm512_castps_pd(u[2 * i]), y = _mm512_castps_pd(u[2 * i + 1]);
    w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes paired across vectors
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// scores of G query heads (qf [G, D] fp32, pre-scaled) against 16 consecutive K rows (row stride
// `stride`), written to out[g * out_stride + 0..15]; `tile` holds the rows as fp32 [16, D] (fp32
// rows are read where they are)
template <typename T>
inline void scores16(const float* qf, int64_t G, int64_t D, const T* k, int64_t stride, float* tile, float* out,
                     int64_t out_stride) {
  const float* rows = tile;
  int64_t rs = D;
  if constexpr (std::is_same_v<T, float>) {
    rows = k, rs = stride;
  } else {
    for (int r = 0; r < 16; ++r) load_row(k + r * stride, tile + r * D, D);
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 qv = _mm512_loadu_ps(qf + g * D + d);
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows + r * rs + d), acc[r]);
    }
    _mm512_storeu_ps(out + g * out_stride, reduce16(acc));
  }
}
#else
constexpr bool kBlock16 = false;
template <typename T>
inline void scores16(const float*, int64_t, int64_t, const T*, int64_t, float*, float*, int64_t) {}
#endif

#include "cpu_decode_tiles.h"  // scores16_bf16, pv16r: 16-token steps in registers (pv16r: the prefill's P V too)

// q [B, H, D] (rows may be strided, d contiguous), caches [NB, BS, KVH, D] contiguous,
// block_table [B, M] int64, context_lens [B] int64 -> out [B, H, D] contiguous.
// Each K and V row is converted to fp32 once and used by the G query heads of its KV head; the
// scores of an item's query heads live in a per-thread buffer.
template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_table, const at::Tensor& context_lens, at::Tensor& out,
                      double scale, int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH, M = block_table.size(1);
  const int64_t q_sb = q.stride(0), q_sh = q.stride(1);
  const int64_t c_sb = k_cache.stride(0), c_st = k_cache.stride(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
  // 16 tokens at a time inside a block (AVX-512, D and BS multiples of 16), else token by token
  const bool by16 = kBlock16 && D % 16 == 0 && BS % 16 == 0;
  const PV16R<T> pv = BS % 16 == 0 ? pv16r_for<T>(D) : nullptr;
  Scores16Bf16 dot16 = nullptr;  // bf16 K rows dotted as they are (AVX512-BF16), cpu_decode_tiles.h
  if constexpr (std::is_same_v<T, c10::BFloat16>) dot16 = by16 && kDotBf16 ? scores16_bf16_for(D) : nullptr;
  // A work item is one sequence and a range of its KV heads: all of them when there are enough
  // sequences for the threads (a block's rows are then read front to back, one stream), else one
  // head each (a lone sequence still spreads over the threads).
  const int64_t heads_per_item = B >= 4 * at::get_num_threads() ? KVH : 1;
  const int64_t items_per_seq = KVH / heads_per_item, HG = heads_per_item * G;  // query heads per item
  const int64_t row_span = heads_per_item * D;  // elements of one token's rows an item reads
  at::parallel_for(0, B * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(HG * D), acc(HG * D), row(row_span), tile(16 * D), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / items_per_seq, kh0 = (item % items_per_seq) * heads_per_item;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      std::fill(acc.begin(), acc.end(), 0.f);
      if (n > 0) {
        scores.resize(HG * n);  // [query head of the item, token]
        for (int64_t h = 0; h < HG; ++h) {
          const T* src = qp + b * q_sb + (kh0 * G + h) * q_sh;
          int64_t d = 0;  // vectors, then the scalar tail: the same products
          for (; d + kF <= D; d += kF) (load_f(src + d) * fVec(sc)).store(qf.data() + h * D + d);
          for (; d < D; ++d) qf[h * D + d] = to_float(src[d]) * sc;
        }
        const int64_t* blocks = table + b * M;
        const int64_t head_off = kh0 * D;
        for (int64_t j = first / BS; j <= std::min((len - 1) / BS, first / BS + 1); ++j)
          prefetch_rows(kp + blocks[j] * c_sb + head_off, BS, c_st, row_span);
        for (int64_t t = first; t < len;) {
          const T* k_row = kp + blocks[t / BS] * c_sb + (t % BS) * c_st + head_off;
          if (t % BS == 0) {  // K two blocks ahead and this block's V, while this block is computed
            if (t + 2 * BS < len) prefetch_rows(kp + blocks[t / BS + 2] * c_sb + head_off, BS, c_st, row_span);
            prefetch_rows(vp + blocks[t / BS] * c_sb + head_off, BS, c_st, row_span);
          }
          if (by16 && t % 16 == 0 && t + 16 <= len) {
            for (int64_t kh = 0; kh < heads_per_item; ++kh) {
              if constexpr (std::is_same_v<T, c10::BFloat16>) {
                if (dot16 != nullptr) {
                  dot16(qp + b * q_sb + (kh0 + kh) * G * q_sh, q_sh, G, k_row + kh * D, c_st, sc,
                        scores.data() + kh * G * n + (t - first), n);
                  continue;
                }
              }
              scores16(qf.data() + kh * G * D, G, D, k_row + kh * D, c_st, tile.data(),
                       scores.data() + kh * G * n + (t - first), n);
            }
            t += 16;
            continue;
          }
          load_row(k_row, row.data(), row_span);
          for (int64_t h = 0; h < HG; ++h)
            scores[h * n + (t - first)] = dot(qf.data() + h * D, row.data() + (h / G) * D, D);
          ++t;
        }
        for (int64_t h = 0; h < HG; ++h) softmax_inplace(scores.data() + h * n, n);
        // The V pass reads blocks the K pass prefetched, so the memory would idle through it: it
        // prefetches the next item's K blocks instead, one per V block (fp32 -10%, bf16 -25% more)
        const int64_t* next_blocks = nullptr;
        int64_t next_j0 = 0, next_j1 = -1, next_off = 0;  // the next item's K blocks [j0, j1], its heads
        if (item + 1 < end && lens[(item + 1) / items_per_seq] > 0) {
          const int64_t nb = (item + 1) / items_per_seq, nlen = lens[nb];
          next_blocks = table + nb * M;
          next_j0 = (window > 0 ? std::max<int64_t>(0, nlen - window) : 0) / BS;
          next_j1 = (nlen - 1) / BS;
          next_off = ((item + 1) % items_per_seq) * heads_per_item * D;
        }
        for (int64_t t = first; t < len;) {
          const T* v_row = vp + blocks[t / BS] * c_sb + (t % BS) * c_st + head_off;
          if (t % BS == 0 && next_blocks != nullptr) {
            const int64_t nj = next_j0 + t / BS - first / BS;
            if (nj <= next_j1) prefetch_rows(kp + next_blocks[nj] * c_sb + next_off, BS, c_st, row_span);
          }
          if (pv != nullptr && t % 16 == 0 && t + 16 <= len) {
            for (int64_t kh = 0; kh < heads_per_item; ++kh)
              pv(scores.data() + kh * G * n + (t - first), n, G, v_row + kh * D, c_st, acc.data() + kh * G * D);
            t += 16;
            continue;
          }
          load_row(v_row, row.data(), row_span);
          for (int64_t h = 0; h < HG; ++h)
            axpy(acc.data() + h * D, scores[h * n + (t - first)], row.data() + (h / G) * D, D);
          ++t;
        }
      }
      for (int64_t h = 0; h < HG; ++h) {
        T* dst = op + (b * H + kh0 * G + h) * D;
        int64_t d = 0;
        for (; d + kF <= D; d += kF) store_f(dst + d, fVec::loadu(acc.data() + h * D + d));
        for (; d < D; ++d) dst[d] = from_float<T>(acc[h * D + d]);
      }
    }
  });
}

// ---- prefill attention ---------------------------------------------------------------------------
#include "cpu_prefill_attention.h"  // prefill_attention<T>: uses the helpers and tiles above

// ---- RMSNorm (+ residual) -------------------------------------------------------------------------
// x [T, N] (rows may be strided), weight [N], residual [T, N] contiguous or undefined -> out [T, N].
// HF: r = x + residual (in T; written back to residual), h = float(r) * rsqrt(mean(h^2) + eps),
// out = weight * T(h) (in T).
template <typename T>
void rms_norm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& residual,
              at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), N = x.size(1), x_s = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* rp = residual.has_value() ? residual->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(N);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * x_s;
      int64_t i = 0;
      if (rp != nullptr) {
        T* rr = rp + r * N;
        for (; i + kF <= N; i += kF) {
          const fVec sum = round_v<T>(load_f(xr + i) + load_f(rr + i));
          store_f(rr + i, sum);
          sum.store(h.data() + i);
        }
        for (; i < N; ++i) {
          const T sum = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
          rr[i] = sum;
          h[i] = to_float(sum);
        }
      } else {
        load_row(xr, h.data(), N);
      }
      const float ss = dot(h.data(), h.data(), N);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(N) + e);
      T* orow = op + r * N;
      const fVec iv(inv);
      for (i = 0; i + kF <= N; i += kF) store_f(orow + i, load_f(wp + i) * round_v<T>(fVec::loadu(h.data() + i) * iv));
      for (; i < N; ++i) orow[i] = from_float<T>(to_float(wp[i]) * round_to<T>(h[i] * inv));
    }
  });
}

// ---- SiLU-and-mul ---------------------------------------------------------------------------------
// x [T, 2I] contiguous -> out [T, I]: T(silu(gate)) * up, rounded as torch's two ops round.
template <typename T>
void silu_and_mul(const at::Tensor& x, at::Tensor& out) {
  const int64_t rows = x.size(0), I = x.size(1) / 2;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    const fVec one(1.f);
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = xp + r * 2 * I;
      const T* up = gate + I;
      T* o = op + r * I;
      int64_t i = 0;
      for (; i + kF <= I; i += kF) {  // torch's silu: x / (1 + exp(-x)), stored in T, times up
        const fVec g = load_f(gate + i);
        store_f(o + i, round_v<T>(g / (one + g.neg().exp())) * load_f(up + i));
      }
      for (; i < I; ++i) {
        const float g = to_float(gate[i]);
        o[i] = from_float<T>(round_to<T>(g / (1.f + std::exp(-g))) * to_float(up[i]));
      }
    }
  });
}

// ---- rotary + KV store ----------------------------------------------------------------------------
// q [T, H, D], k/v [T, KVH, D] (token rows may be strided, heads D apart), positions [T] int64,
// cos_sin [P, D] fp32 (cos ++ sin of the D/2 frequencies), caches [NB, BS, KVH, D] contiguous,
// slots [T] int64 (< 0: not stored). q and k are rotated in place with HF's bf16 roundings:
// (x1 c - x2 s, x2 c + x1 s) with c, s rounded to T and every product and sum rounded to T.
template <typename T>
void rotary_store_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     const at::Tensor& cos_sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots) {
  const int64_t tokens = q.size(0), H = q.size(1), KVH = k.size(1), D = q.size(2), half = D / 2;
  const int64_t q_s = q.stride(0), k_s = k.stride(0), v_s = v.stride(0), cs_s = cos_sin.stride(0);
  const int64_t slot_s = KVH * D;
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const float* cs = cos_sin.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> c(half), s(half);
    auto rotate = [&](T* x) {
      int64_t j = 0;
      for (; j + kF <= half; j += kF) {  // the scalar loop's roundings, kF pairs at a time
        const fVec x1 = load_f(x + j), x2 = load_f(x + j + half);
        const fVec cj = fVec::loadu(c.data() + j), sj = fVec::loadu(s.data() + j);
        store_f(x + j, round_v<T>(round_v<T>(x1 * cj) - round_v<T>(x2 * sj)));
        store_f(x + j + half, round_v<T>(round_v<T>(x2 * cj) + round_v<T>(x1 * sj)));
      }
      for (; j < half; ++j) {
        const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
        const float o1 = round_to<T>(round_to<T>(x1 * c[j]) - round_to<T>(x2 * s[j]));
        const float o2 = round_to<T>(round_to<T>(x2 * c[j]) + round_to<T>(x1 * s[j]));
        x[j] = from_float<T>(o1);
        x[j + half] = from_float<T>(o2);
      }
    };
    for (int64_t t = begin; t < end; ++t) {
      const float* row = cs + pos[t] * cs_s;
      for (int64_t j = 0; j < half; ++j) {
        c[j] = round_to<T>(row[j]);
        s[j] = round_to<T>(row[half + j]);
      }
      for (int64_t h = 0; h < H; ++h) rotate(qp + t * q_s + h * D);
      for (int64_t h = 0; h < KVH; ++h) rotate(kp + t * k_s + h * D);
      if (sl[t] >= 0) {
        for (int64_t h = 0; h < KVH; ++h) {
          std::memcpy(kc + sl[t] * slot_s + h * D, kp + t * k_s + h * D, D * sizeof(T));
          std::memcpy(vc + sl[t] * slot_s + h * D, vp + t * v_s + h * D, D * sizeof(T));
        }
      }
    }
  });
}

// ---- small-batch bf16 linear ----------------------------------------------------------------------
// y [M, N] = x [M, K] W^T (+ bias) for M <= 4 rows, W [N, K] bf16 row-major (nn.Linear's layout),
// K a multiple of 32: each W row is read once for the M rows, 16 / M rows of W at a time with M x
// (16 / M) fp32 accumulators of vdpbf16ps (the products exact, summed in fp32), reduced 16 at a
// time by reduce16; the sum (plus the bias, in fp32) rounded to bf16 once, as oneDNN rounds its
// output. Memory-bound: one pass over W.
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
template <int M>
void gemv_bf16_rows(const c10::BFloat16* x, int64_t x_s, const c10::BFloat16* w, int64_t K, int64_t N,
                    const c10::BFloat16* bias, c10::BFloat16* y) {
  constexpr int R = 16 / M;  // W rows per block
  at::parallel_for(0, (N + R - 1) / R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * R, nr = std::min<int64_t>(R, N - n0);
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        __m512bh xv[M];
        for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * x_s + k);
        for (int r = 0; r < R; ++r) {
          if (r >= nr) break;
          const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * K + k);
          for (int m = 0; m < M; ++m) acc[m * R + r] = _mm512_dpbf16_ps(acc[m * R + r], xv[m], wv);
        }
      }
      alignas(64) float sums[16];
      _mm512_store_ps(sums, reduce16(acc));  // lane m * R + r: row m, output n0 + r
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < nr; ++r) {
          float v = sums[m * R + r];
          if (bias != nullptr) v += static_cast<float>(bias[n0 + r]);
          y[m * N + n0 + r] = c10::BFloat16(v);
        }
    }
  });
}
constexpr bool kGemvBf16 = true;
#elif defined(CPU_CAPABILITY_AVX2)
// AVX2 without any bf16 instruction: a bf16 is the upper half of an fp32, so 16 W values loaded as
// 8 32-bit lanes give the 8 odd ones as fp32 by masking the low halves and the 8 even ones by a
// shift, both exact; x is widened to fp32 once per call, each 16 of it stored as its 8 even then
// 8 odd values to match. W rows go 4 / M at a time (2 x M x (4 / M) accumulators of 8 lanes and
// 2 x M x vectors stay in the 16 registers), each output's lanes summed once at the end. oneDNN
// packs no bf16 weights without AVX-512 (nor does F.linear have a fast bf16 kernel there), so on
// such a CPU this is the only one-pass bf16 read of W; common/models/cpu_ops.py uses it for the
// rows it takes.
template <int M>
void gemv_bf16_rows(const c10::BFloat16* x, int64_t x_s, const c10::BFloat16* w, int64_t K, int64_t N,
                    const c10::BFloat16* bias, c10::BFloat16* y) {
  constexpr int R = M == 1 ? 4 : M == 2 ? 2 : 1;  // W rows per block
  std::vector<float> xf(M * K);  // per 16 inputs: the 8 even ones, then the 8 odd ones
  for (int m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      xf[m * K + (k & ~int64_t(15)) + (k & 1) * 8 + (k & 15) / 2] = static_cast<float>(x[m * x_s + k]);
  const float* xp = xf.data();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  at::parallel_for(0, (N + R - 1) / R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * R, nr = std::min<int64_t>(R, N - n0);
      __m256 even[M * R], odd[M * R];
      for (int i = 0; i < M * R; ++i) even[i] = odd[i] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        __m256 xe[M], xo[M];
        for (int m = 0; m < M; ++m) {
          xe[m] = _mm256_loadu_ps(xp + m * K + k);
          xo[m] = _mm256_loadu_ps(xp + m * K + k + 8);
        }
        for (int r = 0; r < R; ++r) {
          if (r >= nr) break;
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + r) * K + k));
          const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
          const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
          for (int m = 0; m < M; ++m) {
            even[m * R + r] = _mm256_fmadd_ps(xe[m], we, even[m * R + r]);
            odd[m * R + r] = _mm256_fmadd_ps(xo[m], wo, odd[m * R + r]);
          }
        }
      }
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < nr; ++r) {
          float v = at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; },
                                                   fVec(_mm256_add_ps(even[m * R + r], odd[m * R + r])));
          if (bias != nullptr) v += static_cast<float>(bias[n0 + r]);
          y[m * N + n0 + r] = c10::BFloat16(v);
        }
    }
  });
}
constexpr bool kGemvBf16 = true;
#else
template <int M>
void gemv_bf16_rows(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*,
                    c10::BFloat16*) {}
constexpr bool kGemvBf16 = false;
#endif

at::Tensor gemv_bf16_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(kGemvBf16, "gemv_bf16: built without AVX512-BF16 or AVX2");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4 && x.stride(1) == 1, "gemv_bf16: x [M <= 4, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) && x.size(1) % 32 == 0,
              "gemv_bf16: w [N, K] contiguous, K a multiple of 32");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const c10::BFloat16* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == at::kBFloat16, "gemv_bf16: bias [N]");
    b = bias->data_ptr<c10::BFloat16>();
  }
  auto y = at::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  switch (M) {
    case 1: gemv_bf16_rows<1>(xp, x.stride(0), wp, K, N, b, yp); break;
    case 2: gemv_bf16_rows<2>(xp, x.stride(0), wp, K, N, b, yp); break;
    case 3: gemv_bf16_rows<3>(xp, x.stride(0), wp, K, N, b, yp); break;
    default: gemv_bf16_rows<4>(xp, x.stride(0), wp, K, N, b, yp); break;
  }
  return y;
}

// ---- dispatch -------------------------------------------------------------------------------------
#define PDSERVE_DISPATCH(dtype, NAME, ...)                                   \
  switch (dtype) {                                                           \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }          \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__; break; } \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__; break; }       \
    default: TORCH_CHECK(false, NAME ": unsupported dtype ", dtype);          \
  }

at::Tensor paged_decode_attention_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_table, const at::Tensor& context_lens, double scale,
                                     int64_t window) {
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  PDSERVE_DISPATCH(q.scalar_type(), "paged_decode_attention",
                   decode_attention<scalar_t>(q, k_cache, v_cache, block_table, context_lens, out, scale, window));
  return out;
}

at::Tensor prefill_attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                int64_t window) {
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  PDSERVE_DISPATCH(q.scalar_type(), "prefill_attention", prefill_attention<scalar_t>(q, k, v, out, scale, window));
  return out;
}

at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& residual,
                       double eps) {
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  PDSERVE_DISPATCH(x.scalar_type(), "rms_norm", rms_norm<scalar_t>(x, weight, residual, out, eps));
  return out;
}

at::Tensor silu_and_mul_op(const at::Tensor& x) {
  auto out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  PDSERVE_DISPATCH(x.scalar_type(), "silu_and_mul", silu_and_mul<scalar_t>(x, out));
  return out;
}

void rotary_store_kv_op(at::Tensor q, at::Tensor k, const at::Tensor& v, const at::Tensor& positions,
                        const at::Tensor& cos_sin, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots) {
  PDSERVE_DISPATCH(q.scalar_type(), "rotary_store_kv",
                   rotary_store_kv<scalar_t>(q, k, v, positions, cos_sin, k_cache, v_cache, slots));
}

// whether the bf16 prompt attention may take AMX tiles; returns whether it now does (built with
// them, this CPU and Linux granting them, and allowed)
bool set_amx_op(bool allowed) {
  amx_allowed() = allowed;
  return amx_usable();
}

}  // namespace

TORCH_LIBRARY(pdserve_cpu, m) {
  m.def("set_amx(bool allowed) -> bool", &set_amx_op);
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor context_lens, float scale, int window) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, float scale, int window) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, Tensor(a!)? residual, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_store_kv(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor positions, Tensor cos_sin, "
        "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_op);
  m.impl("prefill_attention", &prefill_attention_op);
  m.impl("rms_norm", &rms_norm_op);
  m.impl("silu_and_mul", &silu_and_mul_op);
  m.impl("rotary_store_kv", &rotary_store_kv_op);
  m.impl("gemv_bf16", &gemv_bf16_op);
}
