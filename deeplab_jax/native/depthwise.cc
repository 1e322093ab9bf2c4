// Atrous depthwise convolution for XLA:CPU through XLA FFI: forward, input gradient, filter gradient.
//
// Why: XLA:CPU lowers feature_group_count convolutions to a slow generic loop (PERF_NOTES.md), and
// DeepLabv3+ is mostly atrous depthwise convs. Layout NHWC, float32, kernel (KH, KW, C); the padding
// (pad_top, pad_left): the official fixed_padding rule or TF SAME; the far side is implied by the output size.
// Work is split over (image, row) on XLA's intra-op thread pool; the channel loop vectorises.
// Every result is a function of its inputs only (fixed chunking, ordered reduction): runs repeat.
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

// Bumped whenever the handlers' signatures change; Python refuses a library built from another one.
constexpr int64_t kVersion = 1;

struct Geometry {
  int64_t n, h, w, c;      // input
  int64_t oh, ow;          // output
  int64_t kh, kw;          // kernel taps
  int64_t stride, rate, pad_top, pad_left;

  static Geometry Of(ffi::AnyBuffer::Dimensions in, ffi::AnyBuffer::Dimensions out,
                     ffi::AnyBuffer::Dimensions kernel, int64_t stride, int64_t rate,
                     int64_t pad_top, int64_t pad_left) {
    return {in[0], in[1], in[2], in[3], out[1], out[2], kernel[0], kernel[1],
            stride, rate, pad_top, pad_left};
  }

  // Output columns [begin, end) whose tap j reads an input column inside [0, w).
  void Columns(int64_t j, int64_t* begin, int64_t* end) const {
    const int64_t offset = j * rate - pad_left;  // input column = ow * stride + offset
    int64_t b = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
    int64_t e = (w - 1 - offset) >= 0 ? (w - 1 - offset) / stride + 1 : 0;
    *begin = std::min(b, ow);
    *end = std::max(*begin, std::min(e, ow));
  }
};

// Runs body(chunk) for chunk in [0, chunks) on the pool's threads and the calling thread, and
// returns when all are done. Late pool tasks find no chunk left and touch only the shared counters.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < chunks; ++i) body(i);
    return;
  }
  auto state = std::make_shared<State>();
  const Body* shared_body = &body;  // alive until every chunk is done (we wait below)
  auto work = [state, shared_body, chunks]() {
    int64_t mine = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < chunks; ++mine) (*shared_body)(i);
    if (mine > 0) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += mine;
      if (state->done == chunks) state->cv.notify_all();
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == chunks; });
}

inline void MultiplyAdd(float* __restrict out, const float* __restrict a,
                        const float* __restrict b, int64_t c) {
  for (int64_t k = 0; k < c; ++k) out[k] += a[k] * b[k];
}

ffi::Error CheckRank(ffi::AnyBuffer::Dimensions dims, size_t rank, const char* what) {
  if (dims.size() != rank) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(what) + " has the wrong rank");
  }
  return ffi::Error::Success();
}

// out[row, col, :] = sum over taps (i, j) of src[row_of(row, i)][col_of(col, j)] * k[i, j, :], where
// row_of gives a source row's first element (nullptr: no row for this tap) and col_of a source column
// (-1: none). Rows are split over the pool; the source rows are found once per output row, and each
// output pixel's C-vector stays in L1 while its taps accumulate.
template <typename RowOf, typename ColOf>
void SumOfTaps(ffi::ThreadPool& pool, const Geometry& g, int64_t rows, int64_t cols,
               const float* kp, float* out, const RowOf& row_of, const ColOf& col_of) {
  ParallelFor(pool, rows, [&](int64_t row) {
    std::vector<const float*> sources(g.kh);
    for (int64_t i = 0; i < g.kh; ++i) sources[i] = row_of(row, i);
    for (int64_t col = 0; col < cols; ++col) {
      float* pixel = out + (row * cols + col) * g.c;
      std::memset(pixel, 0, sizeof(float) * g.c);
      for (int64_t i = 0; i < g.kh; ++i) {
        if (sources[i] == nullptr) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t source_col = col_of(col, j);
          if (source_col < 0) continue;
          MultiplyAdd(pixel, sources[i] + source_col * g.c, kp + (i * g.kw + j) * g.c, g.c);
        }
      }
    }
  });
}

// y[n, oh, ow, c] = sum_ij x[n, oh*s + i*r - pt, ow*s + j*r - pl, c] * k[i, j, c]
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t rate, int64_t pad_top,
                   int64_t pad_left) {
  if (auto e = CheckRank(x.dimensions(), 4, "x"); e.failure()) return e;
  const Geometry g = Geometry::Of(x.dimensions(), y->dimensions(), k.dimensions(), stride, rate,
                                  pad_top, pad_left);
  const float* xp = x.typed_data();
  SumOfTaps(
      pool, g, g.n * g.oh, g.ow, k.typed_data(), y->typed_data(),
      [&](int64_t row, int64_t i) -> const float* {
        const int64_t n = row / g.oh, ih = (row % g.oh) * g.stride + i * g.rate - g.pad_top;
        return ih < 0 || ih >= g.h ? nullptr : xp + (n * g.h + ih) * g.w * g.c;
      },
      [&](int64_t ow, int64_t j) -> int64_t {
        const int64_t iw = ow * g.stride + j * g.rate - g.pad_left;
        return iw < 0 || iw >= g.w ? -1 : iw;
      });
  return ffi::Error::Success();
}

