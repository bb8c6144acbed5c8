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
//   softmax     softmax_row_bf16 (flash_softmax_row's numbers: torch's flash SDPA's roundings,
//               weights rounded to bf16) writing the bf16 weights directly, its
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
//
// With AMX (amx_bf16; the kernel asks Linux for the tile state once, `amx_usable`) both GEMMs run
// as tile products over the same packed operands: S per 16 query vectors x 32 keys (the K tile is
// already AMX's B layout: a row per d pair, a key per 32-bit lane), P V per 16 vectors x 64 d
// (the V tile likewise: a row per key pair, a d per lane), the accumulators in tiles over a
// split's keys. Key ranges then start at a multiple of 32 and end padded to one (zero weights,
// zero K/V rows), so the 512-key splits fall on tile boundaries; query vectors are padded to 16.
// Same softmax, same bf16 weights; only the order of the fp32 sums inside a tile product differs.

// prefill_bf16_for's kernel: prefill_attention's arguments
using PrefillBf16 = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, double, int64_t);

// whether the bf16 prompt attention may take AMX tiles (`set_amx`); on by default
inline bool& amx_allowed() {
  static bool allowed = true;
  return allowed;
}

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

// flash_softmax_row's numbers (the same scaled scores, maxima, exps, lane sums and rescales) with
// the earlier splits' weights left as they are: *num_splits counts the row's splits and
// rescale[i] is the factor entering split i + 1, for the caller's accumulator. Two passes over
// each split, the weights stored straight into w[0, ns) as bf16 (0 outside [first, p]); s[t - lo]
// is key t's raw score, read only in [first, p]
inline float softmax_row_bf16(const float* s, int64_t lo, int64_t first, int64_t p, int64_t Lk, float scale,
                              float* rescale, int64_t* num_splits, c10::BFloat16* w, int64_t ns) {
  std::fill(w, w + (first - lo), c10::BFloat16(0.f));
  std::fill(w + (p + 1 - lo), w + ns, c10::BFloat16(0.f));
  const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float max = -std::numeric_limits<float>::infinity(), sum = 0.f;
  int64_t splits = 0;
  for (int64_t b0 = first / kKvSplit * kKvSplit; b0 <= p; b0 += kKvSplit) {
    const int64_t vs = std::max(first, b0), ve = std::min(p + 1, b0 + kKvSplit);  // visible keys of the split
    const int64_t tail = std::min(ve, b0 + std::min(kKvSplit, Lk - b0) / kF * kF);  // torch's scalar tail
    const int64_t c0 = b0 + (vs - b0) / 16 * 16;  // 16-key steps at absolute positions (torch's lanes)
    __m512 mv = ninf;
    for (int64_t c = c0; c < ve; c += 16) {
      const int64_t a = std::max(c, vs), e = std::min(c + 16, ve);
      const __mmask16 k = static_cast<__mmask16>(((1u << (e - a)) - 1) << (a - c));
      mv = _mm512_max_ps(mv, _mm512_mul_ps(_mm512_mask_loadu_ps(ninf, k, s + (c - lo)), vscale));
    }
    const float m = std::max(max, _mm512_reduce_max_ps(mv));
    const fVec vm(m);
    fVec lanes(0.f);  // lane i sums keys b0 + i (mod 16)
    for (int64_t c = c0; c < tail; c += 16) {
      const int64_t a = std::max(c, vs), e = std::min(c + 16, tail);
      const __mmask16 k = static_cast<__mmask16>(((1u << (e - a)) - 1) << (a - c));
      const fVec x(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + (c - lo)), vscale));
      const fVec ex(_mm512_maskz_mov_ps(k, (x - vm).exp_u20()));
      lanes += ex;
      _mm256_mask_storeu_epi16(w + (c - lo), k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(ex), 16)));
    }
    float split_sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, lanes);
    for (int64_t t = std::max(vs, tail); t < ve; ++t) {
      const float ex = std::exp(s[t - lo] * scale - m);
      split_sum += ex;
      w[t - lo] = c10::BFloat16(ex);
    }
    const float r = std::exp(max - m);
    sum = split_sum + r * sum;
    max = m;
    if (splits > 0) rescale[splits - 1] = r;
    ++splits;
  }
  *num_splits = splits;
  return sum;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)  // <sys/syscall.h>, <unistd.h>: cpu_ops.cpp
constexpr bool kAmxBuilt = true;

// Linux hands a process AMX's tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); the answer is the process's, asked once
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// every tile 16 rows x 64 bytes (palette 1); per thread, before its first tile instruction
// (oneDNN's kernels load their own configuration each time, so interleaving with them is safe)
inline void amx_configure() {
  struct alignas(64) Config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg{};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
}

