// Direct 3x3x3 convolution kernels for XLA:CPU (stride 1, channels-last, float32).
//
// XLA's CPU backend lowers a 3D convolution's weight gradient to a convolution over
// transposed activations, which costs more than the forward pass several times over
// (benchmarks/README.md). These kernels compute the three maps a training step needs
// directly on the channels-last data, register-blocked for the FMA units:
//
//   forward       y[b,d,h,w,o]      = sum_{kd,kh,kw,i} xp[b,d+kd,h+kh,w+kw,i] k[kd,kh,kw,i,o]
//   weight grad   dk[kd,kh,kw,i,o]  = sum_{b,d,h,w}    xp[b,d+kd,h+kh,w+kw,i] dy[b,d,h,w,o]
//
// where xp is the input zero-padded by one voxel on each side of D, H and W (the caller
// pads; SAME padding of a 3x3x3 stride-1 convolution). The input gradient is the forward
// map applied to the padded output gradient with the flipped, in/out-swapped kernel, so it
// needs no kernel of its own.
//
// For one output row (b, d, h) and one of the nine (kd, kh) taps, the 3*Cin inputs that
// output voxel w needs, xp[b, d+kd, h+kh, w:w+3, :], are contiguous in memory, and so is
// the matching (3*Cin, Cout) slab of the kernel. A row is therefore nine small matrix
// products with no im2col copy; the micro-kernels below keep a WB x (8*NV) tile of the
// result in vector registers.
//
// Work is split over the XLA intra-op thread pool in a fixed number of chunks; the weight
// gradient sums fixed per-chunk partials in chunk order, so results do not depend on the
// number of threads or on scheduling.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 splat(float s) { return v8{s, s, s, s, s, s, s, s}; }

// Accumulator tiles sized to the register file: 32 vector registers with AVX-512, 16 without.
#if defined(__AVX512F__)
constexpr int kMaxAcc = 24;
#else
constexpr int kMaxAcc = 12;
#endif

// ---------------------------------------------------------------------------------------
// Parallel loop over [0, n) chunks on the XLA thread pool. The calling thread works too and
// only waits for chunks already being processed, so it cannot deadlock when the pool's
// other threads are busy. Late tasks find no chunk left and return without touching `f`.
struct LoopState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  auto state = std::make_shared<LoopState>();
  auto run = [state, n, &f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, n, run]() {
      if (state->next.load() < n) run();
    });
  }
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// ---------------------------------------------------------------------------------------
// Shapes. Input x (B, Di, Hi, Wi, Cin), output (B, Do, Ho, Wo, Cout), kernel (3, 3, 3, Cin,
// Cout), stride s and low-side zero padding (pd, ph, pw) on each axis: output voxel o reads
// input s*o + k - p for k = 0, 1, 2, and reads outside the input count as zero.
struct Geometry {
  int64_t b, di, hi, wi, cin, d, h, w, cout, s, pd, ph, pw;
  int64_t rows() const { return b * d * h; }
  int64_t K() const { return 3 * cin; }  // one (kd, kh) tap: (kw, ci) flattened
  // Input rows feeding output row r = (b*Do + od)*Ho + oh: pointers to x[b, id, ih, 0, 0]
  // and tap indices t = 3*kd + kh, for the taps whose input row exists. Returns the count.
  int Taps(const float* x, int64_t r, const float** rows, int* taps) const {
    const int64_t oh = r % h, bd = r / h, od = bd % d, bb = bd / d;
    int n = 0;
    for (int kd = 0; kd < 3; ++kd) {
      const int64_t id = s * od + kd - pd;
      if (id < 0 || id >= di) continue;
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t ih = s * oh + kh - ph;
        if (ih < 0 || ih >= hi) continue;
        rows[n] = x + ((bb * di + id) * hi + ih) * wi * cin;
        taps[n++] = 3 * kd + kh;
      }
    }
    return n;
  }
  // Output voxels [lo, hi) whose three input voxels along W all exist; the others (at most
  // one or two per side) read the padding.
  void Interior(int64_t* lo, int64_t* hi_) const {
    *lo = std::min<int64_t>((pw + s - 1) / s, w);
    *hi_ = wi - 3 + pw >= 0 ? std::min<int64_t>((wi - 3 + pw) / s + 1, w) : 0;
    if (*hi_ < *lo) *hi_ = *lo;
  }
  // For output voxel ow, the valid kw range [k0, k1) along W.
  void KwRange(int64_t ow, int64_t* k0, int64_t* k1) const {
    const int64_t iw = s * ow - pw;
    *k0 = std::max<int64_t>(0, -iw);
    *k1 = std::min<int64_t>(3, wi - iw);
  }
};

