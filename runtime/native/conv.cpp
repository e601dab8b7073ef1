// oneDNN's direct convolution, for MLX's CPU backend (module.cpp makes it an MLX primitive).
//
// MLX's CPU convolution unfolds the input (im2col) on its one stream thread into a buffer the size
// of the image times the kernel's taps, then makes one GEMM of it. oneDNN (the library torch's
// CPU convolutions run on) convolves directly, with kernels for the CPU's vector width, on every
// core.
//
// Layouts are MLX's: input N x T x H x W x C, weight O x kt x kh x kw x C, output
// N x OT x OH x OW x O (a 2-D convolution is T = kt = 1); oneDNN reads them in place as ndhwc /
// odhwi. Stride 1, no dilation, one group, float32, zero padding (each axis's before and after
// counts may differ: the Wan VAE pads time on the past side only). oneDNN's primitive for a shape
// is built once (it compiles its kernel then) and kept; the weights are reordered into its blocked
// layout on every call (a few ms at most).
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "native.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace vidport {

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
  auto& entry = built[{s.n, s.t, s.h, s.w, s.c, s.o, s.kt, s.kh, s.kw, s.pt, s.ph, s.pw, s.ot, s.oh,
                       s.ow, s.bias}];
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

void convolve(const float* x, const float* w, const float* bias, float* out, const ConvShape& s,
              int threads) {
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

}  // namespace vidport
