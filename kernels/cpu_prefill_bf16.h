// The bf16 prompt attention on AVX512-BF16 (vdpbf16ps): textually included by
// cpu_prefill_attention.h (after flash_softmax_row and transpose16, which it uses); kernels/cpu.py
// hashes this file into the build's name. prefill_attention<c10::BFloat16> calls it where the
// instructions exist and D is 32, 64 or 128; fp32 and other machines keep the fp32 FMA path.
//
// One work item (a KV head, up to 16 query rows: NV = rows * G query vectors, keys [lo, hi)) as two
// small GEMMs on the stored bf16 values, no row converted to fp32:
//
//   K tile  kt[group g of 16 keys][pair p][key i]   the 16 keys' (d 2p, 2p+1) pairs in the lanes of
//                                                  one vector (a 16x16 transpose of 32-bit pairs)
//   S = Q K^T   per 8 query vectors and 16 keys: D/2 vdpbf16ps with the query's pair broadcast
//   softmax     flash_softmax_row (torch's flash SDPA's roundings, weights rounded to bf16), its
//               later-split rescales kept per row instead of applied to the weights
//   V tile  vt[key pair u][d chunk c][d]           (V[2u][d], V[2u + 1][d]) pairs, 16 d a vector
//   O = P V     per 16 / (D / 16) query vectors, accumulators in registers over the keys:
//               vdpbf16ps with the weights' pair broadcast; at each 512-key split the row's
//               accumulator is rescaled as torch's flash kernel rescales its own
//
// The products are exact in fp32 (bf16 x bf16) and summed in fp32, as the fp32 path sums them, in
// another order (pairs first); the weights P are the same bf16 values. vdpbf16ps flushes
// denormal inputs and results to zero: attention scores and weights of that size (< 1e-38) are 0
// to the softmax anyway.

// prefill_bf16_for's kernel: prefill_attention's arguments
using PrefillBf16 = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, double, int64_t);

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)

inline int32_t load_pair(const c10::BFloat16* p) {  // two adjacent bf16 as one 32-bit lane
  int32_t x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// K rows lo + [0, n) of one head (row stride k_s, D = 2P values) -> kt[(g * P + p) * 16 + i] = pair p
// of key 16 g + i; keys past n are zero
inline void pack_k_pairs(const c10::BFloat16* k, int64_t k_s, int64_t n, int64_t P, int32_t* kt) {
  for (int64_t g = 0; g * 16 < n; ++g)
    for (int64_t c = 0; c < P; c += 16) {  // 16 pairs (one vector) of each of the 16 rows
      __m512 r[16], cols[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t t = g * 16 + i;
        r[i] = t < n ? _mm512_loadu_ps(reinterpret_cast<const float*>(k + t * k_s + 2 * c)) : _mm512_setzero_ps();
      }
      transpose16(r, cols);  // data movement only: the bits stay bf16 pairs
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(kt + ((g * P) + c + i) * 16), cols[i]);
    }
}

// V rows lo + [0, n) of one head (D = 16 NC values) -> vt[(u * NC + c) * 16 + l] = (V[2u][16c + l],
// V[2u + 1][16c + l]); rows past n are zero
template <int NC>
inline void pack_v_pairs(const c10::BFloat16* v, int64_t v_s, int64_t n, int32_t* vt) {
  for (int64_t u = 0; 2 * u < n; ++u) {
    const c10::BFloat16* r0 = v + 2 * u * v_s;
    const bool has1 = 2 * u + 1 < n;
    for (int c = 0; c < NC; ++c) {
      const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 16 * c)));
      const __m512i b = has1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(r0 + v_s + 16 * c)))
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(vt + (u * NC + c) * 16, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

// s[j * ns + 16 g + i] = q_j . key (16 g + i) for R query vectors (pairs qp[j * P + p]) and ng key groups
template <int R>
inline void qk_rows(const int32_t* qp, int64_t P, const int32_t* kt, int64_t ng, float* s, int64_t ns) {
  for (int64_t g = 0; g < ng; ++g) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    const int32_t* kg = kt + g * P * 16;
    for (int64_t p = 0; p < P; ++p) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(kg + p * 16);
      for (int i = 0; i < R; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(qp[i * P + p]), kv);
    }
    for (int i = 0; i < R; ++i) _mm512_storeu_ps(s + i * ns + g * 16, acc[i]);
  }
}

// acc[j * D + :] (R vectors, D = 16 NC) times fac[j] (when fac is given), then += the weights' pairs
// u0 .. u1 (pp[j * np + u]) times V's (vt)
template <int NC, int R>
inline void pv_rows(const int32_t* pp, int64_t np, int64_t u0, int64_t u1, const int32_t* vt, const float* fac,
                    float* acc) {
  constexpr int64_t D = 16 * NC;
  __m512 a[R][NC];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NC; ++c) {
      a[i][c] = _mm512_loadu_ps(acc + i * D + 16 * c);
      if (fac != nullptr) a[i][c] = _mm512_mul_ps(a[i][c], _mm512_set1_ps(fac[i]));
    }
  for (int64_t u = u0; u < u1; ++u) {
    __m512bh vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vt + (u * NC + c) * 16);
    for (int i = 0; i < R; ++i) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(pp[i * np + u]);
      for (int c = 0; c < NC; ++c) a[i][c] = _mm512_dpbf16_ps(a[i][c], pb, vv[c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + i * D + 16 * c, a[i][c]);
}

