// Depthwise 2-D convolution (depth multiplier 1) on CPU as XLA FFI handlers: forward, input gradient and
// kernel gradient. float32, NHWC, kernel KH×KW×1×C. Built and loaded by leukax/models/depthwise_ffi.py.
//
// Notation: x (B, H, W, C), k (KH, KW, 1, C), y/g (B, Ho, Wo, C), strides (S_h, S_w), top/left pads (P_h, P_w)
// (bottom/right pads are implied by Ho, Wo); x is zero outside [0, H) × [0, W).
//   forward      y[b,o,p,c]  = Σ_ij x[b, o·S_h + i − P_h, p·S_w + j − P_w, c] · k[i,j,c]
//   input grad   dx[b,h,w,c] = Σ_ij g[b, (h + P_h − i)/S_h, (w + P_w − j)/S_w, c] · k[i,j,c]
//                              (terms whose divisions are inexact or fall outside the output dropped)
//   kernel grad  dk[i,j,c]   = Σ_bop x[b, o·S_h + i − P_h, p·S_w + j − P_w, c] · g[b,o,p,c]
// Leading dimensions before (B, H, W, C) (vmap with "broadcast_all") form G independent problems; an operand
// whose leading size is 1 is shared by all G.
//
// Vectorised over C in blocks of 8 floats (GCC vector extension; a scalar tail for C mod 8), with
// compile-time kernel size and stride for 3×3 and 5×5, strides 1 and 2 (others: generic loops). Rows
// (output rows for forward and kernel grad, input rows for the gather-form input grad) are split over
// XLA's intra-op thread pool; the kernel gradient sums per-chunk partials in chunk order.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifndef LEUKAX_DW_LANES
#ifdef __AVX512F__
#define LEUKAX_DW_LANES 16  // one 512-bit register (measured ~8 % faster than 8 lanes on AMD EPYC Zen 4)
#else
#define LEUKAX_DW_LANES 8
#endif
#endif
constexpr int64_t kLanes = LEUKAX_DW_LANES;
typedef float v8 __attribute__((vector_size(4 * kLanes)));
typedef float v8u __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));  // unaligned load/store

template <class V> inline V load(const float* p);
template <> inline v8 load<v8>(const float* p) { return *reinterpret_cast<const v8u*>(p); }
template <> inline float load<float>(const float* p) { return *p; }
template <class V> inline void store(float* p, V v);
template <> inline void store<v8>(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
template <> inline void store<float>(float* p, float v) { *p = v; }
template <class V> inline V zero() { return V{}; }

// Shapes of one call. g_* are the leading (G) sizes of each operand: 1 (shared) or G.
struct Geom {
  int64_t G, B, H, W, C, KH, KW, SH, SW, PH, PW, HO, WO;
  int64_t gx, gk, gy;  // leading sizes of x, kernel, y-or-g
};

inline int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Output columns p whose taps p·S + j − P, j ∈ [0, KW), all lie inside [0, W): [lo, hi).
inline void interior_cols(int64_t W, int64_t KW, int64_t S, int64_t P, int64_t WO, int64_t* lo, int64_t* hi) {
  *lo = std::min<int64_t>(std::max<int64_t>(ceil_div(P, S), 0), WO);
  *hi = std::max<int64_t>(std::min<int64_t>(floor_div(W - KW + P, S) + 1, WO), *lo);
}

// ---------------------------------------------------------------------------------------------------
// Parallel loop over [0, n) in chunks on XLA's intra-op pool; the calling thread works too and returns
// once every chunk is done. Helpers that start after the work ran out touch only the shared counters.
// ---------------------------------------------------------------------------------------------------
struct LoopState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <class F>  // body(chunk, begin, end)
void parallel_chunks(ffi::ThreadPool& pool, int64_t n, int64_t nchunks, const F& body) {
  auto chunk = [n, nchunks](int64_t c, int64_t* b, int64_t* e) { *b = n * c / nchunks; *e = n * (c + 1) / nchunks; };
  int64_t threads = std::min<int64_t>(pool.num_threads(), nchunks);
  if (threads <= 1) {
    for (int64_t c = 0; c < nchunks; ++c) { int64_t b, e; chunk(c, &b, &e); body(c, b, e); }
    return;
  }
  auto st = std::make_shared<LoopState>();
  const F* fn = &body;
  auto run = [st, fn, chunk, nchunks](bool helper) {
    if (helper) st->active.fetch_add(1);
    for (int64_t c; (c = st->next.fetch_add(1)) < nchunks;) { int64_t b, e; chunk(c, &b, &e); (*fn)(c, b, e); }
    if (helper && st->active.fetch_sub(1) == 1) { std::lock_guard<std::mutex> lk(st->mu); st->cv.notify_all(); }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run] { run(true); });
  run(false);
  std::unique_lock<std::mutex> lk(st->mu);
  st->cv.wait(lk, [&] { return st->active.load() == 0; });
}

