// Direct 3x3x3 convolution kernels for XLA:CPU (channels-last, float32, SAME padding).
//
// XLA's CPU backend lowers a 3D convolution's weight gradient to a convolution over
// transposed activations, which costs several times the forward pass
// (benchmarks/README.md). These kernels compute, on the channels-last data as it is,
//
//   forward      y[b,d,h,w,o]     = sum_{kd,kh,kw,i} x[b, s*d+kd-pd, s*h+kh-ph, s*w+kw-pw, i] k[kd,kh,kw,i,o]
//   weight grad  dk[kd,kh,kw,i,o] = sum_{b,d,h,w}    x[b, s*d+kd-pd, s*h+kh-ph, s*w+kw-pw, i] dy[b,d,h,w,o]
//
// with reads outside x counting as zero (stride s, low-side padding p). The input gradient
// of a stride-1 convolution is the forward map of dy with the flipped, in/out-swapped
// kernel, so it needs no kernel of its own (timm_jax/cpu_kernels.py).
//
// Scheme: for one output row (b, d, h) and one of the nine (kd, kh) taps, the 3*Cin inputs
// that output voxel w needs (its window) are contiguous in the input row, and so is the
// matching (3*Cin, Cout) slab of the kernel. An output row is therefore nine small matrix
// products with no im2col copy; the tiles below keep a block of the result in vector
// registers. Output voxels whose window leaves the input (one per side for SAME padding)
// read a zero-filled copy of their window instead.
//
// Work is split over XLA's intra-op thread pool in a number of chunks fixed by the shapes
// alone; the weight gradient adds per-chunk partial sums in chunk order. Results therefore do
// not depend on the thread count or on scheduling.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using timm_jax::ParallelFor;

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 splat(float s) { return v8{s, s, s, s, s, s, s, s}; }

// Accumulator tiles are sized to the register file: 32 vector registers with AVX-512
// (tiles of up to 24 accumulators), 16 without (12).
#if defined(__AVX512F__)
constexpr int kMaxAcc = 24;
#else
constexpr int kMaxAcc = 12;
#endif

// ---------------------------------------------------------------------------------------
// Shapes: input (B, Di, Hi, Wi, Cin), output (B, D, H, W, Cout), kernel (3, 3, 3, Cin, Cout).
struct Geometry {
  int64_t b, di, hi, wi, cin, d, h, w, cout, s, pd, ph, pw;
  int64_t rows() const { return b * d * h; }  // output rows (b, d, h)
  int64_t K() const { return 3 * cin; }       // kernel rows per (kd, kh) tap: (kw, ci)
  int64_t step() const { return s * cin; }    // window start to next window start
  // Output voxels [lo, hi) of a row whose windows lie inside the input along W.
  void Interior(int64_t* lo, int64_t* hi_) const {
    *lo = std::min<int64_t>((pw + s - 1) / s, w);
    *hi_ = std::max<int64_t>(*lo, wi + pw >= 3 ? std::min<int64_t>((wi + pw - 3) / s + 1, w) : 0);
  }
};

// The input rows output row r = (b*D + d)*H + h reads, one per (kd, kh) tap inside the
// input: row[n] points at x[b, id, ih, 0, 0] and tap[n] = 3*kd + kh.
struct RowTaps {
  const float* row[9];
  int tap[9];
  int n = 0;
  RowTaps(const Geometry& g, const float* x, int64_t r) {
    const int64_t oh = r % g.h, bd = r / g.h, od = bd % g.d, b = bd / g.d;
    for (int kd = 0; kd < 3; ++kd) {
      const int64_t id = g.s * od + kd - g.pd;
      if (id < 0 || id >= g.di) continue;
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t ih = g.s * oh + kh - g.ph;
        if (ih < 0 || ih >= g.hi) continue;
        row[n] = x + ((b * g.di + id) * g.hi + ih) * g.wi * g.cin;
        tap[n++] = 3 * kd + kh;
      }
    }
  }
  // Copies the window of output voxel ow in tap n's row, x[..., s*ow - pw + kw, :] for
  // kw = 0, 1, 2, to dst (3*Cin floats), with zeros where it leaves the input.
  void CopyWindow(const Geometry& g, int n, int64_t ow, float* dst) const {
    const int64_t iw = g.s * ow - g.pw;
    for (int kw = 0; kw < 3; ++kw, dst += g.cin) {
      if (iw + kw >= 0 && iw + kw < g.wi) std::copy_n(row[n] + (iw + kw) * g.cin, g.cin, dst);
      else std::fill_n(dst, g.cin, 0.0f);
    }
  }
};

