// lrfast._C: fused CPU optimizer steps over K candidates at once.
//
// Every buffer is an fp32 [K, N] array whose rows are contiguous (row k = candidate k's flat parameters, at row
// stride `ld` for p, m, v, buf and `ldg` for g: one parameter's columns of a wider arena, and a grad autograd made)
// passed as a raw address (an int from Tensor.data_ptr(): ~0.1 us per tensor, where Tensor.numpy() +
// pybind11::array_t costs ~1 us), and lr is a float64 [K] array. lrfast/kernels/cpu.py checks dtype, device, the
// rows' contiguity and strides, and shapes before calling; nothing here
// can check them again. A row whose lr is exactly 0 is frozen: it is neither read nor written.
//
// The per-element maths copies torch.optim's single-tensor (foreach=False) path op by op, in fp32, with the scalars
// computed in double and cast to float as torch casts a Python scalar: see lrfast/kernels/reference.py, which is the
// spec. Where ATen's vectorized kernels use an FMA (add with alpha, lerp, addcmul) the AVX2/AVX-512 builds use one too;
// elsewhere the file is compiled with -ffp-contract=off so that no other multiply-add is fused.
//
// On x86 each kernel is compiled three times (baseline x86-64, AVX2+FMA, AVX-512) and picked at import from what the
// CPU runs, as ATen picks its CPU capability, so the wheel stays portable (no -march). Elsewhere (aarch64, ppc64le,
// ...) one portable build serves ('default'), fused where the target has a fast fmaf (__FP_FAST_FMAF: aarch64), as
// ATen's NEON / VSX Vectorized fmadd is. AVX2 is preferred over AVX-512:
// same results lane for lane, and on the project's Xeon (AVX-512) it was 5-10 % faster in cache (AdamW 10k params,
// one thread: 5.8 vs 6.4 us; 100k: 40 vs 44 us) and equal at 1M (memory-bound). LRFAST_CPU_ISA or set_isa() override.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#define LRFAST_X86 1
#else
#define LRFAST_X86 0
#endif

#ifdef __FP_FAST_FMAF
constexpr bool kDefaultFma = true;  // aarch64 and other targets with a hardware fmaf: ATen's Vectorized fmadd fuses
#else
constexpr bool kDefaultFma = false;  // x86-64 baseline: ATen's DEFAULT capability rounds a*b + c twice
#endif

namespace py = pybind11;

namespace {

// Threads: as many as torch.get_num_threads() (passed per call, so torch.set_num_threads governs lrfast too), each
// taking at least kMinElementsPerThread elements of the flattened [active rows, N] space. Plain std::threads made
// per call and joined: no second OpenMP pool beside torch's, nothing spinning between steps when other jobs share
// the cores (libgomp's workers spin after a region: with it, K = 1 on the digits MLP went 0.64x -> 1.17x of a bare
// torch loop's step when two other jobs shared the 2 cores), and nothing to go wrong across fork() (DataLoader
// workers). A thread costs ~20-40 us to start and join here, and the step is memory-bound: on the 2-core machines a
// second thread measured slower below ~400k elements (AdamW, 300k: 120-148 us on 1 thread, 193-220 us on 2), even
// at 600k, and faster from ~1M (1.2M: 516-811 vs 395-552 us). So a thread takes at least 2^19 elements.
constexpr int64_t kMinElementsPerThread = 1 << 19;
std::atomic<int> g_last_threads{0};  // threads of the last step that had work (tests: torch's thread count governs)
// Thread ranges start on a multiple of 16 floats (64 B) of the flattened [active rows, N] space.
constexpr int64_t kAlignElements = 16;

enum class Isa : int { Default = 0, Avx2 = 1, Avx512 = 2 };

// ----------------------------------------------------------------------------------------------------------------
// Per-element bodies (generic; inlined into each ISA's wrappers below, which set the instruction set).

template <bool kFma>
inline __attribute__((always_inline)) float madd(float a, float b, float c) {
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);  // ATen's Vectorized fmadd on AVX2/AVX-512
  } else {
    return a * b + c;  // ATen's DEFAULT capability on x86: unfused
  }
}