int64_t default_chunks(ffi::ThreadPool& pool, int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, 4 * std::max<int64_t>(pool.num_threads(), 1)));
}

// A row of n zeros (read-only), standing in for rows outside the input so that row loops need no branch.
inline const float* zeros(int64_t n) {
  thread_local std::vector<float> z;
  if (static_cast<int64_t>(z.size()) < n) z.assign(static_cast<size_t>(n), 0.0f);
  return z.data();
}

// Calls f(c0, lanes-tag) for the 8-wide channel blocks, then for each tail channel with a scalar tag.
template <class F>
inline void over_channels(int64_t C, const F& f) {
  int64_t c0 = 0;
  for (; c0 + kLanes <= C; c0 += kLanes) f(c0, v8{});
  for (; c0 < C; ++c0) f(c0, 0.0f);
}

#ifndef LEUKAX_DW_U
#define LEUKAX_DW_U 4
#endif
constexpr int kU = LEUKAX_DW_U;  // output columns per register block

// ---------------------------------------------------------------------------------------------------
// Forward: one output row o of one image.
// ---------------------------------------------------------------------------------------------------
template <class V>
inline V fwd_point_checked(const Geom& q, const float* x, const float* k, int64_t o, int64_t p, int64_t c0) {
  V acc = zero<V>();
  for (int64_t i = 0; i < q.KH; ++i) {
    int64_t h = o * q.SH + i - q.PH;
    if (h < 0 || h >= q.H) continue;
    for (int64_t j = 0; j < q.KW; ++j) {
      int64_t w = p * q.SW + j - q.PW;
      if (w < 0 || w >= q.W) continue;
      acc += load<V>(x + (h * q.W + w) * q.C + c0) * load<V>(k + (i * q.KW + j) * q.C + c0);
    }
  }
  return acc;
}

// U consecutive interior outputs (columns p..p+U−1, first tap column w0 = p·S − P_w), channels [c0, c0 + lanes).
template <class V, int K, int S, int U>
inline void fwd_block(const float* const* rows, const float* __restrict__ k, float* __restrict__ y, int64_t C,
                      int64_t w0, int64_t c0) {
  V a[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) a[u] = zero<V>();
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    const float* xr = rows[i] + w0 * C + c0;
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) {
      const V kk = load<V>(k + (i * K + j) * C + c0);
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) a[u] += load<V>(xr + (u * S + j) * C) * kk;
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) store<V>(y + u * C + c0, a[u]);
}

// K, S > 0: compile-time square kernel and stride; 0: generic (every column through the checked path).
template <int K, int S>
void fwd_row(const Geom& q, const float* x, const float* k, float* y, int64_t o) {
  const int64_t C = q.C;
  int64_t lo = 0, hi = 0;
  if constexpr (K > 0) interior_cols(q.W, K, S, q.PW, q.WO, &lo, &hi);
  auto checked = [&](int64_t p) {
    over_channels(C, [&](int64_t c0, auto tag) {
      using V = decltype(tag);
      store<V>(y + p * C + c0, fwd_point_checked<V>(q, x, k, o, p, c0));
    });
  };
  for (int64_t p = 0; p < lo; ++p) checked(p);
  if constexpr (K > 0) {
    const float* rows[K];
    const float* z = zeros(q.W * C);
    for (int i = 0; i < K; ++i) {
      const int64_t h = o * S + i - q.PH;
      rows[i] = (h >= 0 && h < q.H) ? x + h * q.W * C : z;
    }
    int64_t p = lo;
    for (; p + kU <= hi; p += kU)
      over_channels(C, [&](int64_t c0, auto tag) {
        fwd_block<decltype(tag), K, S, kU>(rows, k, y + p * C, C, p * S - q.PW, c0);
      });
    for (; p < hi; ++p)
      over_channels(C, [&](int64_t c0, auto tag) {
        fwd_block<decltype(tag), K, S, 1>(rows, k, y + p * C, C, p * S - q.PW, c0);
      });
  }
  for (int64_t p = std::max(hi, lo); p < q.WO; ++p) checked(p);
}