// dx[n, ih, iw, c] = sum over the (oh, ow, i, j) that read it of dy[n, oh, ow, c] * k[i, j, c];
// gathered per input pixel so that no two threads write the same element.
ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t rate, int64_t pad_top,
                     int64_t pad_left) {
  if (auto e = CheckRank(dy.dimensions(), 4, "dy"); e.failure()) return e;
  const Geometry g = Geometry::Of(dx->dimensions(), dy.dimensions(), k.dimensions(), stride, rate,
                                  pad_top, pad_left);
  const float* gp = dy.typed_data();
  SumOfTaps(
      pool, g, g.n * g.h, g.w, k.typed_data(), dx->typed_data(),
      [&](int64_t row, int64_t i) -> const float* {
        const int64_t n = row / g.h, t = row % g.h + g.pad_top - i * g.rate;  // t = oh * stride
        if (t < 0 || t % g.stride != 0 || t / g.stride >= g.oh) return nullptr;
        return gp + (n * g.oh + t / g.stride) * g.ow * g.c;
      },
      [&](int64_t iw, int64_t j) -> int64_t {
        const int64_t u = iw + g.pad_left - j * g.rate;  // = ow * stride
        return u < 0 || u % g.stride != 0 || u / g.stride >= g.ow ? -1 : u / g.stride;
      });
  return ffi::Error::Success();
}

// dk[i, j, c] = sum_{n, oh, ow} x[n, oh*s + i*r - pt, ow*s + j*r - pl, c] * dy[n, oh, ow, c].
// Fixed chunks of output rows each fill their own partial sum; the partials are added in order.
ffi::Error FilterGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t stride, int64_t rate,
                      int64_t pad_top, int64_t pad_left) {
  if (auto e = CheckRank(x.dimensions(), 4, "x"); e.failure()) return e;
  const Geometry g = Geometry::Of(x.dimensions(), dy.dimensions(), dk->dimensions(), stride, rate,
                                  pad_top, pad_left);
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  const int64_t taps = g.kh * g.kw * g.c, rows = g.n * g.oh;
  const int64_t chunks = std::min<int64_t>(rows, 16);
  std::vector<float> partial(chunks * taps, 0.0f);
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    float* acc = partial.data() + chunk * taps;
    for (int64_t row = chunk * rows / chunks; row < (chunk + 1) * rows / chunks; ++row) {
      const int64_t n = row / g.oh, oh = row % g.oh;
      const float* grad = gp + row * g.ow * g.c;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.stride + i * g.rate - g.pad_top;
        if (ih < 0 || ih >= g.h) continue;
        const float* in = xp + (n * g.h + ih) * g.w * g.c;
        for (int64_t j = 0; j < g.kw; ++j) {
          int64_t begin, end;
          g.Columns(j, &begin, &end);
          float* tap = acc + (i * g.kw + j) * g.c;
          const int64_t offset = j * g.rate - g.pad_left;
          for (int64_t ow = begin; ow < end; ++ow) {
            MultiplyAdd(tap, in + (ow * g.stride + offset) * g.c, grad + ow * g.c, g.c);
          }
        }
      }
    }
  });
  float* out = dk->typed_data();
  std::memcpy(out, partial.data(), sizeof(float) * taps);
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const float* p = partial.data() + chunk * taps;
    for (int64_t t = 0; t < taps; ++t) out[t] += p[t];
  }
  return ffi::Error::Success();
}

}  // namespace

#define DEEPLAB_DEPTHWISE_BINDING(first, second, result)  \
  ffi::Ffi::Bind()                                        \
      .Ctx<ffi::ThreadPool>()                             \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Ret<ffi::Buffer<ffi::F32>>()                       \
      .Attr<int64_t>("stride")                            \
      .Attr<int64_t>("rate")                              \
      .Attr<int64_t>("pad_top")                           \
      .Attr<int64_t>("pad_left")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepLabDepthwiseForward, Forward,
                              DEEPLAB_DEPTHWISE_BINDING(x, k, y));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepLabDepthwiseInputGrad, InputGrad,
                              DEEPLAB_DEPTHWISE_BINDING(dy, k, dx));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepLabDepthwiseFilterGrad, FilterGrad,
                              DEEPLAB_DEPTHWISE_BINDING(x, dy, dk));

extern "C" __attribute__((visibility("default"))) int64_t DeepLabDepthwiseVersion() {
  return kVersion;
}