int VectorsPerTile(int64_t cout) {
  const int64_t v = cout / 8;
  return v % 4 == 0 ? 4 : v % 2 == 0 ? 2 : 1;
}

// Forward tile: WB output voxels (input step `step` floats apart), 8*NV output channels.
// For tap n, a[n] points at the first input value and k[n] at the matching kernel row
// (already offset to the tile's first channel); nq kernel rows are summed per tap.
template <int WB, int NV>
void FwdTile(const float* const* a, const float* const* k, int ntaps, int64_t nq,
             int64_t step, int64_t cout, float* y) {
  v8 acc[WB][NV];
  for (int i = 0; i < WB; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = splat(0.0f);
  for (int n = 0; n < ntaps; ++n) {
    const float* an = a[n];
    const float* kn = k[n];
    for (int64_t q = 0; q < nq; ++q) {
      v8 kv[NV];
      for (int j = 0; j < NV; ++j) kv[j] = load8(kn + q * cout + 8 * j);
      for (int i = 0; i < WB; ++i) {
        const v8 x = splat(an[i * step + q]);
        for (int j = 0; j < NV; ++j) acc[i][j] += x * kv[j];
      }
    }
  }
  for (int i = 0; i < WB; ++i)
    for (int j = 0; j < NV; ++j) store8(y + i * cout + 8 * j, acc[i][j]);
}

template <int NV>
void ForwardRow(const Geometry& g, const float* const* rows, const int* taps, int ntaps,
                const float* kernel, int64_t co0, float* yrow) {
  constexpr int kWide = kMaxAcc / NV >= 16 ? 16 : kMaxAcc / NV >= 8 ? 8 : 4;
  const int64_t cin = g.cin, cout = g.cout, K = g.K(), step = g.s * cin;
  const float* a[9];
  const float* k[9];
  int64_t lo, hi;
  g.Interior(&lo, &hi);
  int64_t ow = lo;
  auto tiles = [&](auto wb_tag) {
    constexpr int WB = decltype(wb_tag)::value;
    for (; ow + WB <= hi; ow += WB) {
      for (int n = 0; n < ntaps; ++n) {
        a[n] = rows[n] + (g.s * ow - g.pw) * cin;
        k[n] = kernel + taps[n] * K * cout + co0;
      }
      FwdTile<WB, NV>(a, k, ntaps, K, step, cout, yrow + ow * cout + co0);
    }
  };
  tiles(std::integral_constant<int, kWide>());
  if constexpr (kWide > 8) tiles(std::integral_constant<int, 8>());
  if constexpr (kWide > 4) tiles(std::integral_constant<int, 4>());
  tiles(std::integral_constant<int, 2>());
  tiles(std::integral_constant<int, 1>());
  for (int64_t e = 0; e < g.w; ++e) {  // border voxels: only the kw taps inside the input
    if (e == lo) e = hi;
    if (e >= g.w) break;
    int64_t k0, k1;
    g.KwRange(e, &k0, &k1);
    for (int n = 0; n < ntaps; ++n) {
      a[n] = rows[n] + (g.s * e - g.pw + k0) * cin;
      k[n] = kernel + (taps[n] * K + k0 * cin) * cout + co0;
    }
    FwdTile<1, NV>(a, k, k1 > k0 ? ntaps : 0, (k1 - k0) * cin, step, cout,
                   yrow + e * cout + co0);
  }
}

void ForwardRows(const Geometry& g, const float* x, const float* kernel, float* y, int64_t r0,
                 int64_t r1) {
  const int nv = VectorsPerTile(g.cout);
  const float* rows[9];
  int taps[9];
  for (int64_t r = r0; r < r1; ++r) {
    const int ntaps = g.Taps(x, r, rows, taps);
    float* yrow = y + r * g.w * g.cout;
    for (int64_t co0 = 0; co0 < g.cout; co0 += 8 * nv) {
      if (nv == 4) ForwardRow<4>(g, rows, taps, ntaps, kernel, co0, yrow);
      else if (nv == 2) ForwardRow<2>(g, rows, taps, ntaps, kernel, co0, yrow);
      else ForwardRow<1>(g, rows, taps, ntaps, kernel, co0, yrow);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Weight-gradient tile: kernel rows q0..q0+KB of one tap's (3*Cin, Cout) slab, 8*NV
// channels from co0, accumulated over nw output voxels: dk[q][o] += sum_w a[w*step + q] dy[w][o].
template <int KB, int NV>
void WgradTile(const float* a, const float* dy, int64_t step, int64_t cout, int64_t nw,
               int64_t q0, int64_t co0, float* dk) {
  v8 acc[KB][NV];
  for (int i = 0; i < KB; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = load8(dk + (q0 + i) * cout + co0 + 8 * j);
  for (int64_t w = 0; w < nw; ++w) {
    v8 gv[NV];
    for (int j = 0; j < NV; ++j) gv[j] = load8(dy + w * cout + co0 + 8 * j);
    const float* aw = a + w * step + q0;
    for (int i = 0; i < KB; ++i) {
      const v8 x = splat(aw[i]);
      for (int j = 0; j < NV; ++j) acc[i][j] += x * gv[j];
    }
  }
  for (int i = 0; i < KB; ++i)
    for (int j = 0; j < NV; ++j) store8(dk + (q0 + i) * cout + co0 + 8 * j, acc[i][j]);
}

template <int NV>
void WgradRow(const Geometry& g, const float* xrow, const float* dyrow, int64_t co0,
              float* dk /* slab of this tap */) {
  constexpr int kTall = kMaxAcc / NV >= 16 ? 16 : kMaxAcc / NV >= 8 ? 8 : 4;
  const int64_t cin = g.cin, cout = g.cout, K = g.K(), step = g.s * cin;
  int64_t lo, hi;
  g.Interior(&lo, &hi);
  if (hi > lo) {
    const float* a = xrow + (g.s * lo - g.pw) * cin;
    const float* dy = dyrow + lo * cout;
    int64_t q = 0;
    auto tiles = [&](auto kb_tag) {
      constexpr int KB = decltype(kb_tag)::value;
      for (; q + KB <= K; q += KB) WgradTile<KB, NV>(a, dy, step, cout, hi - lo, q, co0, dk);
    };
    tiles(std::integral_constant<int, kTall>());
    if constexpr (kTall > 8) tiles(std::integral_constant<int, 8>());
    if constexpr (kTall > 4) tiles(std::integral_constant<int, 4>());
    tiles(std::integral_constant<int, 2>());
    tiles(std::integral_constant<int, 1>());
  }
  for (int64_t e = 0; e < g.w; ++e) {  // border voxels: only the kw taps inside the input
    if (e == lo) e = hi;
    if (e >= g.w) break;
    int64_t k0, k1;
    g.KwRange(e, &k0, &k1);
    const float* a = xrow + (g.s * e - g.pw + k0) * cin;  // first input voxel inside
    v8 gv[NV];
    for (int j = 0; j < NV; ++j) gv[j] = load8(dyrow + e * cout + co0 + 8 * j);
    for (int64_t q = k0 * cin; q < k1 * cin; ++q) {
      const v8 x = splat(a[q - k0 * cin]);
      for (int j = 0; j < NV; ++j) {
        float* p = dk + q * cout + co0 + 8 * j;
        store8(p, load8(p) + x * gv[j]);
      }
    }
  }
}

void WgradRows(const Geometry& g, const float* x, const float* dy, float* dk, int64_t r0,
               int64_t r1) {
  const int64_t slab = g.K() * g.cout;
  const int nv = VectorsPerTile(g.cout);
  const float* rows[9];
  int taps[9];
  for (int64_t r = r0; r < r1; ++r) {
    const int ntaps = g.Taps(x, r, rows, taps);
    const float* dyrow = dy + r * g.w * g.cout;
    for (int n = 0; n < ntaps; ++n) {
      float* dkt = dk + taps[n] * slab;
      for (int64_t co0 = 0; co0 < g.cout; co0 += 8 * nv) {
        if (nv == 4) WgradRow<4>(g, rows[n], dyrow, co0, dkt);
        else if (nv == 2) WgradRow<2>(g, rows[n], dyrow, co0, dkt);
        else WgradRow<1>(g, rows[n], dyrow, co0, dkt);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
ffi::Error MakeGeometry(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kd,
                        ffi::Span<const int64_t> yd, int64_t s, int64_t pd, int64_t ph,
                        int64_t pw, Geometry* g) {
  if (xd.size() != 5 || yd.size() != 5 || kd.size() != 5 || xd[0] != yd[0])
    return ffi::Error::InvalidArgument("conv3d_cpu: input and output must be (B, D, H, W, C)");
  if (kd[0] != 3 || kd[1] != 3 || kd[2] != 3 || kd[3] != xd[4] || kd[4] != yd[4])
    return ffi::Error::InvalidArgument("conv3d_cpu: kernel must be (3, 3, 3, Cin, Cout)");
  if (yd[4] % 8 != 0)
    return ffi::Error::InvalidArgument("conv3d_cpu: output channels must be a multiple of 8");
  if (s < 1 || pd < 0 || ph < 0 || pw < 0 || pd > 2 || ph > 2 || pw > 2)
    return ffi::Error::InvalidArgument("conv3d_cpu: bad stride or padding");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], yd[4], s, pd, ph, pw};
  return ffi::Error::Success();
}

constexpr int64_t kChunks = 8;  // fixed: results must not depend on the thread count

ffi::Error Conv3dForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                             int64_t stride, int64_t pad_d, int64_t pad_h, int64_t pad_w) {
  Geometry g;
  if (ffi::Error e = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), stride,
                                  pad_d, pad_h, pad_w, &g);
      e.failure())
    return e;
  const int64_t rows = g.rows();
  const int64_t chunks = std::min<int64_t>(rows, 4 * kChunks);
  const float* in = x.typed_data();
  const float* k = kernel.typed_data();
  float* out = y->typed_data();
  ParallelFor(pool, chunks, [&](int64_t c) {
    ForwardRows(g, in, k, out, rows * c / chunks, rows * (c + 1) / chunks);
  });
  return ffi::Error::Success();
}

ffi::Error Conv3dWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                                int64_t stride, int64_t pad_d, int64_t pad_h, int64_t pad_w) {
  Geometry g;
  if (ffi::Error e = MakeGeometry(x.dimensions(), dk->dimensions(), dy.dimensions(), stride,
                                  pad_d, pad_h, pad_w, &g);
      e.failure())
    return e;
  const int64_t rows = g.rows();
  const int64_t chunks = std::min<int64_t>(rows, kChunks);
  const int64_t size = 27 * g.cin * g.cout;
  std::vector<float> partial(chunks * size, 0.0f);
  const float* in = x.typed_data();
  const float* grad = dy.typed_data();
  ParallelFor(pool, chunks, [&](int64_t c) {
    WgradRows(g, in, grad, partial.data() + c * size, rows * c / chunks,
              rows * (c + 1) / chunks);
  });
  float* out = dk->typed_data();
  std::copy(partial.begin(), partial.begin() + size, out);
  for (int64_t c = 1; c < chunks; ++c) {
    const float* p = partial.data() + c * size;
    for (int64_t i = 0; i < size; ++i) out[i] += p[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3dForward, Conv3dForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_d")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3dWeightGrad, Conv3dWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_d")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));