// x / c, bitwise equal to the IEEE division, for x >= 0 and a constant c in (0, 1] with r = RN(1/c) precomputed.
// With an FMA: q = RN(x*r), then one Markstein correction q + RN(x - q*c)*r (the remainder is exact). Checked
// exhaustively against x / c for all 2^23 mantissas of x and 20,006 values of c (edge mantissas and random ones;
// exponents scale out): no difference. It takes the divider out of the loop for one of Adam's two divisions: the
// AVX-512 AdamW step at 10k params (in L1/L2) 6.0 -> 4.3 us, single thread. x = inf gives a NaN remainder: keep q.
template <bool kFma>
inline __attribute__((always_inline)) float div_by_const(float x, float c, float r) {
  if constexpr (kFma) {
    const float q = x * r;
    const float e = __builtin_fmaf(-q, c, x);
    const float q1 = __builtin_fmaf(e, r, q);
    return e == e ? q1 : q;
  } else {
    return x / c;
  }
}

enum class Wd : int { None = 0, L2 = 1, Decoupled = 2 };

struct AdamScalars {
  float lerp_w;     // (float)(1 - beta1), the weight of m.lerp_(g, 1 - beta1)
  float lerp_c;     // lerp coefficient: lerp_w if |lerp_w| < 0.5 else lerp_w - 1 (ATen's lerp_vec)
  bool lerp_small;  // |lerp_w| < 0.5: m + w*(g - m); else g + (w - 1)*(g - m)
  float beta2;      // v.mul_(beta2)
  float c2;         // .addcmul_(g, g, value=1 - beta2)
  float bc2_sqrt;   // (1 - beta2**step) ** 0.5
  float eps;
  float wd;         // Adam (L2) grad.add(param, alpha=wd)
};

template <bool kFma, Wd kWd, bool kLerpSmall>
inline __attribute__((always_inline)) void adam_body(float* __restrict p, const float* __restrict g,
                                                     float* __restrict m, float* __restrict v, int64_t n,
                                                     const AdamScalars& s, float decay, float neg_step_size) {
  const float lerp_c = s.lerp_c, beta2 = s.beta2, c2 = s.c2, bc2_sqrt = s.bc2_sqrt, eps = s.eps, wd = s.wd;
  const float inv_bc2_sqrt = 1.0f / bc2_sqrt;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float pi = p[i];
    float gi = g[i];
    if constexpr (kWd == Wd::L2) gi = madd<kFma>(pi, wd, gi);   // grad.add(param, alpha=wd)
    if constexpr (kWd == Wd::Decoupled) pi = pi * decay;         // param.mul_(1 - lr*wd)
    float mi = m[i];
    mi = madd<kFma>(lerp_c, gi - mi, kLerpSmall ? mi : gi);      // exp_avg.lerp_(grad, 1 - beta1)
    const float vi = madd<kFma>(c2 * gi, gi, v[i] * beta2);      // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1-beta2)
    // IEEE sqrt; torch's sqrt calls MKL's vsSqrt on long rows (>~1000), 1 ulp off in ~0.6 % of elements.
    const float denom = div_by_const<kFma>(std::sqrt(vi), bc2_sqrt, inv_bc2_sqrt) + eps;  // (sqrt(v) / bc2_sqrt).add_(eps)
    pi = pi + (neg_step_size * mi) / denom;                      // param.addcdiv_(exp_avg, denom, value=-step_size)
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
  }
}

struct SgdScalars {
  float momentum;
  float one_minus_dampening;
  float wd;
};

