// Prefill attention of the CPU kernels: textually included by cpu_ops.cpp inside its anonymous
// namespace, after its helpers (load_f, round_to, ...) and the decode attention's tiles (pv16r_for,
// kBlock16), which it uses; kernels/cpu.py hashes both files into the build's name.

#if defined(CPU_CAPABILITY_AVX512)
// r[16] rows of 16 floats -> c[16] columns (c[i] lane j = r[j] lane i): pairs, quads, then 128-bit lanes
inline void transpose16(const __m512* r, __m512* c) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane L: [r0[4L], r1[4L], r0[4L+1], r1[4L+1]] and the next two
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + m] lane L: rows 4i..4i+3 of column 4L + m
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d e = _mm512_castps_pd(t[4 * i + 1]), f = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(e, f));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(e, f));
  }
  for (int m = 0; m < 4; ++m) {  // column 4L + m gathers lane L of u[m], u[4 + m], u[8 + m], u[12 + m]
    const __m512 v = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88), w = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
    c[m] = _mm512_shuffle_f32x4(v, v2, 0x88);
    c[4 + m] = _mm512_shuffle_f32x4(w, w2, 0x88);
    c[8 + m] = _mm512_shuffle_f32x4(v, v2, 0xDD);
    c[12 + m] = _mm512_shuffle_f32x4(w, w2, 0xDD);
  }
}

// scores16 for many query vectors (a prompt's): the 16 K rows are transposed once into `tile`
// [D, 16] (key t in lane t), then each vector's scores are D broadcast FMAs with no horizontal sum;
// four vectors at a time, two accumulators each (even and odd d), keep eight FMA chains in flight
template <typename T>
inline void scores16t(const float* qf, int64_t NV, int64_t D, const T* k, int64_t stride, float* tile, float* out,
                      int64_t out_stride) {
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    __m512 r[16], c[16];
    for (int i = 0; i < 16; ++i) r[i] = load_f(k + i * stride + d0);
    transpose16(r, c);
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(tile + (d0 + i) * 16, c[i]);
  }
  int64_t j = 0;
  for (; j + 4 <= NV; j += 4) {
    __m512 a[4], b[4];
    for (int i = 0; i < 4; ++i) a[i] = b[i] = _mm512_setzero_ps();
    const float* q0 = qf + j * D;
    for (int64_t d = 0; d < D; d += 2) {
      const __m512 k0 = _mm512_loadu_ps(tile + d * 16), k1 = _mm512_loadu_ps(tile + (d + 1) * 16);
      for (int i = 0; i < 4; ++i) {
        a[i] = _mm512_fmadd_ps(_mm512_set1_ps(q0[i * D + d]), k0, a[i]);
        b[i] = _mm512_fmadd_ps(_mm512_set1_ps(q0[i * D + d + 1]), k1, b[i]);
      }
    }
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + (j + i) * out_stride, _mm512_add_ps(a[i], b[i]));
  }
  for (; j < NV; ++j) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 2) {
      a = _mm512_fmadd_ps(_mm512_set1_ps(qf[j * D + d]), _mm512_loadu_ps(tile + d * 16), a);
      b = _mm512_fmadd_ps(_mm512_set1_ps(qf[j * D + d + 1]), _mm512_loadu_ps(tile + (d + 1) * 16), b);
    }
    _mm512_storeu_ps(out + j * out_stride, _mm512_add_ps(a, b));
  }
}

#else
template <typename T>
inline void scores16t(const float*, int64_t, int64_t, const T*, int64_t, float*, float*, int64_t) {}
#endif

// One chunk of one sequence: q [Lq, H, D], k/v [Lk, KVH, D] (token rows strided, heads D apart, d
// contiguous), query row i at position Lk - Lq + i among the keys; causal, `window` > 0 a sliding
// window -> out [Lq, H, D] contiguous. A work item is one KV head and a block of QB query rows: its
// QB * G query vectors are scored against every key a row of the block sees (each K row converted
// to fp32 once for all of them), each vector's softmax runs over its own visible range (the rest
// of its row zeroed), then P V reads each V row once. Items are handed out in zigzag order (block
// 0, last, 1, last - 1, ...) so that the contiguous ranges of at::parallel_for get equal causal work.
//
// Numerics are those of torch's flash SDPA on CPU (the path this replaces, and HF's): scores scaled
// after the dot product; per split of kKvSplit keys (absolute positions, as torch splits the keys)
// a running max, exp_u20 over the split's vector part and std::exp over its last (width % kF) keys,
// the exps summed unrounded in torch's lane order, the weights rounded to T (bf16) BEFORE P V, and
// the output divided by the sum at the end. A softmax normalised in fp32 is more exact, but it moves
// the bf16 model off HF's numbers: on a near tie (SmolLM2's chat answer, logits 1 bf16 step apart)
// the greedy token changed.
constexpr int64_t kKvSplit = 512;

