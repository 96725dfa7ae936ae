// Instance normalisation for XLA:CPU, float32, x laid out (B, V, C) (channels-last volumes
// with the voxels flattened). Per (sample b, channel c), over the V voxels:
//
//   forward   mean, rstd = 1/sqrt(var + eps)   (two passes: exact when |mean| >> std)
//             y = (x - mean) * rstd * scale + bias
//   backward  xhat = (x - mean) * rstd,  s1 = sum dy,  s2 = sum dy * xhat
//             dx = scale * rstd * (dy - s1/V - xhat * s2/V)   (s1, s2 returned for the
//             gradients of bias and scale)
//
// XLA:CPU ran the reductions of this over the voxel axis up to 40x below memory speed at
// (1, 64^3, 16) (benchmarks/README.md). Here every pass streams the data once, vectorised
// over channels, on XLA's thread pool. The voxels are cut into a number of blocks fixed by
// the shape; block sums are added in block order, so results do not depend on the threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using timm_jax::ParallelFor;

constexpr int64_t kBlock = 4096;  // voxels per block

struct Blocks {
  int64_t b, v, c, per_sample;
  Blocks(int64_t b_, int64_t v_, int64_t c_)
      : b(b_), v(v_), c(c_), per_sample(std::max<int64_t>(1, (v_ + kBlock - 1) / kBlock)) {}
  int64_t count() const { return b * per_sample; }
  int64_t sample(int64_t i) const { return i / per_sample; }
  int64_t begin(int64_t i) const { return (i % per_sample) * v / per_sample; }
  int64_t end(int64_t i) const { return (i % per_sample + 1) * v / per_sample; }
};

// out[s, :] = sum over blocks of sample s of part[block, :] (doubles, in block order).
void SumBlocks(const Blocks& k, const std::vector<double>& part, std::vector<double>& out) {
  out.assign(k.b * k.c, 0.0);
  for (int64_t i = 0; i < k.count(); ++i)
    for (int64_t ch = 0; ch < k.c; ++ch) out[k.sample(i) * k.c + ch] += part[i * k.c + ch];
}

