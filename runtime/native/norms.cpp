// SiLU, group norm and channel RMS norm for MLX's CPU backend, on every core.
//
// MLX runs these memory-bound passes on its one stream thread (its exp is also scalar on x86, so
// vidport's Python-level SiLU is arithmetic MLX compiles); torch runs them vectorised on all cores.
// Each kernel here splits its array across threads; the loops are written so GCC vectorises them
// (compiled for AVX-512, AVX2 and baseline x86-64, picked at load time). float32, row-contiguous,
// channels last. Group norm sums deviations from a pivot, in float within blocks of rows and in
// double across them, in a fixed order.
#include "native.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace vidport {

#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, then 2^n from the
// exponent bits); below -87.3 (where float's normal range ends) it returns 0. Compiled without
// -ffast-math, so the rounding trick below is not optimised away.
static inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.3f;
  x = x < -87.3f ? -87.3f : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick (|x / ln2| < 127 here): branch-free, so it vectorises
  constexpr float kRound = 12582912.0f;
  float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

// x * sigmoid(x), with sigmoid from t = exp(-|x|) so nothing overflows: x >= 0: 1 / (1 + t),
// else t / (1 + t). Like torch, silu(-inf) is nan (-inf * 0) and nan stays nan.
static inline float silu_one(float x) {
  float t = exp_nonpositive(-std::fabs(x));
  float sigmoid = (x >= 0.0f ? 1.0f : t) / (1.0f + t);
  return x * sigmoid;
}

VECTOR_CLONES static void silu_range(const float* x, float* y, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) y[i] = silu_one(x[i]);
}

void silu(const float* x, float* y, size_t size, int threads) {
  parallel_for(size, threads, kMinElementsPerThread,
               [&](size_t begin, size_t end) { silu_range(x, y, begin, end); });
}

// y = x * scale[c] + shift[c] over rows of `channels` values
VECTOR_CLONES static void scale_shift_rows(const float* x, float* y, const float* scale,
                                          const float* shift, size_t rows, size_t channels) {
  for (size_t row = 0; row < rows; ++row) {
    const float* in = x + row * channels;
    float* out = y + row * channels;
    for (size_t c = 0; c < channels; ++c) out[c] = in[c] * scale[c] + shift[c];
  }
}

// per-channel sums of (x - pivot) and (x - pivot)^2 over rows [begin, end): float within blocks of
// 32 rows (float vectors are twice as wide), double across blocks. Summing deviations from a
// pivot near the mean (the image's first row) keeps E[d^2] - E[d]^2 from cancelling when the mean
// is large against the spread.
VECTOR_CLONES static void channel_sums(const float* x, const float* pivot, size_t begin, size_t end,
                                      size_t channels, double* sum, double* squares) {
  constexpr size_t kBlock = 32;
  std::vector<float> block_sum(channels), block_squares(channels);
  for (size_t first = begin; first < end; first += kBlock) {
    std::fill(block_sum.begin(), block_sum.end(), 0.0f);
    std::fill(block_squares.begin(), block_squares.end(), 0.0f);
    float* bs = block_sum.data();
    float* bq = block_squares.data();
    for (size_t row = first; row < std::min(end, first + kBlock); ++row) {
      const float* in = x + row * channels;
      for (size_t c = 0; c < channels; ++c) {
        const float d = in[c] - pivot[c];
        bs[c] += d;
        bq[c] += d * d;
      }
    }
    for (size_t c = 0; c < channels; ++c) {
      sum[c] += bs[c];
      squares[c] += bq[c];
    }
  }
}

void group_norm(const float* x, const float* weight, const float* bias, float* y, size_t batch,
                size_t positions, size_t channels, size_t groups, float eps, int threads) {
  const size_t per_group = channels / groups;
  // the rows are summed in `parts` fixed ranges, added in order: the result does not depend on timing
  const size_t rows_per_thread = std::max<size_t>(1, kMinElementsPerThread / channels);
  const size_t parts = std::max<size_t>(1, std::min<size_t>(size_t(threads), positions / rows_per_thread));
  std::vector<float> scale(channels), shift(channels);
  std::vector<double> sums(parts * channels * 2);
  for (size_t n = 0; n < batch; ++n) {
    const float* xn = x + n * positions * channels;
    float* yn = y + n * positions * channels;
    const float* pivot = xn;  // the first row
    std::fill(sums.begin(), sums.end(), 0.0);
    parallel_for(parts, int(parts), 1, [&](size_t first, size_t last) {
      for (size_t part = first; part < last; ++part) {
        channel_sums(xn, pivot, positions * part / parts, positions * (part + 1) / parts, channels,
                     &sums[part * channels * 2], &sums[part * channels * 2 + channels]);
      }
    });
    const double count = double(positions) * double(per_group);
    for (size_t g = 0; g < groups; ++g) {
      // per channel c: s1 = sum(x - p_c), s2 = sum((x - p_c)^2); the group mean m, then
      // sum((x - m)^2) = sum_c s2 + 2 (p_c - m) s1 + positions (p_c - m)^2
      std::vector<double> s1(per_group, 0.0), s2(per_group, 0.0);
      double total = 0.0;
      for (size_t i = 0; i < per_group; ++i) {
        const size_t c = g * per_group + i;
        for (size_t part = 0; part < parts; ++part) {
          s1[i] += sums[part * channels * 2 + c];
          s2[i] += sums[part * channels * 2 + channels + c];
        }
        total += s1[i] + double(positions) * pivot[c];
      }
      const double mean = total / count;
      double deviation = 0.0;
      for (size_t i = 0; i < per_group; ++i) {
        const double offset = pivot[g * per_group + i] - mean;
        deviation += s2[i] + 2.0 * offset * s1[i] + double(positions) * offset * offset;
      }
      const double inv_std = 1.0 / std::sqrt(std::max(deviation / count, 0.0) + eps);
      for (size_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const double w = weight ? weight[c] : 1.0, b = bias ? bias[c] : 0.0;
        scale[c] = float(inv_std * w);
        shift[c] = float(b - mean * inv_std * w);
      }
    }
    parallel_for(positions, threads, rows_per_thread, [&](size_t begin, size_t end) {
      scale_shift_rows(xn + begin * channels, yn + begin * channels, scale.data(), shift.data(),
                       end - begin, channels);
    });
  }
}

// x / max(||x||, 1e-12) * gamma over each row; the squares summed in 16 lanes (vectorisable)
VECTOR_CLONES static void rms_rows(const float* x, const float* gamma, float* y, size_t begin,
                                  size_t end, size_t channels) {
  constexpr size_t kLanes = 16;
  for (size_t row = begin; row < end; ++row) {
    const float* in = x + row * channels;
    float* out = y + row * channels;
    float lanes[kLanes] = {};
    size_t c = 0;
    for (; c + kLanes <= channels; c += kLanes) {
      for (size_t j = 0; j < kLanes; ++j) lanes[j] += in[c + j] * in[c + j];
    }
    float squares = 0.0f;
    for (; c < channels; ++c) squares += in[c] * in[c];
    for (size_t j = 0; j < kLanes; ++j) squares += lanes[j];
    const float inv = 1.0f / std::max(std::sqrt(squares), 1e-12f);
    for (c = 0; c < channels; ++c) out[c] = in[c] * inv * gamma[c];
  }
}

void rms_norm(const float* x, const float* gamma, float* y, size_t rows, size_t channels,
              int threads) {
  parallel_for(rows, threads, std::max<size_t>(1, kMinElementsPerThread / channels),
               [&](size_t begin, size_t end) {
    rms_rows(x, gamma, y, begin, end, channels);
  });
}

}  // namespace vidport