// Calls f(ow) for the output voxels of a row outside the interior [lo, hi).
template <typename F>
void ForBorder(const Geometry& g, int64_t lo, int64_t hi, const F& f) {
  for (int64_t ow = 0; ow < lo; ++ow) f(ow);
  for (int64_t ow = hi; ow < g.w; ++ow) f(ow);
}

int VectorsPerTile(int64_t cout) {
  const int64_t v = cout / 8;
  return v % 4 == 0 ? 4 : v % 2 == 0 ? 2 : 1;
}

// Tile widths: NV output vectors (8 channels each) times this many voxels or kernel rows.
template <int NV>
constexpr int TileRows() { return NV == 1 ? (kMaxAcc >= 24 ? 16 : 8) : kMaxAcc / NV; }

// Runs tile<WB>(start) over [0, n): widest tiles first, then 8, 4, 2, 1.
template <int kWidest, typename Tile>
void Tiled(int64_t n, const Tile& tile) {
  int64_t i = 0;
  auto run = [&](auto width) {
    constexpr int WB = decltype(width)::value;
    for (; i + WB <= n; i += WB) tile(width, i);
  };
  run(std::integral_constant<int, kWidest>());
  if constexpr (kWidest > 8) run(std::integral_constant<int, 8>());
  if constexpr (kWidest > 4) run(std::integral_constant<int, 4>());
  if constexpr (kWidest > 2) run(std::integral_constant<int, 2>());
  run(std::integral_constant<int, 1>());
}

