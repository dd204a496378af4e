// Paged attention for XLA:CPU, through the XLA FFI, reading jaxserve.model.kv_cache.KVCache's pool where its
// pages lie: out[B, T, N, H] float32 for queries q [B, T, N, H] at `positions` [B, T], over the pages that
// row b's table [B, C] names in layer `layer` (an int32 operand) of k [L, P, K, H, S] and v [L, P, K, S, H]
// (float32, or bfloat16 held as uint16 bits: kv_cache.STORED). A table entry past the pool is read as the
// last page, as the plain path's clipped gather reads it (keys the causal mask hides from any real query).
//
// The plain path (transformer.plain_attention) gathers one page per row into a copy at each step of its scan
// over the window's pages, then multiplies the copy; this kernel multiplies the pool's pages in place, and
// reads only what a query sees: no page past a row's last position, on a local layer none before its first
// query's sliding window, and within a page only the 16-position chunks that hold visible keys. The
// softmax is the same running one (flash-decoding's): per page, each query's scores against the page's keys,
// the running max and sum of exp(score - max) rescaled, and the page's values weighted into the output.
//
// GQA without repeating K/V: the G query heads of a KV head (query head n = k * G + g, as HF's repeat_kv)
// and the row's T tokens are the query rows dotted with that head's keys, up to four at a time while the
// page is in cache. Tasks of (row, KV head, up to 32 query rows) run on XLA's intra-op thread pool (pool.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxserve::L;  // floats per vector; positions in a page and head dims are multiples of it
using jaxserve::load;
using jaxserve::sum;
using jaxserve::vf;
constexpr int RB = 4;          // query rows dotted with a page's keys and values at once
constexpr int VH = 4;          // vectors of the head dim accumulated at once in the values' matmul
constexpr int64_t ROWS = 32;   // query rows of a task at most (a prefill chunk's split over several)
// How far ahead of its reads a page's keys and values are prefetched, in bytes: the next 4 KiB page of
// memory, where the hardware's stream prefetcher stops.
constexpr int64_t AHEAD = 4096;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef int32_t vi __attribute__((vector_size(L * 4)));
typedef uint16_t vu16 __attribute__((vector_size(L * 2)));
typedef uint32_t vu32 __attribute__((vector_size(L * 4)));

inline vf splat(float x) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);  // a broadcast from memory: no shuffle port taken (vf{} + x adds a scalar 0 first)
#else
  return x - vf{};  // x - 0 is x for every x (x + 0 is not for -0)
#endif
}

// bfloat16 bits -> float32: they are a float32's high half
inline vf load(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 w = __builtin_convertvector(h, vu32) << 16;
  vf v;
  std::memcpy(&v, &w, sizeof v);
  return v;
#endif
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline vf fma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);  // -std=c++17 contracts no a * b + c
#else
  return a * b + c;
#endif
}

inline float hmax(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)v);
#else
  float m = v[0];
  for (int i = 1; i < L; ++i) m = std::max(m, v[i]);
  return m;
#endif
}

