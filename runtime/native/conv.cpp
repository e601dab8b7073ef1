// oneDNN's convolution as an MLX primitive, for MLX's CPU backend.
//
// MLX's CPU convolution unfolds the input (im2col) on its one stream thread into a buffer the size
// of the image times the kernel's taps, then makes one GEMM of it. oneDNN (the library torch's
// CPU convolutions run on) convolves directly, with kernels for the CPU's vector width, on every
// core. As an MLX primitive it takes part in MLX's lazy graph like mx.conv2d does: MLX allocates
// the output and calls eval_cpu, which queues the convolution on the stream's thread.
//
// Layouts are MLX's: input N x T x H x W x C, weight O x kt x kh x kw x C, output
// N x OT x OH x OW x O (a 2-D convolution is T = kt = 1); oneDNN reads them in place as ndhwc /
// odhwi. Stride 1, no dilation, one group, float32, zero padding (each axis's before and after
// counts may differ: the Wan VAE pads time on the past side only); vidport/runtime/native sends
// only those here. oneDNN's primitive for a shape is built once (it compiles its kernel then) and
// kept; the weights are reordered into its blocked layout on every call (a few ms at most).
#include <algorithm>
#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <omp.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace nb = nanobind;
namespace mx = mlx::core;

// threads per convolution; vidport.runtime.cpu_threads lowers it while several streams run at once
static std::atomic<int> conv_threads{int(std::max(1u, std::thread::hardware_concurrency()))};

struct ConvShape {
  int n, t, h, w, c, o, kt, kh, kw, pt, ph, pw, ot, oh, ow;
  bool bias;

  std::array<int, 16> key() const {
    return {n, t, h, w, c, o, kt, kh, kw, pt, ph, pw, ot, oh, ow, bias};
  }
};

struct Convolution {
  dnnl::convolution_forward::primitive_desc desc;
  dnnl::convolution_forward primitive;
};

static dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN's primitive for this shape, built on first use (one per shape a model has: a handful)
static std::shared_ptr<Convolution> convolution_for(const ConvShape& s) {
  static std::mutex mutex;
  static std::map<std::array<int, 16>, std::shared_ptr<Convolution>> built;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = built[s.key()];
  if (entry) return entry;
  using dnnl::memory;
  using tag = memory::format_tag;
  const auto f32 = memory::data_type::f32;
  memory::desc src({s.n, s.c, s.t, s.h, s.w}, f32, tag::ndhwc);
  memory::desc weights({s.o, s.c, s.kt, s.kh, s.kw}, f32, tag::any);  // oneDNN picks its blocking
  memory::desc dst({s.n, s.o, s.ot, s.oh, s.ow}, f32, tag::ndhwc);
  memory::dims strides{1, 1, 1}, before{s.pt, s.ph, s.pw};
  memory::dims after{s.ot - s.t + s.kt - 1 - s.pt, s.oh - s.h + s.kh - 1 - s.ph,
                     s.ow - s.w + s.kw - 1 - s.pw};
  const auto inference = dnnl::prop_kind::forward_inference;
  const auto direct = dnnl::algorithm::convolution_direct;
  // each call brings its own scratch memory: oneDNN's shared default is not safe for two MLX
  // streams convolving at once (vidport.runtime.cpu_threads)
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto desc = s.bias ? dnnl::convolution_forward::primitive_desc(
                           cpu_engine(), inference, direct, src, weights,
                           memory::desc({s.o}, f32, tag::x), dst, strides, before, after, attr)
                     : dnnl::convolution_forward::primitive_desc(
                           cpu_engine(), inference, direct, src, weights, dst, strides, before,
                           after, attr);
  entry = std::make_shared<Convolution>(Convolution{desc, dnnl::convolution_forward(desc)});
  return entry;
}

static void run_conv(const float* x, const float* w, const float* bias, float* out,
                     const ConvShape& s, int threads) {
  using dnnl::memory;
  omp_set_num_threads(threads);  // this thread's OpenMP team, which oneDNN runs on
  auto conv = convolution_for(s);
  auto& engine = cpu_engine();
  dnnl::stream stream(engine);
  memory user_weights({{s.o, s.c, s.kt, s.kh, s.kw}, memory::data_type::f32, memory::format_tag::odhwi},
                      engine, const_cast<float*>(w));
  memory weights = user_weights;
  if (conv->desc.weights_desc() != user_weights.get_desc()) {
    weights = memory(conv->desc.weights_desc(), engine);
    dnnl::reorder(user_weights, weights).execute(stream, user_weights, weights);
  }
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, memory(conv->desc.src_desc(), engine, const_cast<float*>(x))},
      {DNNL_ARG_WEIGHTS, weights},
      {DNNL_ARG_DST, memory(conv->desc.dst_desc(), engine, out)},
      {DNNL_ARG_SCRATCHPAD, memory(conv->desc.scratchpad_desc(), engine)}};
  if (bias) {
    args.emplace(DNNL_ARG_BIAS, memory(conv->desc.bias_desc(), engine, const_cast<float*>(bias)));
  }
  conv->primitive.execute(stream, args);
  stream.wait();
}

class Conv : public mx::UnaryPrimitive {
 public:
  // pad_t, pad_h, pad_w: the zeros before the first frame, row and column
  Conv(mx::Stream stream, int pad_t, int pad_h, int pad_w)
      : mx::UnaryPrimitive(stream), pad_t_(pad_t), pad_h_(pad_h), pad_w_(pad_w) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    const bool has_bias = inputs.size() > 2;
    ConvShape s{int(x.shape(0)), int(x.shape(1)), int(x.shape(2)), int(x.shape(3)),
                int(x.shape(4)), int(w.shape(0)), int(w.shape(1)), int(w.shape(2)),
                int(w.shape(3)), pad_t_, pad_h_, pad_w_, int(out.shape(1)), int(out.shape(2)),
                int(out.shape(3)), has_bias};
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& input : inputs) encoder.set_input_array(input);
    encoder.set_output_array(out);
    // data pointers are read when the task runs: an input's producer may set its buffer in its own
    // task (weak copies: MLX keeps the buffers alive until the stream has run this one)
    std::vector<mx::array> arrays;
    for (const auto& input : inputs) arrays.push_back(mx::array::unsafe_weak_copy(input));
    encoder.dispatch([arrays = std::move(arrays), out = mx::array::unsafe_weak_copy(out), s,
                      threads = conv_threads.load()]() mutable {
      const float* bias = arrays.size() > 2 ? arrays[2].data<float>() : nullptr;
      run_conv(arrays[0].data<float>(), arrays[1].data<float>(), bias, out.data<float>(), s, threads);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("vidport conv runs on the CPU only");
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

NB_MODULE(_native, m) {
  nb::module_::import_("mlx.core");
  m.doc() = "vidport's CPU kernels for MLX";
  m.def("conv", &conv, nb::arg("x"), nb::arg("weight"), nb::arg("bias") = nb::none(),
        nb::arg("padding"),
        "Stride-1 float32 convolution: N x T x H x W x C input, O x kt x kh x kw x C weight,\n"
        "padding ((before, after) of T, H, W).");
  m.def("set_conv_threads", [](int threads) { conv_threads = std::max(1, threads); },
        nb::arg("threads"));
  m.def("conv_threads", []() { return conv_threads.load(); });
}