template <int K, int S>
void fwd_rows(const Geom& q, const float* x, const float* k, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {  // r = (g·B + b)·HO + o
    const int64_t o = r % q.HO, gb = r / q.HO, g = gb / q.B, b = gb % q.B;
    fwd_row<K, S>(q, x + ((q.gx > 1 ? g : 0) * q.B + b) * q.H * q.W * q.C,
                  k + (q.gk > 1 ? g : 0) * q.KH * q.KW * q.C, y + r * q.WO * q.C, o);
  }
}

// ---------------------------------------------------------------------------------------------------
// Input gradient (gather form): one input row h of one image.
// ---------------------------------------------------------------------------------------------------
template <class V>
inline V dx_point_checked(const Geom& q, const float* g, const float* k, int64_t h, int64_t w, int64_t c0) {
  V acc = zero<V>();
  for (int64_t i = 0; i < q.KH; ++i) {
    const int64_t th = h + q.PH - i;
    if (th < 0 || th % q.SH != 0 || th / q.SH >= q.HO) continue;
    const int64_t o = th / q.SH;
    for (int64_t j = 0; j < q.KW; ++j) {
      const int64_t tw = w + q.PW - j;
      if (tw < 0 || tw % q.SW != 0 || tw / q.SW >= q.WO) continue;
      acc += load<V>(g + (o * q.WO + tw / q.SW) * q.C + c0) * load<V>(k + (i * q.KW + j) * q.C + c0);
    }
  }
  return acc;
}

// U consecutive interior input columns w..w+U−1 with w + P_w ≡ 0 (mod S) and p0 = (w + P_w)/S: column w+u takes
// taps j ≡ u (mod S) from output column p0 + (u − j)/S; only kernel rows i ≡ PHASE (mod S) reach input row h.
template <class V, int K, int S, int PHASE, int U>
inline void dx_block(const float* const* grows, const float* __restrict__ k, float* __restrict__ dx, int64_t C,
                     int64_t p0, int64_t c0) {
  V a[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) a[u] = zero<V>();
#pragma GCC unroll 8
  for (int i = PHASE; i < K; i += S) {
    const float* gr = grows[i] + p0 * C + c0;
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) {
      const V kk = load<V>(k + (i * K + j) * C + c0);
#pragma GCC unroll 8
      for (int u = j % S; u < U; u += S) a[u] += load<V>(gr + ((u - j) / S) * C) * kk;
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) store<V>(dx + u * C + c0, a[u]);
}

template <int K, int S, int PHASE>
void dx_row_phase(const Geom& q, const float* g, const float* k, float* dx, int64_t h) {
  const int64_t C = q.C;
  auto checked = [&](int64_t w) {
    over_channels(C, [&](int64_t c0, auto tag) {
      using V = decltype(tag);
      store<V>(dx + w * C + c0, dx_point_checked<V>(q, g, k, h, w, c0));
    });
  };
  const float* grows[K];
  const float* z = zeros(q.WO * C);
  for (int i = 0; i < K; ++i) {
    const int64_t th = h + q.PH - i;  // ≡ 0 (mod S) exactly for i ≡ PHASE
    grows[i] = (th >= 0 && th % S == 0 && th / S < q.HO) ? g + (th / S) * q.WO * C : z;
  }
  // A block of U columns from w (w + P_w ≡ 0 mod S, p0 = (w + P_w)/S) reads output columns
  // p0 − ⌈(K−1)/S⌉ … p0 + ⌊(U−1)/S⌋: interior when those lie in [0, WO).
  constexpr int64_t back = (K - 1 + S - 1) / S;
  int64_t w = std::max<int64_t>(back * S - q.PW, 0);
  w += (S - (w + q.PW) % S) % S;
  w = std::min(w, q.W);
  for (int64_t t = 0; t < w; ++t) checked(t);
  for (; w + kU <= q.W && (w + q.PW) / S + (kU - 1) / S < q.WO; w += kU)
    over_channels(C, [&](int64_t c0, auto tag) {
      dx_block<decltype(tag), K, S, PHASE, kU>(grows, k, dx + w * C, C, (w + q.PW) / S, c0);
    });
  for (; w + S <= q.W && (w + q.PW) / S < q.WO; w += S)
    over_channels(C, [&](int64_t c0, auto tag) {
      dx_block<decltype(tag), K, S, PHASE, S>(grows, k, dx + w * C, C, (w + q.PW) / S, c0);
    });
  for (; w < q.W; ++w) checked(w);
}