// e^x for lanes x <= 0 (scores less their running max): Cephes' expf (n = round(x / ln 2), a degree-6
// polynomial on the remainder, 2^n by the exponent's bits), within a few ulp of float32's exp. Lanes below
// -87 give e^-87 (2^n stays a normal float): a weight float32 cannot tell from 0 beside the max's 1, and
// the masked lanes are zeroed by the caller.
inline vf exp_nonpositive(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);  // x <= 0: truncation rounds
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = fma(p, r, splat(1.3981999507e-3f));
  p = fma(p, r, splat(8.3334519073e-3f));
  p = fma(p, r, splat(4.1665795894e-2f));
  p = fma(p, r, splat(1.6666665459e-1f));
  p = fma(p, r, splat(5.0000001201e-1f));
  const vf y = fma(p, r * r, r + 1.0f);
  const vi bits = (n + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

struct Call {
  int64_t B, T, N, H, K, G, P, S, C;  // C: the table's columns (the window's pages)
  const float* q;
  const void* k;  // layer `layer`'s [P, K, H, S]
  const void* v;  // layer `layer`'s [P, K, S, H]
  const int32_t* table;
  const int32_t* positions;
  float* out;
  float scale;
  int32_t window;  // the sliding window on a local layer; 0: none
};

// Scores p [R, S] = q [R, H] . k [H, S] * scale of R query rows at positions [j, j + CH * L) of a page: for
// each head dim, CH chunks of the keys' row one after another, so that the page is read in order.
template <typename E, int R, int CH>
void scores(const float* q, const E* kp, int64_t H, int64_t S, int64_t j, float scale, float* p) {
  vf acc[R][CH];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CH; ++c) acc[r][c] = vf{};
  const int64_t ahead = std::max<int64_t>(1, AHEAD / (S * sizeof(E)));  // rows
  for (int64_t h = 0; h < H; ++h) {
    const E* row = kp + h * S + j;
    if (h + ahead < H)
      for (int c = 0; c < CH; ++c) __builtin_prefetch(row + ahead * S + c * L);
    for (int c = 0; c < CH; ++c) {
      const vf k = load(row + c * L);
      for (int r = 0; r < R; ++r) acc[r][c] = fma(splat(q[r * H + h]), k, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CH; ++c) store(p + r * S + j + c * L, acc[r][c] * scale);
}

// Scores at positions [j, end): CH chunks at a time, then halves of that for what is left.
template <typename E, int R, int CH>
void scores_from(const float* q, const E* kp, int64_t H, int64_t S, int64_t j, int64_t end, float scale, float* p) {
  for (; j + CH * L <= end; j += CH * L) scores<E, R, CH>(q, kp, H, S, j, scale, p);
  if constexpr (CH > 1) scores_from<E, R, CH / 2>(q, kp, H, S, j, end, scale, p);
}

// A block of R query rows (q [R, H]) against positions [blo, bhi) of one page (kp [H, S], vp [S, H]), each
// row seeing its [lo, hi): the running max m, sum l and weighted values o [R, H] updated. p: [R, S] scratch.
template <typename E, int R>
void block(const float* q, const E* kp, const E* vp, int64_t H, int64_t S, const int64_t* lo, const int64_t* hi,
           int64_t blo, int64_t bhi, float scale, float* m, float* l, float* o, float* p) {
  // up to 8 chunks' accumulators for each row: 24 of the 32 vector registers at most
  scores_from<E, R, R <= 3 ? 8 : 4>(q, kp, H, S, blo, bhi, scale, p);

  // the running softmax: scores of masked positions weigh 0
  vi iota;
  for (int i = 0; i < L; ++i) iota[i] = i;
  for (int r = 0; r < R; ++r) {
    float* pr = p + r * S;
    if (lo[r] >= hi[r]) {  // nothing of this page visible to the row
      for (int64_t j = blo; j < bhi; j += L) store(pr + j, vf{});
      continue;
    }
    const vi first = vi{} + static_cast<int32_t>(lo[r]), end = vi{} + static_cast<int32_t>(hi[r]);
    vf top = splat(NEG_INF);
    for (int64_t j = blo; j < bhi; j += L) {
      const vi at = iota + static_cast<int32_t>(j);
      const vf s = load(pr + j);
      top = (at >= first) & (at < end) & (s > top) ? s : top;
    }
    const float new_m = std::max(m[r], hmax(top));
    const float alpha = std::exp(m[r] - new_m);  // 0 before the first visible key (m = -inf)
    vf weights = vf{};
    for (int64_t j = blo; j < bhi; j += L) {
      const vi at = iota + static_cast<int32_t>(j);
      const vf e = exp_nonpositive(load(pr + j) - new_m);
      const vf w = (at >= first) & (at < end) ? e : vf{};
      store(pr + j, w);
      weights += w;
    }
    l[r] = l[r] * alpha + sum(weights);
    m[r] = new_m;
    if (alpha != 1.0f)
      for (int64_t h = 0; h < H; ++h) o[r * H + h] *= alpha;
  }

  // o [R, H] += p [R, S] . v [S, H], VH vectors of the head dim at a time
  auto values = [&](auto nv_tag, int64_t h0) {
    constexpr int NV = decltype(nv_tag)::value;
    vf acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NV; ++i) acc[r][i] = load(o + r * H + h0 + i * L);
    const int64_t ahead = std::max<int64_t>(1, AHEAD / (H * sizeof(E)));  // rows
    for (int64_t s = blo; s < bhi; ++s) {
      if (s + ahead < bhi)
        for (int i = 0; i < NV; ++i) __builtin_prefetch(vp + (s + ahead) * H + h0 + i * L);
      vf vv[NV];
      for (int i = 0; i < NV; ++i) vv[i] = load(vp + s * H + h0 + i * L);
      for (int r = 0; r < R; ++r) {
        const vf w = splat(p[r * S + s]);
        for (int i = 0; i < NV; ++i) acc[r][i] = fma(w, vv[i], acc[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NV; ++i) store(o + r * H + h0 + i * L, acc[r][i]);
  };
  int64_t h0 = 0;
  for (; h0 + VH * L <= H; h0 += VH * L) values(std::integral_constant<int, VH>{}, h0);
  for (; h0 < H; h0 += L) values(std::integral_constant<int, 1>{}, h0);
}

template <typename E>
void block_of(int rows, const float* q, const E* kp, const E* vp, int64_t H, int64_t S, const int64_t* lo,
              const int64_t* hi, int64_t blo, int64_t bhi, float scale, float* m, float* l, float* o, float* p) {
  switch (rows) {
    case 1: return block<E, 1>(q, kp, vp, H, S, lo, hi, blo, bhi, scale, m, l, o, p);
    case 2: return block<E, 2>(q, kp, vp, H, S, lo, hi, blo, bhi, scale, m, l, o, p);
    case 3: return block<E, 3>(q, kp, vp, H, S, lo, hi, blo, bhi, scale, m, l, o, p);
    default: return block<E, 4>(q, kp, vp, H, S, lo, hi, blo, bhi, scale, m, l, o, p);
  }
}

// Query rows [r0, r1) of row b and KV head kh (query row r: token r / G, query head kh * G + r % G).
template <typename E>
void unit(const Call& a, bool local, int64_t b, int64_t kh, int64_t r0, int64_t r1) {
  const int64_t H = a.H, S = a.S, G = a.G, n = r1 - r0;
  std::vector<float> q(n * H), o(n * H, 0.0f), m(n, NEG_INF), l(n, 0.0f), p(RB * S);
  std::vector<int64_t> pos(n), lo(n), hi(n);
  int64_t first = INT64_MAX, last = INT64_MIN;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = (r0 + i) / G, g = (r0 + i) % G;
    pos[i] = a.positions[b * a.T + t];
    first = std::min(first, pos[i]), last = std::max(last, pos[i]);
    std::memcpy(q.data() + i * H, a.q + ((b * a.T + t) * a.N + kh * G + g) * H, H * sizeof(float));
  }
  const bool sliding = local && a.window > 0;
  // the window's pages the rows see: none past the last position; on a local layer, none before the first
  // query's sliding window
  const int64_t end = last < 0 ? 0 : std::min(a.C, last / S + 1);
  const int64_t begin = sliding ? std::max<int64_t>(0, first - a.window + 1) / S : 0;
  std::vector<float> kw, vw;  // a bfloat16 page widened once when several blocks of rows read it
  const E* k = static_cast<const E*>(a.k);
  const E* v = static_cast<const E*>(a.v);
  for (int64_t c = begin; c < end; ++c) {
    const int64_t page = std::clamp<int64_t>(a.table[b * a.C + c], 0, a.P - 1);
    const E* kp = k + (page * a.K + kh) * H * S;
    const E* vp = v + (page * a.K + kh) * S * H;
    int64_t ulo = S, uhi = 0;
    for (int64_t i = 0; i < n; ++i) {  // each row's visible positions within the page
      hi[i] = std::clamp<int64_t>(pos[i] - c * S + 1, 0, S);
      lo[i] = sliding ? std::clamp<int64_t>(pos[i] - a.window + 1 - c * S, 0, S) : 0;
      if (lo[i] < hi[i]) ulo = std::min(ulo, lo[i]), uhi = std::max(uhi, hi[i]);
    }
    if (ulo >= uhi) continue;
    ulo = ulo / L * L, uhi = (uhi + L - 1) / L * L;
    auto blocks = [&](auto kp, auto vp) {
      for (int64_t i = 0; i < n; i += RB) {
        const int rows = static_cast<int>(std::min<int64_t>(RB, n - i));
        int64_t blo = S, bhi = 0;
        for (int r = 0; r < rows; ++r)
          if (lo[i + r] < hi[i + r]) blo = std::min(blo, lo[i + r]), bhi = std::max(bhi, hi[i + r]);
        if (blo >= bhi) continue;
        blo = blo / L * L, bhi = (bhi + L - 1) / L * L;
        block_of(rows, q.data() + i * H, kp, vp, H, S, lo.data() + i, hi.data() + i, blo, bhi, a.scale,
                 m.data() + i, l.data() + i, o.data() + i * H, p.data());
      }
    };
    if (std::is_same_v<E, uint16_t> && n > RB) {
      kw.resize(H * S), vw.resize(S * H);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = ulo; s < uhi; s += L) store(kw.data() + h * S + s, load(kp + h * S + s));
      for (int64_t s = ulo; s < uhi; ++s)
        for (int64_t h = 0; h < H; h += L) store(vw.data() + s * H + h, load(vp + s * H + h));
      blocks(static_cast<const float*>(kw.data()), static_cast<const float*>(vw.data()));
    } else {
      blocks(kp, vp);
    }
  }
  for (int64_t i = 0; i < n; ++i) {  // a row that saw nothing (no real query) gives 0
    const int64_t t = (r0 + i) / G, g = (r0 + i) % G;
    float* dst = a.out + ((b * a.T + t) * a.N + kh * G + g) * H;
    for (int64_t h = 0; h < H; ++h) dst[h] = l[i] > 0 ? o[i * H + h] / l[i] : 0.0f;
  }
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> positions,
                     ffi::Buffer<ffi::S32> local, ffi::ResultBuffer<ffi::F32> out, float scale, int32_t window) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = table.dimensions();
  auto pd = positions.dimensions();
  const auto dtype = k.element_type();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || td.size() != 2 || pd.size() != 2)
    return ffi::Error::InvalidArgument("attention: q [B, T, N, H], k [L, P, K, H, S], v [L, P, K, S, H]");
  if (v.element_type() != dtype || (dtype != ffi::F32 && dtype != ffi::U16 && dtype != ffi::BF16))
    return ffi::Error::InvalidArgument("attention: k and v both float32, or both bfloat16 (as uint16 bits)");
  Call a{qd[0], qd[1], qd[2], qd[3], kd[2], 0, kd[1], kd[4], td[1]};
  if (kd[3] != a.H || vd[0] != kd[0] || vd[1] != a.P || vd[2] != a.K || vd[3] != a.S || vd[4] != a.H ||
      td[0] != a.B || pd[0] != a.B || pd[1] != a.T || a.K == 0 || a.N % a.K || a.H % L || a.S % L ||
      layer.element_count() != 1 || local.element_count() != 1)
    return ffi::Error::InvalidArgument("attention: shapes (head dim and page size multiples of 16)");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("attention: layer out of range");
  a.G = a.N / a.K;
  const int64_t item = dtype == ffi::F32 ? 4 : 2, per_layer = a.P * a.K * a.H * a.S * item;
  a.k = static_cast<const uint8_t*>(k.untyped_data()) + l * per_layer;
  a.v = static_cast<const uint8_t*>(v.untyped_data()) + l * per_layer;
  a.q = q.typed_data(), a.table = table.typed_data(), a.positions = positions.typed_data();
  a.out = out->typed_data(), a.scale = scale, a.window = window;
  const bool is_local = *local.typed_data() != 0;

  const int64_t rows = a.T * a.G, chunks = (rows + ROWS - 1) / ROWS, units = a.B * a.K * chunks;
  // the bytes read (K and V up to each row's last position): the split's measure of the work (pool.h)
  int64_t bytes = 0;
  for (int64_t b = 0; b < a.B; ++b)
    bytes += std::clamp<int64_t>(a.positions[b * a.T + a.T - 1] + 1, 0, a.C * a.S) * a.K * a.H * 2 * item;
  auto run = [=](int64_t u) {
    const int64_t b = u / (a.K * chunks), kh = u / chunks % a.K, r0 = u % chunks * ROWS;
    const int64_t r1 = std::min(rows, r0 + ROWS);
    if (dtype == ffi::F32)
      unit<float>(a, is_local, b, kh, r0, r1);
    else
      unit<uint16_t>(a, is_local, b, kh, r0, r1);
  };
  jaxserve::parallel(pool, units, bytes, run);
  return ffi::Error::Success();
}

