// What vidport's native kernels share: the thread count and a parallel loop (OpenMP, the runtime
// oneDNN already runs on, so one team of threads serves every kernel), and the kernels themselves,
// which module.cpp wraps as MLX primitives.
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>

namespace vidport {

// threads per kernel; vidport.runtime.cpu_threads lowers it while several MLX streams run at once
extern std::atomic<int> kernel_threads;

// Work per thread below which a kernel stays on one thread. Threads meet at the end of every
// parallel region; beside another busy process one of them is often descheduled for a whole time
// slice, so short regions lose more by waiting than they gain (the OpenBLAS shim's rule for
// products, 4 M multiply-adds, is the same idea).
constexpr size_t kMinElementsPerThread = size_t(1) << 18;
constexpr double kMinConvMultiplyAdds = 16.0 * 1024 * 1024;

// body(begin, end) over [0, count) in contiguous parts, one per thread, each at least `grain` long
template <class Body>
void parallel_for(size_t count, int threads, size_t grain, Body body) {
  int parts = int(std::max<size_t>(1, std::min<size_t>(size_t(threads), count / std::max<size_t>(grain, 1))));
  if (parts == 1) {
    body(size_t(0), count);
    return;
  }
#pragma omp parallel num_threads(parts)
  {
    size_t part = size_t(omp_get_thread_num()), total = size_t(omp_get_num_threads());
    body(count * part / total, count * (part + 1) / total);
  }
}

struct ConvShape {
  int n, t, h, w, c, o, kt, kh, kw, pt, ph, pw, ot, oh, ow;
  bool bias;
};

// conv.cpp: oneDNN's direct convolution (layouts in conv.cpp)
void convolve(const float* x, const float* w, const float* bias, float* out, const ConvShape& s,
              int threads);

// norms.cpp: float32, rows of `channels` contiguous values
void silu(const float* x, float* y, size_t size, int threads);
void group_norm(const float* x, const float* weight, const float* bias, float* y, size_t batch,
                size_t positions, size_t channels, size_t groups, float eps, int threads);
void rms_norm(const float* x, const float* gamma, float* y, size_t rows, size_t channels,
              int threads);

}  // namespace vidport