ffi::Error CheckShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> pd) {
  if (xd.size() != 3)
    return ffi::Error::InvalidArgument("instance_norm_cpu: x must be (B, voxels, C)");
  if (pd.size() != 1 || pd[0] != xd[2])
    return ffi::Error::InvalidArgument("instance_norm_cpu: scale and bias must be (C,)");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean_out, ffi::ResultBuffer<ffi::F32> rstd_out,
                       float eps) {
  if (ffi::Error e = CheckShapes(x.dimensions(), scale.dimensions()); e.failure()) return e;
  const Blocks k(x.dimensions()[0], x.dimensions()[1], x.dimensions()[2]);
  const int64_t C = k.c;
  const float* xs = x.typed_data();
  std::vector<double> part(k.count() * C), total;
  // pass 1: means
  ParallelFor(pool, k.count(), [&](int64_t i) {
    std::vector<float> buf(C, 0.0f);
    float* __restrict acc = buf.data();
    const float* __restrict p = xs + (k.sample(i) * k.v + k.begin(i)) * C;
    for (int64_t v = k.begin(i); v < k.end(i); ++v, p += C)
      for (int64_t ch = 0; ch < C; ++ch) acc[ch] += p[ch];
    std::copy(buf.begin(), buf.end(), part.begin() + i * C);
  });
  SumBlocks(k, part, total);
  std::vector<float> mean(k.b * C);
  for (int64_t j = 0; j < k.b * C; ++j) mean[j] = float(total[j] / k.v);
  // pass 2: centred variances
  ParallelFor(pool, k.count(), [&](int64_t i) {
    std::vector<float> buf(C, 0.0f);
    float* __restrict acc = buf.data();
    const float* __restrict m = mean.data() + k.sample(i) * C;
    const float* __restrict p = xs + (k.sample(i) * k.v + k.begin(i)) * C;
    for (int64_t v = k.begin(i); v < k.end(i); ++v, p += C)
      for (int64_t ch = 0; ch < C; ++ch) acc[ch] += (p[ch] - m[ch]) * (p[ch] - m[ch]);
    std::copy(buf.begin(), buf.end(), part.begin() + i * C);
  });
  SumBlocks(k, part, total);
  // pass 3: y = x * mul + shift
  std::vector<float> mul(k.b * C), shift(k.b * C);
  float* mo = mean_out->typed_data();
  float* ro = rstd_out->typed_data();
  for (int64_t j = 0; j < k.b * C; ++j) {
    const float rstd = 1.0f / std::sqrt(float(total[j] / k.v) + eps);
    mo[j] = mean[j];
    ro[j] = rstd;
    mul[j] = rstd * scale.typed_data()[j % C];
    shift[j] = bias.typed_data()[j % C] - mean[j] * mul[j];
  }
  float* ys = y->typed_data();
  ParallelFor(pool, k.count(), [&](int64_t i) {
    const float* __restrict a = mul.data() + k.sample(i) * C;
    const float* __restrict s = shift.data() + k.sample(i) * C;
    const int64_t off = (k.sample(i) * k.v + k.begin(i)) * C;
    const float* __restrict p = xs + off;
    float* __restrict q = ys + off;
    for (int64_t v = k.begin(i); v < k.end(i); ++v, p += C, q += C)
      for (int64_t ch = 0; ch < C; ++ch) q[ch] = p[ch] * a[ch] + s[ch];
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> sum_dy, ffi::ResultBuffer<ffi::F32> sum_dy_xhat) {
  if (ffi::Error e = CheckShapes(x.dimensions(), scale.dimensions()); e.failure()) return e;
  const Blocks k(x.dimensions()[0], x.dimensions()[1], x.dimensions()[2]);
  const int64_t C = k.c;
  const float* xs = x.typed_data();
  const float* gs = dy.typed_data();
  const float* ms = mean.typed_data();
  const float* rs = rstd.typed_data();
  // pass 1: s1 = sum dy, s2 = sum dy * xhat
  std::vector<double> p1(k.count() * C), p2(k.count() * C), s1, s2;
  ParallelFor(pool, k.count(), [&](int64_t i) {
    std::vector<float> b1(C, 0.0f), b2(C, 0.0f);  // sums of dy and of dy * (x - mean)
    float* __restrict a1 = b1.data();
    float* __restrict a2 = b2.data();
    const float* __restrict m = ms + k.sample(i) * C;
    const int64_t off = (k.sample(i) * k.v + k.begin(i)) * C;
    const float* __restrict p = xs + off;
    const float* __restrict g = gs + off;
    for (int64_t v = k.begin(i); v < k.end(i); ++v, p += C, g += C)
      for (int64_t ch = 0; ch < C; ++ch) {
        a1[ch] += g[ch];
        a2[ch] += g[ch] * (p[ch] - m[ch]);
      }
    const float* r = rs + k.sample(i) * C;
    for (int64_t ch = 0; ch < C; ++ch) b2[ch] *= r[ch];
    std::copy(b1.begin(), b1.end(), p1.begin() + i * C);
    std::copy(b2.begin(), b2.end(), p2.begin() + i * C);
  });
  SumBlocks(k, p1, s1);
  SumBlocks(k, p2, s2);
  // pass 2: dx = scale * rstd * (dy - s1/V - xhat * s2/V)
  std::vector<float> c0(k.b * C), c1(k.b * C);  // dx = a * dy + c0 + c1 * x, a = scale*rstd
  std::vector<float> a(k.b * C);
  for (int64_t j = 0; j < k.b * C; ++j) {
    const float r = rs[j], sc = scale.typed_data()[j % C];
    const float mean1 = float(s1[j] / k.v), mean2 = float(s2[j] / k.v);
    a[j] = sc * r;
    c1[j] = -sc * r * r * mean2;                        // coefficient of x
    c0[j] = -sc * r * mean1 + sc * r * r * mean2 * ms[j];  // the rest
    sum_dy->typed_data()[j] = float(s1[j]);
    sum_dy_xhat->typed_data()[j] = float(s2[j]);
  }
  float* out = dx->typed_data();
  ParallelFor(pool, k.count(), [&](int64_t i) {
    const int64_t s = k.sample(i) * C;
    const float* __restrict ka = a.data() + s;
    const float* __restrict k0 = c0.data() + s;
    const float* __restrict k1 = c1.data() + s;
    const int64_t off = (k.sample(i) * k.v + k.begin(i)) * C;
    const float* __restrict p = xs + off;
    const float* __restrict g = gs + off;
    float* __restrict q = out + off;
    for (int64_t v = k.begin(i); v < k.end(i); ++v, p += C, g += C, q += C)
      for (int64_t ch = 0; ch < C; ++ch) q[ch] = ka[ch] * g[ch] + k1[ch] * p[ch] + k0[ch];
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstanceNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstanceNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