template <int K, int S>
void dx_row(const Geom& q, const float* g, const float* k, float* dx, int64_t h) {
  if constexpr (K > 0) {
    static_assert(kU % S == 0, "the stride must divide the register block");
    const int64_t phase = (h + q.PH) % S;
    if (phase == 0) return dx_row_phase<K, S, 0>(q, g, k, dx, h);
    if constexpr (S > 1) {
      if (phase == 1) return dx_row_phase<K, S, 1>(q, g, k, dx, h);
    }
  }
  for (int64_t w = 0; w < q.W; ++w)
    over_channels(q.C, [&](int64_t c0, auto tag) {
      using V = decltype(tag);
      store<V>(dx + w * q.C + c0, dx_point_checked<V>(q, g, k, h, w, c0));
    });
}

template <int K, int S>
void dx_rows(const Geom& q, const float* g, const float* k, float* dx, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {  // r = (g·B + b)·H + h
    const int64_t h = r % q.H, gb = r / q.H, gi = gb / q.B, b = gb % q.B;
    dx_row<K, S>(q, g + ((q.gy > 1 ? gi : 0) * q.B + b) * q.HO * q.WO * q.C,
                 k + (q.gk > 1 ? gi : 0) * q.KH * q.KW * q.C, dx + r * q.W * q.C, h);
  }
}

// ---------------------------------------------------------------------------------------------------
// Kernel gradient: one output row o of one image added to acc (KH×KW×C).
// ---------------------------------------------------------------------------------------------------
template <class V>
inline void dk_point_checked(const Geom& q, const float* x, const float* g, float* acc, int64_t o, int64_t p,
                             int64_t c0) {
  const V gv = load<V>(g + (o * q.WO + p) * q.C + c0);
  for (int64_t i = 0; i < q.KH; ++i) {
    const int64_t h = o * q.SH + i - q.PH;
    if (h < 0 || h >= q.H) continue;
    for (int64_t j = 0; j < q.KW; ++j) {
      const int64_t w = p * q.SW + j - q.PW;
      if (w < 0 || w >= q.W) continue;
      float* a = acc + (i * q.KW + j) * q.C + c0;
      store<V>(a, load<V>(a) + load<V>(x + (h * q.W + w) * q.C + c0) * gv);
    }
  }
}

// U consecutive interior outputs (g row at column p: gr, first tap column w0) added to acc, channels [c0, +lanes).
template <class V, int K, int S, int U>
inline void dk_block(const float* const* rows, const float* __restrict__ gr, float* __restrict__ acc, int64_t C,
                     int64_t w0, int64_t c0) {
  V a[K * K];
#pragma GCC unroll 32
  for (int t = 0; t < K * K; ++t) a[t] = load<V>(acc + t * C + c0);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const V gv = load<V>(gr + u * C + c0);
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) {
      const float* xr = rows[i] + (w0 + u * S) * C + c0;
#pragma GCC unroll 8
      for (int j = 0; j < K; ++j) a[i * K + j] += load<V>(xr + j * C) * gv;
    }
  }
#pragma GCC unroll 32
  for (int t = 0; t < K * K; ++t) store<V>(acc + t * C + c0, a[t]);
}