// s[0 .. p + 1 - lo) holds the raw scores q.k of keys lo .. p; the row sees keys [first, p] and the
// sequence has Lk keys. On return s holds the weights (0 outside [first, p]); returns their sum.
// `rescale` has room for one float per split of the row (scratch: each later split's factor for the
// weights before it, applied to them at the end). The bf16 kernels keep those factors for their
// accumulators instead (softmax_row_bf16, cpu_prefill_bf16.h: the same numbers otherwise).
template <typename T>
float flash_softmax_row(float* s, int64_t lo, int64_t first, int64_t p, int64_t Lk, float scale, float* rescale) {
  std::fill(s, s + (first - lo), 0.f);
  float max = -std::numeric_limits<float>::infinity(), sum = 0.f;
  int64_t splits = 0;  // rescale[i]: exp(old max - new max) at split i + 1, for the earlier weights
  const int64_t s0 = first / kKvSplit * kKvSplit;
  for (int64_t b0 = s0; b0 <= p; b0 += kKvSplit) {
    const int64_t vs = std::max(first, b0), ve = std::min(p + 1, b0 + kKvSplit);  // visible keys of the split
    const int64_t tail = b0 + std::min(kKvSplit, Lk - b0) / kF * kF;  // torch's scalar tail starts here
    float* x = s + (vs - lo);
    const int64_t len = ve - vs;
    at::vec::map([scale](fVec a) { return a * fVec(scale); }, x, x, len);
    const float m = std::max(max, at::vec::reduce_all<float>(
                                      [](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, x, len));
    const int64_t nv = std::max<int64_t>(0, std::min(ve, tail) - vs);
    at::vec::map([m](fVec a) { return (a - fVec(m)).exp_u20(); }, x, x, nv);
    for (int64_t t = std::max(vs, tail); t < ve; ++t) s[t - lo] = std::exp(s[t - lo] - m);
    fVec lanes(0.f);  // lane i sums keys b0 + i (mod kF), like torch's vector accumulator
    for (int64_t c = b0; c < std::min(ve, tail); c += kF) {
      if (c + kF <= vs) continue;
      if (c >= vs && c + kF <= ve) {
        lanes += fVec::loadu(s + (c - lo));
      } else {
        float part[kF] = {};
        for (int64_t t = std::max(c, vs); t < std::min(c + kF, ve); ++t) part[t - c] = s[t - lo];
        lanes += fVec::loadu(part);
      }
    }
    float split_sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, lanes);
    for (int64_t t = std::max(vs, tail); t < ve; ++t) split_sum += s[t - lo];
    const float r = std::exp(max - m);
    sum = split_sum + r * sum;
    max = m;
    if (splits > 0) rescale[splits - 1] = r;
    int64_t t = vs;  // torch's P is stored in T
    for (; t + kF <= ve; t += kF) round_v<T>(fVec::loadu(s + (t - lo))).store(s + (t - lo));
    for (; t < ve; ++t) s[t - lo] = round_to<T>(s[t - lo]);
    ++splits;
  }
  float factor = 1.f;  // torch rescales its accumulator by each later split's r; here the weights
  for (int64_t i = splits - 2; i >= 0; --i) {
    factor *= rescale[i];
    const int64_t b0 = s0 + i * kKvSplit, vs = std::max(first, b0), ve = std::min(p + 1, b0 + kKvSplit);
    for (int64_t t = vs; t < ve; ++t) s[t - lo] *= factor;
  }
  return sum;
}

#include "cpu_prefill_bf16.h"  // prefill_bf16_for: the bf16 kernel on AVX512-BF16 (vdpbf16ps)