// S[16 m + r][16 g + i] = q_(16 m + r) . key (16 g + i) for NVP / 16 groups of query vectors (qp: a
// row of P pairs each) and ng (even) key groups (kt, pack_k_pairs' layout). Tiles: 0-1 S, 2.. Q
// (D / 32 of them, kept over the keys), 6-7 K
template <int NA>
inline void qk_tiles(const int32_t* qp, int64_t P, const int32_t* kt, int64_t ng, int64_t NVP, float* s, int64_t ns) {
  for (int64_t m = 0; m < NVP; m += 16) {
    const int32_t* a = qp + m * P;
    _tile_loadd(2, a, P * 4);
    if constexpr (NA > 1) _tile_loadd(3, a + 16, P * 4);
    if constexpr (NA > 2) {
      _tile_loadd(4, a + 32, P * 4);
      _tile_loadd(5, a + 48, P * 4);
    }
    for (int64_t g = 0; g < ng; g += 2) {
      const int32_t* k0 = kt + g * P * 16;
      const int32_t* k1 = k0 + P * 16;
      _tile_zero(0);
      _tile_zero(1);
#define PDSERVE_QK_STEP(c, A)                         \
  _tile_loadd(6, k0 + (c) * 256, 64);                 \
  _tile_loadd(7, k1 + (c) * 256, 64);                 \
  _tile_dpbf16ps(0, A, 6);                            \
  _tile_dpbf16ps(1, A, 7);
      PDSERVE_QK_STEP(0, 2)
      if constexpr (NA > 1) { PDSERVE_QK_STEP(1, 3) }
      if constexpr (NA > 2) { PDSERVE_QK_STEP(2, 4) PDSERVE_QK_STEP(3, 5) }
#undef PDSERVE_QK_STEP
      _tile_stored(0, s + m * ns + g * 16, ns * 4);
      _tile_stored(1, s + m * ns + g * 16 + 16, ns * 4);
    }
  }
}