template <int K, int S>
void dk_row(const Geom& q, const float* x, const float* g, float* acc, int64_t o) {
  const int64_t C = q.C;
  int64_t lo = 0, hi = 0;
  if constexpr (K > 0) interior_cols(q.W, K, S, q.PW, q.WO, &lo, &hi);
  auto checked = [&](int64_t p) {
    over_channels(C, [&](int64_t c0, auto tag) { dk_point_checked<decltype(tag)>(q, x, g, acc, o, p, c0); });
  };
  for (int64_t p = 0; p < lo; ++p) checked(p);
  if constexpr (K > 0) {
    const float* rows[K];
    const float* z = zeros(q.W * C);
    for (int i = 0; i < K; ++i) {
      const int64_t h = o * S + i - q.PH;
      rows[i] = (h >= 0 && h < q.H) ? x + h * q.W * C : z;
    }
    const float* grow = g + o * q.WO * C;
    int64_t p = lo;
    for (; p + kU <= hi; p += kU)
      over_channels(C, [&](int64_t c0, auto tag) {
        dk_block<decltype(tag), K, S, kU>(rows, grow + p * C, acc, C, p * S - q.PW, c0);
      });
    for (; p < hi; ++p)
      over_channels(C, [&](int64_t c0, auto tag) {
        dk_block<decltype(tag), K, S, 1>(rows, grow + p * C, acc, C, p * S - q.PW, c0);
      });
  }
  for (int64_t p = std::max(hi, lo); p < q.WO; ++p) checked(p);
}

template <int K, int S>
void dk_rows(const Geom& q, const float* x, const float* g, float* acc, int64_t gi, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {  // r = b·HO + o within group gi
    const int64_t o = r % q.HO, b = r / q.HO;
    dk_row<K, S>(q, x + ((q.gx > 1 ? gi : 0) * q.B + b) * q.H * q.W * q.C,
                 g + ((q.gy > 1 ? gi : 0) * q.B + b) * q.HO * q.WO * q.C, acc, o);
  }
}

// ---------------------------------------------------------------------------------------------------
// Dispatch on (K, S) and FFI handlers.
// ---------------------------------------------------------------------------------------------------
template <template <int, int> class Op, class... A>
void dispatch(const Geom& q, A... args) {
  const int64_t K = q.KH == q.KW ? q.KH : 0, S = q.SH == q.SW ? q.SH : 0;
  if (K == 3 && S == 1) return Op<3, 1>::run(q, args...);
  if (K == 3 && S == 2) return Op<3, 2>::run(q, args...);
  if (K == 5 && S == 1) return Op<5, 1>::run(q, args...);
  if (K == 5 && S == 2) return Op<5, 2>::run(q, args...);
  return Op<0, 0>::run(q, args...);
}

template <int K, int S> struct FwdOp {
  static void run(const Geom& q, const float* x, const float* k, float* y, int64_t r0, int64_t r1) {
    fwd_rows<K, S>(q, x, k, y, r0, r1);
  }
};
template <int K, int S> struct DxOp {
  static void run(const Geom& q, const float* g, const float* k, float* dx, int64_t r0, int64_t r1) {
    dx_rows<K, S>(q, g, k, dx, r0, r1);
  }
};
template <int K, int S> struct DkOp {
  static void run(const Geom& q, const float* x, const float* g, float* acc, int64_t gi, int64_t r0, int64_t r1) {
    dk_rows<K, S>(q, x, g, acc, gi, r0, r1);
  }
};

int64_t leading(const ffi::Buffer<ffi::F32>& a) {
  auto d = a.dimensions();
  int64_t n = 1;
  for (size_t t = 0; t + 4 < d.size(); ++t) n *= d[t];
  return n;
}

