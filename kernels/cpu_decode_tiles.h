// The paged decode attention's 16-token steps that keep each K/V row in registers: textually
// included by cpu_ops.cpp inside its anonymous namespace, after reduce16 and load_f (which they
// use); kernels/cpu.py hashes this file into the build's name.
//
//   scores16_bf16  bf16 K rows dotted with the bf16 query by vdpbf16ps (AVX512-BF16): the pairs'
//                  products are exact in fp32 and summed in fp32, so no row is converted at all;
//                  the scale multiplies the 16 scores once. The fp32 path (scores16) converts the
//                  rows into a tile and dots them with the pre-scaled fp32 query: the two sum the
//                  same exact products in another order (differences of fp32 rounding).
//   pv16r          acc[g] += p[g, r] * V row r over 16 rows, each row converted to fp32 once in
//                  registers for up to 16 / NV heads (query vectors) at a time, 4 NV accumulator
//                  chains in flight; also the prefill attention's P V (fp32, and bf16 without
//                  AVX512-BF16): one vector a pass there (pv16, removed) left its FMAs waiting on
//                  4 chains, 37 % of the fp32 kernel's time against 22 % for Q K^T.
//
// A decode step at batch 64 (SmolLM2: 9 heads, 3 KV heads, D 64, ~230 tokens) spent ~1/3 of its
// time in the attention, most of it converting rows through the tile (docs/benchmarks.md).

// scores16_bf16's signature (scores16_bf16_for returns nullptr where the instructions are missing)
using Scores16Bf16 = void (*)(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t, float, float*,
                              int64_t);

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
constexpr bool kDotBf16 = true;

// scores of G query heads (q: bf16, head h at q + h * q_stride, unscaled) against 16 consecutive
// bf16 K rows (row stride `stride`), D = 32 * ND, times scale -> out[g * out_stride + 0..15]
template <int ND>
void scores16_bf16(const c10::BFloat16* q, int64_t q_stride, int64_t G, const c10::BFloat16* k, int64_t stride,
                   float scale, float* out, int64_t out_stride) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < G; ++g) {
    __m512bh qv[ND];
    for (int i = 0; i < ND; ++i) qv[i] = (__m512bh)_mm512_loadu_si512(q + g * q_stride + 32 * i);
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) {
      acc[r] = _mm512_setzero_ps();
      for (int i = 0; i < ND; ++i)
        acc[r] = _mm512_dpbf16_ps(acc[r], qv[i], (__m512bh)_mm512_loadu_si512(k + r * stride + 32 * i));
    }
    _mm512_storeu_ps(out + g * out_stride, _mm512_mul_ps(reduce16(acc), sc));
  }
}

inline Scores16Bf16 scores16_bf16_for(int64_t D) {
  switch (D) {
    case 32: return &scores16_bf16<1>;
    case 64: return &scores16_bf16<2>;
    case 128: return &scores16_bf16<4>;
    default: return nullptr;
  }
}
#else
constexpr bool kDotBf16 = false;
inline Scores16Bf16 scores16_bf16_for(int64_t) { return nullptr; }
#endif

template <typename T>
using PV16R = void (*)(const float*, int64_t, int64_t, const T*, int64_t, float*);

#if defined(CPU_CAPABILITY_AVX512)
// acc[g * D + :] += sum over 16 V rows (row stride `stride`) of p[g * p_stride + r] * row r, G heads,
// D = 16 * NV. The heads go in groups of 16 / NV, whose accumulators stay in registers (16 of the
// 32) with the row's NV vectors.
template <typename T, int NV>
void pv16r(const float* p, int64_t p_stride, int64_t G, const T* v, int64_t stride, float* acc) {
  constexpr int64_t D = 16 * NV;
  constexpr int GC = 16 / NV;
  for (int64_t g0 = 0; g0 < G; g0 += GC) {
    const int gc = static_cast<int>(std::min<int64_t>(GC, G - g0));
    float* ag = acc + g0 * D;
    const float* pg = p + g0 * p_stride;
    __m512 a[GC][NV];
#pragma GCC unroll 16
    for (int g = 0; g < GC; ++g)
      if (g < gc)
        for (int i = 0; i < NV; ++i) a[g][i] = _mm512_loadu_ps(ag + g * D + 16 * i);
    for (int r = 0; r < 16; ++r) {
      __m512 row[NV];
      for (int i = 0; i < NV; ++i) row[i] = load_f(v + r * stride + 16 * i);
#pragma GCC unroll 16
      for (int g = 0; g < GC; ++g)
        if (g < gc) {
          const __m512 pb = _mm512_set1_ps(pg[g * p_stride + r]);
          for (int i = 0; i < NV; ++i) a[g][i] = _mm512_fmadd_ps(pb, row[i], a[g][i]);
        }
    }
#pragma GCC unroll 16
    for (int g = 0; g < GC; ++g)
      if (g < gc)
        for (int i = 0; i < NV; ++i) _mm512_storeu_ps(ag + g * D + 16 * i, a[g][i]);
  }
}

template <typename T>
PV16R<T> pv16r_for(int64_t D) {
  switch (D) {
    case 32: return &pv16r<T, 2>;
    case 64: return &pv16r<T, 4>;
    case 128: return &pv16r<T, 8>;
    default: return nullptr;
  }
}
#else
template <typename T>
PV16R<T> pv16r_for(int64_t) { return nullptr; }
#endif