// ---------------------------------------------------------------------------------------
// Forward tile: WB voxels (inputs `step` floats apart) x 8*NV output channels. For tap n,
// a[n] points at the first voxel's window and k[n] at the tap's kernel slab (offset to the
// tile's first channel); K kernel rows are summed per tap.
template <int WB, int NV>
void FwdTile(const float* const* a, const float* const* k, int ntaps, int64_t K, int64_t step,
             int64_t cout, float* y) {
  v8 acc[WB][NV];
  for (int i = 0; i < WB; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = splat(0.0f);
  for (int n = 0; n < ntaps; ++n) {
    const float* an = a[n];
    const float* kn = k[n];
    for (int64_t q = 0; q < K; ++q) {
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

// One output row, channels co0..co0+8*NV. `buf` holds 9 border windows (9*3*Cin floats).
template <int NV>
void ForwardRow(const Geometry& g, const RowTaps& in, const float* kernel, int64_t co0,
                float* yrow, float* buf) {
  const int64_t K = g.K(), step = g.step();
  const float* a[9];
  const float* k[9];
  for (int n = 0; n < in.n; ++n) k[n] = kernel + in.tap[n] * K * g.cout + co0;
  int64_t lo, hi;
  g.Interior(&lo, &hi);
  Tiled<TileRows<NV>()>(hi - lo, [&](auto width, int64_t i) {
    for (int n = 0; n < in.n; ++n) a[n] = in.row[n] + (g.s * (lo + i) - g.pw) * g.cin;
    FwdTile<decltype(width)::value, NV>(a, k, in.n, K, step, g.cout, yrow + (lo + i) * g.cout + co0);
  });
  ForBorder(g, lo, hi, [&](int64_t ow) {
    for (int n = 0; n < in.n; ++n) in.CopyWindow(g, n, ow, buf + n * K), a[n] = buf + n * K;
    FwdTile<1, NV>(a, k, in.n, K, step, g.cout, yrow + ow * g.cout + co0);
  });
}

// Narrow outputs (Cout = 8, Cin % 8 == 0): with one output vector per voxel the tiles above
// need one broadcast load per FMA, which starves the FMA units. Here vectors run along the
// 3*Cin contraction instead: acc[i][o] holds 8 partial sums for channel o of voxel i, fed by
// contiguous loads of the window and of the transposed kernel kt[tap][o][q], and the lanes
// are summed once per tile. Needs AVX-512's 32 registers (3 voxels x 8 channels).
constexpr bool kNarrowTiles = kMaxAcc >= 24;

bool UseNarrowTiles(const Geometry& g) { return kNarrowTiles && g.cout == 8 && g.cin % 8 == 0; }

// {sum of a[0]'s lanes, ..., sum of a[7]'s lanes}
inline v8 LaneSums(const v8* a) {
  v8 b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

template <int WT>
void FwdNarrowTile(const float* const* a, const float* const* kt, int ntaps, int64_t K,
                   int64_t step, float* y) {
  v8 acc[WT][8];
  for (int i = 0; i < WT; ++i)
    for (int o = 0; o < 8; ++o) acc[i][o] = splat(0.0f);
  for (int n = 0; n < ntaps; ++n) {
    for (int64_t q = 0; q < K; q += 8) {
      v8 xv[WT];
      for (int i = 0; i < WT; ++i) xv[i] = load8(a[n] + i * step + q);
      for (int o = 0; o < 8; ++o) {
        const v8 kv = load8(kt[n] + o * K + q);
        for (int i = 0; i < WT; ++i) acc[i][o] += xv[i] * kv;
      }
    }
  }
  for (int i = 0; i < WT; ++i) store8(y + 8 * i, LaneSums(acc[i]));
}

void ForwardRowNarrow(const Geometry& g, const RowTaps& in, const float* kt, float* yrow,
                      float* buf) {
  const int64_t K = g.K(), step = g.step();
  const float* a[9];
  const float* k[9];
  for (int n = 0; n < in.n; ++n) k[n] = kt + in.tap[n] * 8 * K;
  int64_t lo, hi;
  g.Interior(&lo, &hi);
  int64_t ow = lo;
  auto tiles = [&](auto width) {
    constexpr int WT = decltype(width)::value;
    for (; ow + WT <= hi; ow += WT) {
      for (int n = 0; n < in.n; ++n) a[n] = in.row[n] + (g.s * ow - g.pw) * g.cin;
      FwdNarrowTile<WT>(a, k, in.n, K, step, yrow + ow * 8);
    }
  };
  tiles(std::integral_constant<int, 3>());
  tiles(std::integral_constant<int, 1>());
  ForBorder(g, lo, hi, [&](int64_t e) {
    for (int n = 0; n < in.n; ++n) in.CopyWindow(g, n, e, buf + n * K), a[n] = buf + n * K;
    FwdNarrowTile<1>(a, k, in.n, K, step, yrow + e * 8);
  });
}

void ForwardRows(const Geometry& g, const float* x, const float* kernel, const float* kt,
                 float* y, int64_t r0, int64_t r1) {
  const int nv = VectorsPerTile(g.cout);
  std::vector<float> buf(9 * g.K());
  for (int64_t r = r0; r < r1; ++r) {
    const RowTaps in(g, x, r);
    float* yrow = y + r * g.w * g.cout;
    if (kt != nullptr) {
      ForwardRowNarrow(g, in, kt, yrow, buf.data());
      continue;
    }
    for (int64_t co0 = 0; co0 < g.cout; co0 += 8 * nv) {
      if (nv == 4) ForwardRow<4>(g, in, kernel, co0, yrow, buf.data());
      else if (nv == 2) ForwardRow<2>(g, in, kernel, co0, yrow, buf.data());
      else ForwardRow<1>(g, in, kernel, co0, yrow, buf.data());
    }
  }
}

// ---------------------------------------------------------------------------------------
// Weight gradient. For one tap, the contraction runs over every output voxel of a chunk of
// rows, listed as spans: voxel w of a span has its window at a + w*step and its output
// gradient at dy + w*Cout. Each tile loads its block of dk once, sweeps all spans, and
// stores it once.
struct Span {
  const float* a;
  int64_t step;
  const float* dy;
  int64_t n;
};

// Kernel rows q0..q0+KB of the tap's (3*Cin, Cout) slab, channels co0..co0+8*NV:
// dk[q][o] += sum_w a[w*step + q] dy[w][o].
template <int KB, int NV>
void WgradTile(const std::vector<Span>& spans, int64_t cout, int64_t q0, int64_t co0, float* dk) {
  v8 acc[KB][NV];
  for (int i = 0; i < KB; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = load8(dk + (q0 + i) * cout + co0 + 8 * j);
  for (const Span& sp : spans) {
    for (int64_t w = 0; w < sp.n; ++w) {
      v8 gv[NV];
      for (int j = 0; j < NV; ++j) gv[j] = load8(sp.dy + w * cout + co0 + 8 * j);
      const float* aw = sp.a + w * sp.step + q0;
      for (int i = 0; i < KB; ++i) {
        const v8 x = splat(aw[i]);
        for (int j = 0; j < NV; ++j) acc[i][j] += x * gv[j];
      }
    }
  }
  for (int i = 0; i < KB; ++i)
    for (int j = 0; j < NV; ++j) store8(dk + (q0 + i) * cout + co0 + 8 * j, acc[i][j]);
}

template <int NV>
void WgradSlab(const Geometry& g, const std::vector<Span>& spans, int64_t co0, float* dk) {
  Tiled<TileRows<NV>()>(g.K(), [&](auto height, int64_t q0) {
    WgradTile<decltype(height)::value, NV>(spans, g.cout, q0, co0, dk);
  });
}

// Narrow outputs (Cout = 8, Cin % 8 == 0): vectors along the kernel rows instead, with the
// slab accumulated transposed, dkt[o][q]: per voxel QB contiguous window loads and 8
// broadcasts of dy feed 8*QB FMAs.
template <int QB>
void WgradNarrowTile(const std::vector<Span>& spans, int64_t K, int64_t q0, float* dkt) {
  v8 acc[8][QB];
  for (int o = 0; o < 8; ++o)
    for (int j = 0; j < QB; ++j) acc[o][j] = load8(dkt + o * K + q0 + 8 * j);
  for (const Span& sp : spans) {
    for (int64_t w = 0; w < sp.n; ++w) {
      v8 xv[QB];
      for (int j = 0; j < QB; ++j) xv[j] = load8(sp.a + w * sp.step + q0 + 8 * j);
      for (int o = 0; o < 8; ++o) {
        const v8 gv = splat(sp.dy[w * 8 + o]);
        for (int j = 0; j < QB; ++j) acc[o][j] += gv * xv[j];
      }
    }
  }
  for (int o = 0; o < 8; ++o)
    for (int j = 0; j < QB; ++j) store8(dkt + o * K + q0 + 8 * j, acc[o][j]);
}

// Adds the contribution of output rows [r0, r1) to dk, laid out (9 taps, 3*Cin, Cout), or
// for narrow outputs (9 taps, 8, 3*Cin). Per tap, the interior of each row is one span; the
// rows' border voxels (windows copied, zero-filled) are gathered into one more.
void WgradRows(const Geometry& g, const float* x, const float* dy, float* dk, int64_t r0,
               int64_t r1) {
  const int64_t K = g.K();
  const int nv = VectorsPerTile(g.cout);
  int64_t lo, hi;
  g.Interior(&lo, &hi);
  const int64_t nb = g.w - (hi - lo);
  std::vector<float> windows(nb * (r1 - r0) * K), border_dy;
  for (int64_t r = r0; r < r1; ++r)
    ForBorder(g, lo, hi, [&](int64_t ow) {
      const float* src = dy + (r * g.w + ow) * g.cout;
      border_dy.insert(border_dy.end(), src, src + g.cout);
    });
  std::vector<Span> spans;
  std::vector<RowTaps> taps;
  for (int64_t r = r0; r < r1; ++r) taps.emplace_back(g, x, r);
  for (int t = 0; t < 9; ++t) {
    spans.clear();
    float* win = windows.data();
    const float* bdy = border_dy.data();
    for (int64_t r = r0; r < r1; ++r) {
      const RowTaps& in = taps[r - r0];
      const float* dyrow = dy + r * g.w * g.cout;
      int n = 0;
      while (n < in.n && in.tap[n] != t) ++n;
      if (n == in.n) {  // this tap's input row lies outside: skip the row's border dy too
        bdy += nb * g.cout;
        continue;
      }
      if (hi > lo)
        spans.push_back({in.row[n] + (g.s * lo - g.pw) * g.cin, g.step(), dyrow + lo * g.cout, hi - lo});
      if (nb > 0) {
        // border windows of consecutive rows are contiguous, but their dy may not be (rows
        // skipped above), so each row's border voxels form their own span
        float* first = win;
        ForBorder(g, lo, hi, [&](int64_t ow) { in.CopyWindow(g, n, ow, win), win += K; });
        spans.push_back({first, K, bdy, nb});
        bdy += nb * g.cout;
      }
    }
    float* dkt = dk + t * K * g.cout;
    if (UseNarrowTiles(g)) {
      int64_t q = 0;
      for (; q + 24 <= K; q += 24) WgradNarrowTile<3>(spans, K, q, dkt);
      for (; q < K; q += 8) WgradNarrowTile<1>(spans, K, q, dkt);
      continue;
    }
    for (int64_t co0 = 0; co0 < g.cout; co0 += 8 * nv) {
      if (nv == 4) WgradSlab<4>(g, spans, co0, dkt);
      else if (nv == 2) WgradSlab<2>(g, spans, co0, dkt);
      else WgradSlab<1>(g, spans, co0, dkt);
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

ffi::Error Conv3dForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                             int64_t stride, int64_t pad_d, int64_t pad_h, int64_t pad_w) {
  Geometry g;
  if (ffi::Error e = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), stride,
                                  pad_d, pad_h, pad_w, &g);
      e.failure())
    return e;
  const float* in = x.typed_data();
  const float* k = kernel.typed_data();
  std::vector<float> kt;  // narrow tiles read the kernel transposed: (9 taps, 8, 3*Cin)
  if (UseNarrowTiles(g)) {
    const int64_t K = g.K();
    kt.resize(9 * 8 * K);
    for (int64_t t = 0; t < 9; ++t)
      for (int64_t q = 0; q < K; ++q)
        for (int64_t o = 0; o < 8; ++o) kt[(t * 8 + o) * K + q] = k[(t * K + q) * 8 + o];
  }
  float* out = y->typed_data();
  const int64_t rows = g.rows(), chunks = std::min<int64_t>(rows, 32);
  ParallelFor(pool, chunks, [&](int64_t c) {
    ForwardRows(g, in, k, kt.empty() ? nullptr : kt.data(), out, rows * c / chunks,
                rows * (c + 1) / chunks);
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
  // Up to 8 chunks, each with its own partial sum; fewer when a chunk would have under 64
  // output voxels, where zeroing and adding the partials would cost more than they save.
  const int64_t rows = g.rows();
  const int64_t chunks = std::clamp<int64_t>(rows * g.w / 64, 1, std::min<int64_t>(rows, 8));
  const int64_t size = 27 * g.cin * g.cout;
  std::vector<float> partial(chunks * size, 0.0f);
  const float* in = x.typed_data();
  const float* grad = dy.typed_data();
  ParallelFor(pool, chunks, [&](int64_t c) {
    WgradRows(g, in, grad, partial.data() + c * size, rows * c / chunks,
              rows * (c + 1) / chunks);
  });
  for (int64_t c = 1; c < chunks; ++c) {  // in chunk order: deterministic
    const float* p = partial.data() + c * size;
    for (int64_t i = 0; i < size; ++i) partial[i] += p[i];
  }
  float* out = dk->typed_data();
  if (UseNarrowTiles(g)) {  // (9, 8, 3*Cin) -> (9, 3*Cin, 8)
    const int64_t K = g.K();
    for (int64_t t = 0; t < 9; ++t)
      for (int64_t o = 0; o < 8; ++o)
        for (int64_t q = 0; q < K; ++q) out[(t * K + q) * 8 + o] = partial[(t * 8 + o) * K + q];
  } else {
    std::copy(partial.begin(), partial.begin() + size, out);
  }
  return ffi::Error::Success();
}

// Both kernels: thread pool, two float32 operands, one result, stride and low-side padding.
auto Signature() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("pad_d")
      .Attr<int64_t>("pad_h")
      .Attr<int64_t>("pad_w");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3dForward, Conv3dForwardImpl, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3dWeightGrad, Conv3dWeightGradImpl, Signature());