// A step's keys and values written into layer `layer` of the pool where it lies: k [B, T, K, H] at
// [layer, page[b, t], :, :, offset[b, t]] of the k pool [L, P, K, H, S], v [B, T, K, H] at
// [layer, page, :, offset, :] of the v pool [L, P, K, S, H]; a page outside the pool drops the token's
// write (KVCache.write's mode="drop"). The results are the pools' own buffers (aliased: XLA hands the
// operands over), so nothing else of the pool is touched. XLA:CPU turns the scatter this replaces into a
// loop over the tokens, a fusion each, twice a layer. SmolLM2 q8 forward, scatter -> this, over a pool of
// serve's default size (182 pages): 1 row even (within 0.25 ms of ~5 ms), 8 rows 0.2-0.45 ms faster.
ffi::Error KvWrite(ffi::AnyBuffer kp, ffi::AnyBuffer vp, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page,
                   ffi::Buffer<ffi::S32> offset, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> ko,
                   ffi::Result<ffi::AnyBuffer> vo) {
  auto pd = kp.dimensions(), vd = vp.dimensions(), kd = k.dimensions(), id = page.dimensions();
  const auto dtype = kp.element_type();
  if (pd.size() != 5 || vd.size() != 5 || kd.size() != 4 || id.size() != 2 || offset.dimensions().size() != 2 ||
      vp.element_type() != dtype || k.element_type() != dtype || v.element_type() != dtype ||
      v.dimensions().size() != 4 || layer.element_count() != 1)
    return ffi::Error::InvalidArgument("kv write: pools [L, P, K, H, S] and [L, P, K, S, H], k and v [B, T, K, H]");
  const int64_t L_ = pd[0], P = pd[1], K = pd[2], H = pd[3], S = pd[4], B = kd[0], T = kd[1];
  for (int i = 0; i < 4; ++i)
    if (v.dimensions()[i] != kd[i]) return ffi::Error::InvalidArgument("kv write: k and v of one shape");
  if (vd[0] != L_ || vd[1] != P || vd[2] != K || vd[3] != S || vd[4] != H || kd[2] != K || kd[3] != H ||
      id[0] != B || id[1] != T || offset.dimensions()[0] != B || offset.dimensions()[1] != T)
    return ffi::Error::InvalidArgument("kv write: shapes");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= L_) return ffi::Error::InvalidArgument("kv write: layer out of range");
  if (ko->untyped_data() != kp.untyped_data() || vo->untyped_data() != vp.untyped_data())
    return ffi::Error::Internal("kv write: the results are not the pools' buffers (aliasing)");
  const int64_t item = kp.size_bytes() / kp.element_count(), head = H * S * item;
  uint8_t* kout = static_cast<uint8_t*>(ko->untyped_data()) + l * P * K * head;
  uint8_t* vout = static_cast<uint8_t*>(vo->untyped_data()) + l * P * K * head;
  const uint8_t *kin = static_cast<const uint8_t*>(k.untyped_data()), *vin = static_cast<const uint8_t*>(v.untyped_data());
  for (int64_t i = 0; i < B * T; ++i) {
    const int64_t p = page.typed_data()[i], o = offset.typed_data()[i];
    if (p < 0 || p >= P || o < 0 || o >= S) continue;
    for (int64_t kh = 0; kh < K; ++kh) {
      const uint8_t *kr = kin + (i * K + kh) * H * item, *vr = vin + (i * K + kh) * H * item;
      uint8_t* kdst = kout + (p * K + kh) * head + o * item;  // [H, S]: one key's H values S apart
      for (int64_t h = 0; h < H; ++h) std::memcpy(kdst + h * S * item, kr + h * item, item);
      std::memcpy(vout + (p * K + kh) * head + o * H * item, vr, H * item);  // [S, H]: contiguous
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_kv_write, KvWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // k pool
                                  .Arg<ffi::AnyBuffer>()         // v pool
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page [B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // offset [B, T]
                                  .Arg<ffi::AnyBuffer>()         // k [B, T, K, H]
                                  .Arg<ffi::AnyBuffer>()         // v [B, T, K, H]
                                  .Ret<ffi::AnyBuffer>()         // k pool (the operand's buffer)
                                  .Ret<ffi::AnyBuffer>());       // v pool

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_cpu_attention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // local
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window"));