// kMom: 0 = no momentum, 1 = first step (buf = g), 2 = later steps (buf = momentum*buf + (1-dampening)*g).
template <bool kFma, bool kWdOn, int kMom, bool kNesterov>
inline __attribute__((always_inline)) void sgd_body(float* __restrict p, const float* __restrict g,
                                                    float* __restrict buf, int64_t n, const SgdScalars& s,
                                                    float neg_lr) {
  const float mom = s.momentum, omd = s.one_minus_dampening, wd = s.wd;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i];
    float d = g[i];
    if constexpr (kWdOn) d = madd<kFma>(pi, wd, d);              // grad.add(param, alpha=wd)
    if constexpr (kMom != 0) {
      float b;
      if constexpr (kMom == 1) {
        b = d;                                                   // buf = grad.clone()
      } else {
        b = madd<kFma>(d, omd, buf[i] * mom);                    // buf.mul_(momentum).add_(grad, alpha=1-dampening)
      }
      buf[i] = b;
      if constexpr (kNesterov) {
        d = madd<kFma>(b, mom, d);                               // grad.add(buf, alpha=momentum)
      } else {
        d = b;
      }
    }
    p[i] = madd<kFma>(d, neg_lr, pi);                            // param.add_(grad, alpha=-lr)
  }
}

// ----------------------------------------------------------------------------------------------------------------
// One span = row `row`, elements [begin, end). Instantiated once per ISA.

struct AdamCall {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t n;
  int64_t ld;   // row stride of p, m, v (elements)
  int64_t ldg;  // row stride of g
  AdamScalars s;
  const float* decay;     // [K] (float)(1 - lr*wd)
  const float* neg_step;  // [K] (float)(-(lr / bc1))
};

struct SgdCall {
  float* p;
  const float* g;
  float* buf;
  int64_t n;
  int64_t ld;   // row stride of p, buf (elements)
  int64_t ldg;  // row stride of g
  SgdScalars s;
  const float* neg_lr;  // [K] (float)(-lr)
};

using AdamSpanFn = void (*)(const AdamCall&, int64_t, int64_t, int64_t);
using SgdSpanFn = void (*)(const SgdCall&, int64_t, int64_t, int64_t);

#define LRFAST_DEFINE_SPANS(NS, TARGET, FMA)                                                                     \
  namespace NS {                                                                                                 \
  template <Wd kWd, bool kLerpSmall>                                                                             \
  TARGET void adam_span(const AdamCall& c, int64_t row, int64_t b, int64_t e) {                                  \
    const int64_t o = row * c.ld + b, og = row * c.ldg + b;                                                      \
    adam_body<FMA, kWd, kLerpSmall>(c.p + o, c.g + og, c.m + o, c.v + o, e - b, c.s, c.decay[row],               \
                                    c.neg_step[row]);                                                            \
  }                                                                                                              \
  template <bool kWdOn, int kMom, bool kNesterov>                                                                \
  TARGET void sgd_span(const SgdCall& c, int64_t row, int64_t b, int64_t e) {                                    \
    const int64_t o = row * c.ld + b, og = row * c.ldg + b;                                                      \
    sgd_body<FMA, kWdOn, kMom, kNesterov>(c.p + o, c.g + og, c.buf ? c.buf + o : nullptr, e - b, c.s,            \
                                          c.neg_lr[row]);                                                        \
  }                                                                                                              \
  }

#define LRFAST_DEFAULT_TARGET
#if LRFAST_X86
#define LRFAST_AVX2_TARGET __attribute__((target("avx2,fma")))
#define LRFAST_AVX512_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#endif

LRFAST_DEFINE_SPANS(isa_default, LRFAST_DEFAULT_TARGET, kDefaultFma)
#if LRFAST_X86
LRFAST_DEFINE_SPANS(isa_avx2, LRFAST_AVX2_TARGET, true)
LRFAST_DEFINE_SPANS(isa_avx512, LRFAST_AVX512_TARGET, true)
#endif