// prefill_attention's contract (cpu_prefill_attention.h) for bf16, D = 16 NC
template <int NC>
void prefill_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                            double scale, int64_t window) {
  using T = c10::BFloat16;
  constexpr int64_t QB = 16, D = 16 * NC, P = D / 2, RV = 16 / NC;  // RV: query vectors per P V pass
  const int64_t Lq = q.size(0), H = q.size(1), Lk = k.size(0), KVH = k.size(1), G = H / KVH;
  const int64_t q_s = q.stride(0), k_s = k.stride(0), v_s = v.stride(0), offset = Lk - Lq;
  const int64_t num_blocks = (Lq + QB - 1) / QB, max_splits = Lk / kKvSplit + 1;
  const T* qptr = q.data_ptr<T>();
  const T* kptr = k.data_ptr<T>();
  const T* vptr = v.data_ptr<T>();
  T* optr = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, num_blocks * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> qp(QB * G * P), kt, vt, pp;
    std::vector<float> s, acc(QB * G * D), inv(QB * G), rescale(QB * G * max_splits), fac(QB * G * max_splits);
    std::vector<int64_t> splits(QB * G), s0(QB * G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kh = item % KVH, z = item / KVH;
      const int64_t blk = z % 2 == 0 ? z / 2 : num_blocks - 1 - z / 2;  // zigzag, as the fp32 path
      const int64_t r0 = blk * QB, nr = std::min(Lq, r0 + QB) - r0, NV = nr * G;  // vector j: row r0 + j / G
      const int64_t hi = offset + r0 + nr;
      // even, so that key pairs never straddle a 512-key split; a key no row sees gets weight 0
      const int64_t lo = (window > 0 ? std::max<int64_t>(0, offset + r0 - window + 1) : 0) & ~int64_t{1};
      const int64_t n = hi - lo, ng = (n + 15) / 16, ns = ng * 16, np = ns / 2;
      kt.resize(ng * P * 16);
      vt.resize(np * NC * 16);
      s.resize(NV * ns);
      pp.resize(NV * np);
      for (int64_t j = 0; j < NV; ++j) {
        const T* src = qptr + (r0 + j / G) * q_s + (kh * G + j % G) * D;
        for (int64_t p = 0; p < P; ++p) qp[j * P + p] = load_pair(src + 2 * p);
      }
      pack_k_pairs(kptr + lo * k_s + kh * D, k_s, n, P, kt.data());
      pack_v_pairs<NC>(vptr + lo * v_s + kh * D, v_s, n, vt.data());
      int64_t j = 0;
      for (; j + 8 <= NV; j += 8) qk_rows<8>(qp.data() + j * P, P, kt.data(), ng, s.data() + j * ns, ns);
      for (; j + 4 <= NV; j += 4) qk_rows<4>(qp.data() + j * P, P, kt.data(), ng, s.data() + j * ns, ns);
      for (; j < NV; ++j) qk_rows<1>(qp.data() + j * P, P, kt.data(), ng, s.data() + j * ns, ns);
      for (j = 0; j < NV; ++j) {  // the row at position p sees keys [first, p]
        const int64_t p = offset + r0 + j / G, first = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        float* row = s.data() + j * ns;
        std::fill(row + (p + 1 - lo), row + ns, 0.f);
        inv[j] = 1.f / flash_softmax_row<T>(row, lo, first, p, Lk, sc, rescale.data() + j * max_splits,
                                            &splits[j]);
        s0[j] = first / kKvSplit * kKvSplit;
        T* prow = reinterpret_cast<T*>(pp.data() + j * np);  // the weights are bf16 values already: exact
        for (int64_t t = 0; t < ns; t += kF) store_f(prow + t, fVec::loadu(row + t));
      }
      // P V, one 512-key split (absolute positions) at a time: before split b's keys, each row's
      // accumulator is multiplied by its rescale of that split (1 before its first or past its last)
      const int64_t first_split = lo / kKvSplit, last_split = (hi - 1) / kKvSplit;
      std::fill(acc.begin(), acc.begin() + NV * D, 0.f);
      for (int64_t b = first_split; b <= last_split; ++b) {
        const int64_t u0 = (std::max(b * kKvSplit, lo) - lo) / 2, u1 = (std::min((b + 1) * kKvSplit, hi) - lo + 1) / 2;
        const float* f = nullptr;
        if (b > first_split) {
          for (j = 0; j < NV; ++j) {
            const int64_t i = b - s0[j] / kKvSplit - 1;  // rescale[i]: entering the row's split i + 1
            fac[j] = i >= 0 && i < splits[j] - 1 ? rescale[j * max_splits + i] : 1.f;
          }
          f = fac.data();
        }
        for (j = 0; j + RV <= NV; j += RV)
          pv_rows<NC, RV>(pp.data() + j * np, np, u0, u1, vt.data(), f ? f + j : nullptr, acc.data() + j * D);
        for (; j < NV; ++j)
          pv_rows<NC, 1>(pp.data() + j * np, np, u0, u1, vt.data(), f ? f + j : nullptr, acc.data() + j * D);
      }
      for (j = 0; j < NV; ++j) {
        T* dst = optr + ((r0 + j / G) * H + kh * G + j % G) * D;
        for (int64_t d = 0; d < D; d += kF) store_f(dst + d, fVec::loadu(acc.data() + j * D + d) * fVec(inv[j]));
      }
    }
  });
}

// the kernel for head size D, or nullptr (the fp32 path runs)
inline PrefillBf16 prefill_bf16_for(int64_t D) {
  switch (D) {
    case 32: return &prefill_attention_bf16<2>;
    case 64: return &prefill_attention_bf16<4>;
    case 128: return &prefill_attention_bf16<8>;
    default: return nullptr;
  }
}
#else
inline PrefillBf16 prefill_bf16_for(int64_t) { return nullptr; }
#endif
