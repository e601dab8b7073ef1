// vidport's native kernels as MLX primitives, and the Python module (nanobind) that makes them.
//
// A primitive takes part in MLX's lazy graph like MLX's own operations: MLX allocates nothing for
// it; eval_cpu allocates the output and queues the kernel on the stream's thread (the command
// encoder), where the inputs' data pointers are read: an input's producer may set its buffer in its
// own queued task. Weak copies keep no reference; MLX keeps the buffers alive until the stream has
// run the task.
#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "native.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace vidport {

std::atomic<int> kernel_threads{int(std::max(1u, std::thread::hardware_concurrency()))};
// at most this many threads when > 0: the cores other processes leave free (vidport.runtime.cpu_load)
std::atomic<int> thread_limit{0};

// Allocate `out`, then run kernel(inputs, out, threads) on the primitive's stream.
using Kernel = std::function<void(std::vector<mx::array>&, mx::array&, int)>;

static void queue(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out, Kernel kernel) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  std::vector<mx::array> weak;
  for (const auto& input : inputs) {
    encoder.set_input_array(input);
    weak.push_back(mx::array::unsafe_weak_copy(input));
  }
  encoder.set_output_array(out);
  encoder.dispatch([weak = std::move(weak), out = mx::array::unsafe_weak_copy(out),
                    kernel = std::move(kernel), threads = kernel_threads.load()]() mutable {
    int limit = thread_limit.load();  // read as the kernel starts: the load may have changed since
    kernel(weak, out, limit > 0 ? std::min(threads, limit) : threads);
  });
}

// The primitives here compute on the CPU only (MLX's GPU backends have their own kernels).
class CpuPrimitive : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("vidport's native kernels run on the CPU only");
  }
};

class Conv : public CpuPrimitive {
 public:
  // pad_t, pad_h, pad_w: the zeros before the first frame, row and column
  Conv(mx::Stream stream, int pad_t, int pad_h, int pad_w)
      : CpuPrimitive(stream), pad_t_(pad_t), pad_h_(pad_h), pad_w_(pad_w) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    ConvShape s{int(x.shape(0)), int(x.shape(1)), int(x.shape(2)), int(x.shape(3)),
                int(x.shape(4)), int(w.shape(0)), int(w.shape(1)), int(w.shape(2)),
                int(w.shape(3)), pad_t_, pad_h_, pad_w_, int(out.shape(1)), int(out.shape(2)),
                int(out.shape(3)), inputs.size() > 2};
    const double multiply_adds = double(out.size()) * s.kt * s.kh * s.kw * s.c;
    queue(stream(), inputs, out, [s, multiply_adds](std::vector<mx::array>& in, mx::array& o, int threads) {
      convolve(in[0].data<float>(), in[1].data<float>(), s.bias ? in[2].data<float>() : nullptr,
               o.data<float>(), s, multiply_adds < kMinConvMultiplyAdds ? 1 : threads);
    });
  }

  const char* name() const override { return "VidportConv"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& conv = static_cast<const Conv&>(other);
    return pad_t_ == conv.pad_t_ && pad_h_ == conv.pad_h_ && pad_w_ == conv.pad_w_;
  }

 private:
  int pad_t_, pad_h_, pad_w_;
};

using Padding = std::array<std::pair<int, int>, 3>;  // (before, after) for T, H, W

static mx::array conv(const mx::array& x, const mx::array& w, std::optional<mx::array> bias,
                      const Padding& padding) {
  if (x.ndim() != 5 || w.ndim() != 5 || x.shape(4) != w.shape(4)) {
    throw std::invalid_argument(
        "vidport conv: input N x T x H x W x C and weight O x kt x kh x kw x C");
  }
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32) {
    throw std::invalid_argument("vidport conv: float32 only");
  }
  int out[3];
  for (int axis = 0; axis < 3; ++axis) {
    auto [before, after] = padding[axis];
    if (before < 0 || after < 0) throw std::invalid_argument("vidport conv: negative padding");
    out[axis] = x.shape(1 + axis) + before + after - w.shape(1 + axis) + 1;
    if (out[axis] < 1) {
      throw std::invalid_argument("vidport conv: kernel larger than the padded input");
    }
  }
  auto stream = mx::to_stream({});
  std::vector<mx::array> inputs{mx::contiguous(x, false, stream), mx::contiguous(w, false, stream)};
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != w.shape(0) || bias->dtype() != mx::float32) {
      throw std::invalid_argument("vidport conv: bias must be float32, one per output channel");
    }
    inputs.push_back(mx::contiguous(*bias, false, stream));
  }
  return mx::array({x.shape(0), out[0], out[1], out[2], w.shape(0)}, mx::float32,
                   std::make_shared<Conv>(stream, padding[0].first, padding[1].first,
                                          padding[2].first),
                   std::move(inputs));
}