template <Wd kWd, bool kLerpSmall>
AdamSpanFn pick_adam2(Isa isa) {
#if LRFAST_X86
  if (isa == Isa::Avx512) return &isa_avx512::adam_span<kWd, kLerpSmall>;
  if (isa == Isa::Avx2) return &isa_avx2::adam_span<kWd, kLerpSmall>;
#endif
  (void)isa;
  return &isa_default::adam_span<kWd, kLerpSmall>;
}

template <Wd kWd>
AdamSpanFn pick_adam(Isa isa, bool lerp_small) {
  return lerp_small ? pick_adam2<kWd, true>(isa) : pick_adam2<kWd, false>(isa);
}

template <bool kWdOn, int kMom, bool kNesterov>
SgdSpanFn pick_sgd3(Isa isa) {
#if LRFAST_X86
  if (isa == Isa::Avx512) return &isa_avx512::sgd_span<kWdOn, kMom, kNesterov>;
  if (isa == Isa::Avx2) return &isa_avx2::sgd_span<kWdOn, kMom, kNesterov>;
#endif
  (void)isa;
  return &isa_default::sgd_span<kWdOn, kMom, kNesterov>;
}

template <bool kWdOn>
SgdSpanFn pick_sgd2(Isa isa, int mom, bool nesterov) {
  if (mom == 0) return pick_sgd3<kWdOn, 0, false>(isa);
  if (mom == 1) return nesterov ? pick_sgd3<kWdOn, 1, true>(isa) : pick_sgd3<kWdOn, 1, false>(isa);
  return nesterov ? pick_sgd3<kWdOn, 2, true>(isa) : pick_sgd3<kWdOn, 2, false>(isa);
}

// ----------------------------------------------------------------------------------------------------------------
// ISA selection.

Isa widest_isa() {
#if !LRFAST_X86
  return Isa::Default;
#else
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return Isa::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
  return Isa::Default;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

Isa g_widest = Isa::Default;
Isa g_isa = Isa::Default;

void set_isa(const std::string& name) {
  Isa want;
  if (name == "default") {
    want = Isa::Default;
  } else if (name == "avx2") {
    want = Isa::Avx2;
  } else if (name == "avx512") {
    want = Isa::Avx512;
  } else {
    throw py::value_error("isa must be 'default', 'avx2' or 'avx512', got '" + name + "'");
  }
  if (static_cast<int>(want) > static_cast<int>(g_widest)) {
    throw py::value_error(std::string("this CPU runs at most isa '") + isa_name(g_widest) + "', asked for '" + name +
                          "'");
  }
  g_isa = want;
}

// ----------------------------------------------------------------------------------------------------------------
// Partition: the active rows' elements, flattened, split into one contiguous range per thread.

template <class Call, class SpanFn>
void run_rows(const Call& call, SpanFn fn, const std::vector<int64_t>& rows, int64_t max_threads) {
  const int64_t n = call.n;
  const int64_t nrows = static_cast<int64_t>(rows.size());
  const int64_t total = nrows * n;
  if (total == 0) return;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(max_threads, total / kMinElementsPerThread));
  auto edge = [&](int64_t i) {
    const int64_t x = total * i / nt;
    return i == nt ? total : std::min(total, (x + kAlignElements - 1) / kAlignElements * kAlignElements);
  };
  auto work = [&](int64_t t) {
    int64_t e = edge(t);
    const int64_t hi = edge(t + 1);
    while (e < hi) {
      const int64_t r = e / n, b = e % n;
      const int64_t end = std::min(n, b + (hi - e));
      fn(call, rows[r], b, end);
      e += end - b;
    }
  };
  g_last_threads.store(static_cast<int>(nt), std::memory_order_relaxed);
  std::vector<std::thread> helpers;
  helpers.reserve(static_cast<size_t>(nt - 1));
  for (int64_t t = 1; t < nt; ++t) helpers.emplace_back(work, t);
  work(0);  // this thread takes the first range
  for (auto& h : helpers) h.join();
}