template <typename T>
void prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       double scale, int64_t window) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (const PrefillBf16 dot_bf16 = prefill_bf16_for(q.size(2))) {
      dot_bf16(q, k, v, out, scale, window);
      return;
    }
  }
  constexpr int64_t QB = 16;
  const int64_t Lq = q.size(0), H = q.size(1), D = q.size(2), Lk = k.size(0), KVH = k.size(1), G = H / KVH;
  const int64_t q_s = q.stride(0), k_s = k.stride(0), v_s = v.stride(0), offset = Lk - Lq;
  const int64_t num_blocks = (Lq + QB - 1) / QB;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
  const bool by16 = kBlock16 && D % 16 == 0;
  const PV16R<T> pv = pv16r_for<T>(D);
  at::parallel_for(0, num_blocks * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(QB * G * D), acc(QB * G * D), row(D), tile(16 * D), inv(QB * G), scores;
    std::vector<float> rescale(Lk / kKvSplit + 1);
    std::vector<T> kpad(16 * D);  // a last group of fewer than 16 keys, zero-padded
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kh = item % KVH, z = item / KVH;
      const int64_t blk = z % 2 == 0 ? z / 2 : num_blocks - 1 - z / 2;
      const int64_t r0 = blk * QB, nr = std::min(Lq, r0 + QB) - r0, NV = nr * G;  // vector j: row r0 + j / G
      const int64_t hi = offset + r0 + nr;  // keys [lo, hi) are seen by some row of the block
      const int64_t lo = window > 0 ? std::max<int64_t>(0, offset + r0 - window + 1) : 0;
      const int64_t n = hi - lo, ns = by16 ? (n + 15) / 16 * 16 : n;  // ns: a row's stride in `scores`
      scores.resize(NV * ns);
      for (int64_t j = 0; j < NV; ++j) {
        const T* src = qp + (r0 + j / G) * q_s + (kh * G + j % G) * D;
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = to_float(src[d]);
      }
      // every key in a 16-key step (the last one zero-padded): a key's score must not depend on
      // where the block's keys end, or a prompt's rows would differ fresh and after a cached prefix
      for (int64_t t = lo; t < hi;) {
        const T* k_row = kp + t * k_s + kh * D;
        if (by16) {
          if (t + 16 <= hi) {
            scores16t(qf.data(), NV, D, k_row, k_s, tile.data(), scores.data() + (t - lo), ns);
          } else {
            std::fill(kpad.begin(), kpad.end(), T(0.f));
            for (int64_t i = 0; i < hi - t; ++i) std::copy(k_row + i * k_s, k_row + i * k_s + D, kpad.data() + i * D);
            scores16t(qf.data(), NV, D, kpad.data(), D, tile.data(), scores.data() + (t - lo), ns);
          }
          t += 16;
          continue;
        }
        load_row(k_row, row.data(), D);
        for (int64_t j = 0; j < NV; ++j) scores[j * ns + (t - lo)] = dot(qf.data() + j * D, row.data(), D);
        ++t;
      }
      for (int64_t j = 0; j < NV; ++j) {  // the row at position p sees keys [first, p]
        const int64_t p = offset + r0 + j / G, first = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        float* s = scores.data() + j * ns;
        std::fill(s + (p + 1 - lo), s + ns, 0.f);
        inv[j] = 1.f / flash_softmax_row<T>(s, lo, first, p, Lk, sc, rescale.data());
      }
      std::fill(acc.begin(), acc.begin() + NV * D, 0.f);
      for (int64_t t = lo; t < hi;) {
        const T* v_row = vp + t * v_s + kh * D;
        if (pv != nullptr && t + 16 <= hi) {  // fmadd in key order, as axpy: the same sums
          pv(scores.data() + (t - lo), ns, NV, v_row, v_s, acc.data());
          t += 16;
          continue;
        }
        load_row(v_row, row.data(), D);
        for (int64_t j = 0; j < NV; ++j) axpy(acc.data() + j * D, scores[j * ns + (t - lo)], row.data(), D);
        ++t;
      }
      for (int64_t j = 0; j < NV; ++j) {
        T* dst = op + ((r0 + j / G) * H + kh * G + j % G) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(acc[j * D + d] * inv[j]);
      }
    }
  });
}