// acc[16 m + r][:] (D = 16 NC floats a row) += the weights' pairs u0 .. u1 (multiples of 16; pp:
// a row of np pairs per vector) times V's (vt, pack_v_pairs' layout). Tiles: 0-3 accumulators
// (4 chunks of 16 d a pass), 4 P, 5-7 V
template <int NC>
inline void pv_tiles(const int32_t* pp, int64_t np, int64_t u0, int64_t u1, const int32_t* vt, int64_t NVP,
                     float* acc) {
  constexpr int64_t D = 16 * NC;
  constexpr int NQ = NC < 4 ? NC : 4;
  for (int64_t m = 0; m < NVP; m += 16)
    for (int cq = 0; cq < NC; cq += NQ) {
      float* c = acc + m * D + 16 * cq;
      _tile_loadd(0, c, D * 4);
      _tile_loadd(1, c + 16, D * 4);
      if constexpr (NQ > 2) {
        _tile_loadd(2, c + 32, D * 4);
        _tile_loadd(3, c + 48, D * 4);
      }
      for (int64_t u = u0; u < u1; u += 16) {
        const int32_t* v = vt + (u * NC + cq) * 16;
        _tile_loadd(4, pp + m * np + u, np * 4);
        _tile_loadd(5, v, NC * 64);
        _tile_loadd(6, v + 16, NC * 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        if constexpr (NQ > 2) {
          _tile_loadd(7, v + 32, NC * 64);
          _tile_loadd(5, v + 48, NC * 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      _tile_stored(0, c, D * 4);
      _tile_stored(1, c + 16, D * 4);
      if constexpr (NQ > 2) {
        _tile_stored(2, c + 32, D * 4);
        _tile_stored(3, c + 48, D * 4);
      }
    }
}
#else
constexpr bool kAmxBuilt = false;
inline bool amx_permitted() { return false; }
inline void amx_configure() {}
template <int NA>
inline void qk_tiles(const int32_t*, int64_t, const int32_t*, int64_t, int64_t, float*, int64_t) {}
template <int NC>
inline void pv_tiles(const int32_t*, int64_t, int64_t, int64_t, const int32_t*, int64_t, float*) {}
#endif

// the AMX path is taken where it was built and Linux grants the tiles, unless switched off
// (amx_allowed, `set_amx`: tests and benchmarks compare both paths on one machine)
inline bool amx_usable() { return kAmxBuilt && amx_allowed() && amx_permitted(); }

// prefill_attention's contract (cpu_prefill_attention.h) for bf16, D = 16 NC
template <int NC, bool AMX>
void prefill_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                            double scale, int64_t window) {
  using T = c10::BFloat16;
  constexpr int64_t QB = 16, D = 16 * NC, P = D / 2, RV = 16 / NC;  // RV: query vectors per P V pass
  constexpr int64_t KA = AMX ? 32 : 2;  // key ranges start at a multiple of KA (and AMX's end padded to one)
  const int64_t Lq = q.size(0), H = q.size(1), Lk = k.size(0), KVH = k.size(1), G = H / KVH;
  const int64_t q_s = q.stride(0), k_s = k.stride(0), v_s = v.stride(0), offset = Lk - Lq;
  const int64_t num_blocks = (Lq + QB - 1) / QB, max_splits = Lk / kKvSplit + 1;
  const T* qptr = q.data_ptr<T>();
  const T* kptr = k.data_ptr<T>();
  const T* vptr = v.data_ptr<T>();
  T* optr = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
  const int64_t NVmax = (QB * G + 15) / 16 * 16;  // AMX: query vectors padded to 16 (zero rows)
  at::parallel_for(0, num_blocks * KVH, 1, [&](int64_t begin, int64_t end) {
    if constexpr (AMX) amx_configure();
    std::vector<int32_t> qp(NVmax * P), kt, vt, pp;
    std::vector<float> s, acc(NVmax * D), inv(QB * G), rescale(QB * G * max_splits), fac(QB * G * max_splits);
    std::vector<int64_t> splits(QB * G), s0(QB * G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kh = item % KVH, z = item / KVH;
      const int64_t blk = z % 2 == 0 ? z / 2 : num_blocks - 1 - z / 2;  // zigzag, as the fp32 path
      const int64_t r0 = blk * QB, nr = std::min(Lq, r0 + QB) - r0, NV = nr * G;  // vector j: row r0 + j / G
      const int64_t NVP = AMX ? (NV + 15) / 16 * 16 : NV;
      const int64_t hi = offset + r0 + nr;
      // aligned, so that key pairs (AMX: tiles of 32 keys) never straddle a 512-key split; a key
      // no row sees gets weight 0
      const int64_t lo = (window > 0 ? std::max<int64_t>(0, offset + r0 - window + 1) : 0) / KA * KA;
      const int64_t n = hi - lo, ng = AMX ? (n + 31) / 32 * 2 : (n + 15) / 16, ns = ng * 16, np = ns / 2;
      kt.resize(ng * P * 16);
      vt.resize(np * NC * 16);
      s.resize(NVP * ns);
      pp.resize(NVP * np);
      for (int64_t j = 0; j < NV; ++j) {
        const T* src = qptr + (r0 + j / G) * q_s + (kh * G + j % G) * D;
        for (int64_t p = 0; p < P; ++p) qp[j * P + p] = load_pair(src + 2 * p);
      }
      pack_k_pairs(kptr + lo * k_s + kh * D, k_s, n, P, kt.data());
      pack_v_pairs<NC>(vptr + lo * v_s + kh * D, v_s, n, vt.data());
      int64_t j = 0;
      if constexpr (AMX) {  // padding: zero query vectors, key groups and V pairs past the range
        std::fill(qp.begin() + NV * P, qp.begin() + NVP * P, 0);
        std::fill(kt.begin() + (n + 15) / 16 * P * 16, kt.end(), 0);
        std::fill(vt.begin() + (n + 1) / 2 * NC * 16, vt.end(), 0);
        std::fill(pp.begin() + NV * np, pp.end(), 0);
        qk_tiles<D / 32>(qp.data(), P, kt.data(), ng, NVP, s.data(), ns);
      } else {
        for (; j + 8 <= NV; j += 8) qk_rows<8>(qp.data() + j * P, P, kt.data(), ng, s.data() + j * ns, ns);
        for (; j + 4 <= NV; j += 4) qk_rows<4>(qp.data() + j * P, P, kt.data(), ng, s.data() + j * ns, ns);
        for (; j < NV; ++j) qk_rows<1>(qp.data() + j * P, P, kt.data(), ng, s.data() + j * ns, ns);
      }
      for (j = 0; j < NV; ++j) {  // the row at position p sees keys [first, p]
        const int64_t p = offset + r0 + j / G, first = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        inv[j] = 1.f / softmax_row_bf16(s.data() + j * ns, lo, first, p, Lk, sc, rescale.data() + j * max_splits,
                                        &splits[j], reinterpret_cast<T*>(pp.data() + j * np), ns);
        s0[j] = first / kKvSplit * kKvSplit;
      }
      // P V, one 512-key split (absolute positions) at a time: before split b's keys, each row's
      // accumulator is multiplied by its rescale of that split (1 before its first or past its last)
      const int64_t first_split = lo / kKvSplit, last_split = (hi - 1) / kKvSplit;
      std::fill(acc.begin(), acc.begin() + NVP * D, 0.f);
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
        if constexpr (AMX) {  // the accumulators rescaled in memory, then the split's tiles on top
          if (f != nullptr)
            for (j = 0; j < NV; ++j)
              for (int64_t d = 0; d < D; d += kF) (fVec::loadu(acc.data() + j * D + d) * fVec(f[j])).store(acc.data() + j * D + d);
          pv_tiles<NC>(pp.data(), np, u0, (u1 + 15) / 16 * 16, vt.data(), NVP, acc.data());
          continue;
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
  const bool amx = amx_usable();
  switch (D) {
    case 32: return amx ? &prefill_attention_bf16<2, true> : &prefill_attention_bf16<2, false>;
    case 64: return amx ? &prefill_attention_bf16<4, true> : &prefill_attention_bf16<4, false>;
    case 128: return amx ? &prefill_attention_bf16<8, true> : &prefill_attention_bf16<8, false>;
    default: return nullptr;
  }
}
#else
inline bool amx_usable() { return false; }
inline PrefillBf16 prefill_bf16_for(int64_t) { return nullptr; }
#endif