std::vector<int64_t> active_rows(const double* lr, int64_t k) {
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(k));
  for (int64_t r = 0; r < k; ++r) {
    if (lr[r] != 0.0) rows.push_back(r);  // lr == 0: frozen candidate, row left untouched
  }
  return rows;
}

template <class T>
T* ptr(std::uintptr_t addr) {
  return reinterpret_cast<T*>(addr);
}

void check_sizes(int64_t k, int64_t n, int64_t ld, int64_t ldg, int64_t step) {
  if (k < 0 || n < 0) throw py::value_error("k and n must be >= 0");
  if (ld < n || ldg < n) throw py::value_error("ld and ldg (row strides) must be >= n");
  if (step < 1) throw py::value_error("step must be >= 1 (the 1-based number of this step), got " + std::to_string(step));
}

// ----------------------------------------------------------------------------------------------------------------
// Entry points.

void adam_step(std::uintptr_t p, std::uintptr_t g, std::uintptr_t m, std::uintptr_t v, std::uintptr_t lr, int64_t k,
               int64_t n, int64_t ld, int64_t ldg, int64_t step, double beta1, double beta2, double eps,
               double weight_decay, bool decoupled, int64_t threads) {
  check_sizes(k, n, ld, ldg, step);
  const double* lrs = ptr<const double>(lr);
  const Wd wd_mode = weight_decay == 0.0 ? Wd::None : (decoupled ? Wd::Decoupled : Wd::L2);
  const Isa isa = g_isa;
  py::gil_scoped_release nogil;

  // Scalars exactly as torch.optim's _single_tensor_adam makes them: Python floats (double), cast to fp32 by the
  // tensor op that takes them. step is a float there (state_step.item()); pow(x, 1.0 * step) is the same libm call.
  const double s = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(beta1, s);
  const double bc2 = 1.0 - std::pow(beta2, s);
  AdamScalars sc;
  sc.lerp_w = static_cast<float>(1.0 - beta1);
  sc.lerp_small = std::abs(sc.lerp_w) < 0.5f;
  sc.lerp_c = sc.lerp_small ? sc.lerp_w : sc.lerp_w - 1.0f;
  sc.beta2 = static_cast<float>(beta2);
  sc.c2 = static_cast<float>(1.0 - beta2);
  sc.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));  // Python's bc2 ** 0.5
  sc.eps = static_cast<float>(eps);
  sc.wd = static_cast<float>(weight_decay);

  const std::vector<int64_t> rows = active_rows(lrs, k);
  std::vector<float> decay(static_cast<size_t>(k), 1.0f), neg_step(static_cast<size_t>(k), 0.0f);
  for (int64_t r : rows) {
    decay[r] = static_cast<float>(1.0 - lrs[r] * weight_decay);
    neg_step[r] = static_cast<float>(-(lrs[r] / bc1));
  }
  const AdamCall call{ptr<float>(p), ptr<const float>(g), ptr<float>(m), ptr<float>(v), n, ld, ldg, sc,
                      decay.data(),   neg_step.data()};
  AdamSpanFn fn = wd_mode == Wd::None ? pick_adam<Wd::None>(isa, sc.lerp_small)
                  : wd_mode == Wd::L2 ? pick_adam<Wd::L2>(isa, sc.lerp_small)
                                      : pick_adam<Wd::Decoupled>(isa, sc.lerp_small);
  run_rows(call, fn, rows, threads);
}