// SiLU, group norm or channel RMS norm (norms.cpp) over a float32 array, channels last
class RowKernel : public CpuPrimitive {
 public:
  enum class Kind { silu, group_norm, rms_norm };

  RowKernel(mx::Stream stream, Kind kind, int groups = 0, float eps = 0.0f)
      : CpuPrimitive(stream), kind_(kind), groups_(groups), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const size_t size = out.size(), channels = size_t(out.shape(-1));
    const size_t batch = size_t(out.shape(0)), positions = size / batch / channels;
    queue(stream(), inputs, out, [kind = kind_, groups = groups_, eps = eps_, size, channels, batch,
                                  positions](std::vector<mx::array>& in, mx::array& o, int threads) {
      const float* x = in[0].data<float>();
      float* y = o.data<float>();
      if (kind == Kind::silu) {
        silu(x, y, size, threads);
      } else if (kind == Kind::group_norm) {
        group_norm(x, in.size() > 1 ? in[1].data<float>() : nullptr,
                   in.size() > 2 ? in[2].data<float>() : nullptr, y, batch, positions, channels,
                   size_t(groups), eps, threads);
      } else {
        rms_norm(x, in[1].data<float>(), y, size / channels, channels, threads);
      }
    });
  }

  const char* name() const override { return "VidportRowKernel"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& kernel = static_cast<const RowKernel&>(other);
    return kind_ == kernel.kind_ && groups_ == kernel.groups_ && eps_ == kernel.eps_;
  }

 private:
  Kind kind_;
  int groups_;
  float eps_;
};

static void check_float32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string("vidport: ") + what + " must be float32");
}

static mx::array row_kernel(const mx::array& x, std::vector<mx::array> params, RowKernel::Kind kind,
                            int groups = 0, float eps = 0.0f) {
  check_float32(x, "the input");
  auto stream = mx::to_stream({});
  std::vector<mx::array> inputs{mx::contiguous(x, false, stream)};
  for (auto& p : params) {
    check_float32(p, "a norm's weight or bias");
    if (p.ndim() != 1 || p.shape(0) != x.shape(-1)) {
      throw std::invalid_argument("vidport: a norm's weight and bias have one value per channel (last axis)");
    }
    inputs.push_back(mx::contiguous(p, false, stream));
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<RowKernel>(stream, kind, groups, eps),
                   std::move(inputs));
}

static mx::array silu_op(const mx::array& x) { return row_kernel(x, {}, RowKernel::Kind::silu); }

static mx::array group_norm_op(const mx::array& x, std::optional<mx::array> weight,
                               std::optional<mx::array> bias, int groups, float eps) {
  if (x.ndim() < 2 || groups < 1 || x.shape(-1) % groups != 0) {
    throw std::invalid_argument("vidport group_norm: input (N, ..., C) with C divisible by groups");
  }
  if (weight.has_value() != bias.has_value()) {
    throw std::invalid_argument("vidport group_norm: give both weight and bias, or neither");
  }
  std::vector<mx::array> params;
  if (weight) params = {*weight, *bias};
  return row_kernel(x, std::move(params), RowKernel::Kind::group_norm, groups, eps);
}

static mx::array rms_norm_op(const mx::array& x, const mx::array& gamma) {
  return row_kernel(x, {gamma}, RowKernel::Kind::rms_norm);
}

}  // namespace vidport

NB_MODULE(_native, m) {
  using namespace vidport;
  nb::module_::import_("mlx.core");
  m.doc() = "vidport's CPU kernels for MLX";
  m.def("conv", &conv, nb::arg("x"), nb::arg("weight"), nb::arg("bias") = nb::none(),
        nb::arg("padding"),
        "Stride-1 float32 convolution: N x T x H x W x C input, O x kt x kh x kw x C weight,\n"
        "padding ((before, after) of T, H, W).");
  m.def("silu", &silu_op, nb::arg("x"), "x * sigmoid(x), float32.");
  m.def("group_norm", &group_norm_op, nb::arg("x"), nb::arg("weight").none(), nb::arg("bias").none(),
        nb::arg("groups"), nb::arg("eps"),
        "Group norm over (N, ..., C), statistics per image and group of channels, float32.");
  m.def("rms_norm", &rms_norm_op, nb::arg("x"), nb::arg("gamma"),
        "x / max(||x||, 1e-12) * gamma over the last axis, float32.");
  m.def("set_threads", [](int threads) { kernel_threads = std::max(1, threads); }, nb::arg("threads"));
  m.def("threads", []() { return kernel_threads.load(); });
  m.def("set_thread_limit", [](int threads) { thread_limit = std::max(0, threads); }, nb::arg("threads"),
        "At most `threads` threads per kernel from now on; 0 lifts the cap.");
  m.def("thread_limit", []() { return thread_limit.load(); });
}