// Fills Geom from x-like (…, B, H, W, C), kernel (…, KH, KW, 1, C) and y-like (…, B, HO, WO, C) buffers.
ffi::Error make_geom(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& y,
                     int64_t sh, int64_t sw, int64_t ph, int64_t pw, Geom* q) {
  auto dx = x.dimensions(), dk = k.dimensions(), dy = y.dimensions();
  if (dx.size() < 4 || dk.size() < 4 || dy.size() < 4)
    return ffi::Error::InvalidArgument("depthwise: operands must have rank >= 4");
  const size_t rx = dx.size(), rk = dk.size(), ry = dy.size();
  *q = Geom{1, dx[rx - 4], dx[rx - 3], dx[rx - 2], dx[rx - 1], dk[rk - 4], dk[rk - 3], sh, sw, ph, pw,
            dy[ry - 3], dy[ry - 2], leading(x), leading(k), leading(y)};
  q->G = std::max({q->gx, q->gk, q->gy});
  for (int64_t n : {q->gx, q->gk, q->gy})
    if (n != 1 && n != q->G) return ffi::Error::InvalidArgument("depthwise: leading sizes must be 1 or equal");
  if (dk[rk - 2] != 1 || dk[rk - 1] != q->C || dy[ry - 1] != q->C || dy[ry - 4] != q->B)
    return ffi::Error::InvalidArgument("depthwise: kernel must be KH×KW×1×C and batch/channels must agree");
  if (sh < 1 || sw < 1) return ffi::Error::InvalidArgument("depthwise: strides must be >= 1");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  Geom q;
  if (auto e = make_geom(x, k, *y, sh, sw, ph, pw, &q); e.failure()) return e;
  const float *xp = x.typed_data(), *kp = k.typed_data();
  float* yp = y->typed_data();
  const int64_t rows = q.G * q.B * q.HO;
  parallel_chunks(pool, rows, default_chunks(pool, rows), [&](int64_t, int64_t r0, int64_t r1) {
    dispatch<FwdOp>(q, xp, kp, yp, r0, r1);
  });
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  Geom q;
  if (auto e = make_geom(*dx, k, g, sh, sw, ph, pw, &q); e.failure()) return e;
  const float *gp = g.typed_data(), *kp = k.typed_data();
  float* dp = dx->typed_data();
  const int64_t rows = q.G * q.B * q.H;
  parallel_chunks(pool, rows, default_chunks(pool, rows), [&](int64_t, int64_t r0, int64_t r1) {
    dispatch<DxOp>(q, gp, kp, dp, r0, r1);
  });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  Geom q;
  if (auto e = make_geom(x, *dk, g, sh, sw, ph, pw, &q); e.failure()) return e;
  const float *xp = x.typed_data(), *gp = g.typed_data();
  float* dkp = dk->typed_data();
  const int64_t ksize = q.KH * q.KW * q.C;
  // Each group's B·HO rows in chunks, each chunk summed into its own partial, partials added in order.
  const int64_t rows = q.B * q.HO;
  const int64_t per_group = std::max<int64_t>(1, default_chunks(pool, rows * q.G) / q.G);
  const int64_t nchunks = q.G * per_group;
  std::vector<float> partial(static_cast<size_t>(nchunks * ksize), 0.0f);
  parallel_chunks(pool, nchunks, nchunks, [&](int64_t, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t gi = c / per_group, part = c % per_group;
      dispatch<DkOp>(q, xp, gp, partial.data() + c * ksize, gi, rows * part / per_group,
                     rows * (part + 1) / per_group);
    }
  });
  const int64_t gout = q.gk;  // dk has the kernel's leading size (G, or 1 when all groups share it)
  for (int64_t gi = 0; gi < gout; ++gi) {
    float* out = dkp + gi * ksize;
    std::fill(out, out + ksize, 0.0f);
    for (int64_t gs = (gout > 1 ? gi : 0); gs < (gout > 1 ? gi + 1 : q.G); ++gs)
      for (int64_t part = 0; part < per_group; ++part) {
        const float* src = partial.data() + (gs * per_group + part) * ksize;
        for (int64_t t = 0; t < ksize; ++t) out[t] += src[t];
      }
  }
  return ffi::Error::Success();
}

}  // namespace

#define LEUKAX_DW_BIND                                                                                     \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()      \
      .Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("ph")          \
      .Attr<int64_t>("pw")

XLA_FFI_DEFINE_HANDLER_SYMBOL(LeukaxDepthwiseForward, Forward, LEUKAX_DW_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LeukaxDepthwiseInputGrad, InputGrad, LEUKAX_DW_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LeukaxDepthwiseKernelGrad, KernelGrad, LEUKAX_DW_BIND);

// Number of threads of XLA's intra-op pool as seen by a handler (for diagnostics).
static ffi::Error PoolThreads(ffi::ThreadPool pool, ffi::ResultBuffer<ffi::S32> n) {
  n->typed_data()[0] = static_cast<int32_t>(pool.num_threads());
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(LeukaxPoolThreads, PoolThreads,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Ret<ffi::Buffer<ffi::S32>>());