void sgd_step(std::uintptr_t p, std::uintptr_t g, std::uintptr_t buf, std::uintptr_t lr, int64_t k, int64_t n,
              int64_t ld, int64_t ldg, int64_t step, double momentum, double dampening, bool nesterov,
              double weight_decay, int64_t threads) {
  check_sizes(k, n, ld, ldg, step);
  if (momentum != 0.0 && buf == 0 && k * n != 0) throw py::value_error("momentum != 0 needs a momentum buffer");
  const double* lrs = ptr<const double>(lr);
  const Isa isa = g_isa;
  py::gil_scoped_release nogil;

  const int mom = momentum == 0.0 ? 0 : (step == 1 ? 1 : 2);
  SgdScalars sc;
  sc.momentum = static_cast<float>(momentum);
  sc.one_minus_dampening = static_cast<float>(1.0 - dampening);
  sc.wd = static_cast<float>(weight_decay);

  const std::vector<int64_t> rows = active_rows(lrs, k);
  std::vector<float> neg_lr(static_cast<size_t>(k), 0.0f);
  for (int64_t r : rows) neg_lr[r] = static_cast<float>(-lrs[r]);
  const SgdCall call{ptr<float>(p), ptr<const float>(g), mom ? ptr<float>(buf) : nullptr, n, ld, ldg, sc,
                     neg_lr.data()};
  SgdSpanFn fn = weight_decay != 0.0 ? pick_sgd2<true>(isa, mom, nesterov) : pick_sgd2<false>(isa, mom, nesterov);
  run_rows(call, fn, rows, threads);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "lrfast fused CPU optimizer steps over [K, N] fp32 candidates (see lrfast/kernels/cpu.py)";
  g_widest = widest_isa();
  g_isa = std::min(g_widest, Isa::Avx2);
  if (const char* env = std::getenv("LRFAST_CPU_ISA")) {
    if (*env) set_isa(env);
  }

  mod.def("adam_step", &adam_step, py::arg("p"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("lr"),
          py::arg("k"), py::arg("n"), py::arg("ld"), py::arg("ldg"), py::arg("step"), py::arg("beta1"),
          py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("threads"),
          "One Adam/AdamW step on fp32 [k, n] buffers at the given addresses, rows ld apart (g's ldg); lr: float64 "
          "[k]; at most `threads` threads. Rows with lr == 0 are left untouched. No checks: call through "
          "lrfast.kernels.cpu.adam_step.");
  mod.def("sgd_step", &sgd_step, py::arg("p"), py::arg("g"), py::arg("buf"), py::arg("lr"), py::arg("k"),
          py::arg("n"), py::arg("ld"), py::arg("ldg"), py::arg("step"), py::arg("momentum"), py::arg("dampening"),
          py::arg("nesterov"),
          py::arg("weight_decay"), py::arg("threads"),
          "One SGD step on fp32 [k, n] buffers at the given addresses, rows ld apart (g's ldg; buf = 0 when "
          "momentum == 0); lr: float64 [k]; at most `threads` threads. Rows with lr == 0 are left untouched. No "
          "checks: call through lrfast.kernels.cpu.sgd_step.");
  mod.def("isa", []() { return std::string(isa_name(g_isa)); }, "The instruction set the kernels run with now.");
  mod.def(
      "supported_isas",
      []() {
        py::list out;
        for (int i = 0; i <= static_cast<int>(g_widest); ++i) out.append(isa_name(static_cast<Isa>(i)));
        return out;
      },
      "The instruction sets this CPU runs, narrowest first.");
  mod.def("set_isa", &set_isa, py::arg("name"),
          "Pick 'default' (x86-64 baseline), 'avx2' or 'avx512' (tests and benchmarks; env LRFAST_CPU_ISA at import).");
  mod.def(
      "threads_for", [](int64_t active_elements, int64_t max_threads) {
        return std::max<int64_t>(1, std::min<int64_t>(max_threads, active_elements / kMinElementsPerThread));
      },
      py::arg("active_elements"), py::arg("max_threads"),
      "How many threads a step over this many active elements (live rows x N) runs with, given max_threads.");
  mod.def("last_threads", []() { return g_last_threads.load(std::memory_order_relaxed); },
          "How many threads the last step with work ran with.");
}
