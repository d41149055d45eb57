// Standalone check of the CPU kernels of multi-scale deformable attention: every kernel build
// linked in (baseline, and on x86-64 the AVX2 and AVX-512 ones the CPU supports), fp32 and
// fp64, forward and backward, against a float64 oracle written out below (bilinear sampling
// with zeros outside the map, grid_sample's align_corners=False convention). It needs no
// libtorch at run time, so a cross-compiled build runs under an emulator:
// tools/check_cpu_kernels.sh builds and runs it (natively, or for aarch64 under qemu).
// Prints one line per case; exit status 0 when all agree.
#include "cpu/ms_deform_attn_cpu_kernels.h"
#include "cpu/ms_deform_attn_cpu_scratch.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace unip_v2::cpu;

namespace {

struct Case {
  int64_t N, M, D, Lq, P;
  std::vector<int64_t> shapes;  // H0, W0, H1, W1, ...
};

struct Data {
  Problem pb;
  std::vector<int64_t> shapes, starts;
  std::vector<double> value, loc, attn, grad_out;
};

Data make(const Case& c, uint32_t seed) {
  Data d;
  d.shapes = c.shapes;
  const int64_t L = static_cast<int64_t>(c.shapes.size() / 2);
  int64_t S = 0;
  for (int64_t l = 0; l < L; ++l) {
    d.starts.push_back(S);
    S += c.shapes[2 * l] * c.shapes[2 * l + 1];
  }
  d.pb = Problem{c.N, S, c.M, c.D, c.Lq, L, c.P, nullptr, nullptr};
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::normal_distribution<double> n(0.0, 1.0);
  for (int64_t i = 0; i < c.N * S * c.M * c.D; ++i) d.value.push_back(n(gen));
  const int64_t samples = c.N * c.Lq * c.M * L * c.P;
  for (int64_t i = 0; i < samples; ++i) {
    double x = u(gen), y = u(gen);
    const double r = u(gen);
    if (r < 0.2) {  // partly or wholly outside the map
      x = x * 1.6 - 0.3;
      y = y * 1.6 - 0.3;
    } else if (r < 0.22) {
      x = std::numeric_limits<double>::quiet_NaN();
    }
    d.loc.push_back(x);
    d.loc.push_back(y);
    d.attn.push_back(u(gen));
  }
  for (int64_t i = 0; i < c.N * c.Lq * c.M * c.D; ++i) d.grad_out.push_back(n(gen));
  return d;
}

// Float64 oracle: out (N, Lq, M*D) and the three gradients for grad_out.
void oracle(const Data& d, std::vector<double>& out, std::vector<double>& gv,
            std::vector<double>& gl, std::vector<double>& ga) {
  const Problem& pb = d.pb;
  const int64_t row = pb.M * pb.D;
  out.assign(pb.N * pb.Lq * row, 0.0);
  gv.assign(d.value.size(), 0.0);
  gl.assign(d.loc.size(), 0.0);
  ga.assign(d.attn.size(), 0.0);
  for (int64_t n = 0; n < pb.N; ++n)
    for (int64_t q = 0; q < pb.Lq; ++q)
      for (int64_t m = 0; m < pb.M; ++m)
        for (int64_t l = 0; l < pb.L; ++l)
          for (int64_t p = 0; p < pb.P; ++p) {
            const int64_t i = (((n * pb.Lq + q) * pb.M + m) * pb.L + l) * pb.P + p;
            const int64_t H = d.shapes[2 * l], W = d.shapes[2 * l + 1];
            const double x = d.loc[2 * i] * W - 0.5, y = d.loc[2 * i + 1] * H - 0.5;
            if (!(x > -1 && y > -1 && x < W && y < H)) continue;  // NaN included
            const double x0 = std::floor(x), y0 = std::floor(y), fx = x - x0, fy = y - y0;
            const double a = d.attn[i];
            const double wts[4] = {(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx};
            const int64_t cx[4] = {0, 1, 0, 1}, cy[4] = {0, 0, 1, 1};
            double dot[4] = {0, 0, 0, 0};
            for (int k = 0; k < 4; ++k) {
              const int64_t xi = static_cast<int64_t>(x0) + cx[k], yi = static_cast<int64_t>(y0) + cy[k];
              if (xi < 0 || xi >= W || yi < 0 || yi >= H) continue;
              const int64_t base = ((n * pb.S + d.starts[l] + yi * W + xi) * pb.M + m) * pb.D;
              for (int64_t c = 0; c < pb.D; ++c) {
                const double g = d.grad_out[(n * pb.Lq + q) * row + m * pb.D + c];
                out[(n * pb.Lq + q) * row + m * pb.D + c] += a * wts[k] * d.value[base + c];
                gv[base + c] += a * wts[k] * g;
                dot[k] += g * d.value[base + c];
              }
            }
            ga[i] = wts[0] * dot[0] + wts[1] * dot[1] + wts[2] * dot[2] + wts[3] * dot[3];
            gl[2 * i] = a * W * ((dot[1] - dot[0]) * (1 - fy) + (dot[3] - dot[2]) * fy);
            gl[2 * i + 1] = a * H * ((dot[2] - dot[0]) * (1 - fx) + (dot[3] - dot[1]) * fx);
          }
}

template <typename T>
std::vector<T> as(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// Largest |a - b| / (1 + |b|) over the arrays.
template <typename T>
double error(const std::vector<T>& a, const std::vector<double>& b) {
  double worst = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    const double e = std::fabs(static_cast<double>(a[i]) - b[i]) / (1.0 + std::fabs(b[i]));
    if (!(e <= worst)) worst = e;  // a NaN counts as the worst
  }
  return worst;
}

// Kernel: a tag type whose static run() overloads are one build's entry points.
template <typename T, typename Kernel>
bool check(const char* build, const Case& c, bool lanes, double tol) {
  bool ok = true;
  for (uint32_t seed = 0; seed < 2; ++seed) {
    Data d = make(c, seed);
    d.pb.shapes = d.shapes.data();
    d.pb.starts = d.starts.data();
    std::vector<double> out, gv, gl, ga;
    oracle(d, out, gv, gl, ga);
    const std::vector<T> value = as<T>(d.value), loc = as<T>(d.loc), attn = as<T>(d.attn),
                         go = as<T>(d.grad_out);
    std::vector<T> o(out.size()), g_value(gv.size(), T(0)), g_loc(gl.size()), g_attn(ga.size());
    const ScratchBuffer scratch(d.pb);
    Kernel::run(ForwardArgs<T>{d.pb, value.data(), loc.data(), attn.data(), o.data(), lanes},
        scratch.get(), 0, c.N * c.Lq);
    Kernel::run(BackwardArgs<T, T>{d.pb, value.data(), loc.data(), attn.data(), go.data(),
                           g_value.data(), g_loc.data(), g_attn.data(), lanes},
        scratch.get(), 0, c.N * c.M);
    const double e[4] = {error(o, out), error(g_value, gv), error(g_loc, gl), error(g_attn, ga)};
    const bool good = e[0] <= tol && e[1] <= tol && e[2] <= tol * 50 && e[3] <= tol;
    std::printf("%s %-8s %s %-6s N=%lld M=%lld D=%lld Lq=%lld L=%lld P=%lld seed %u: "
                "out %.1e grad_value %.1e grad_loc %.1e grad_attn %.1e\n",
                good ? "ok  " : "FAIL", build, sizeof(T) == 4 ? "fp32" : "fp64",
                lanes ? "lanes" : "scalar", (long long)c.N, (long long)c.M, (long long)c.D,
                (long long)c.Lq, (long long)d.pb.L, (long long)c.P, seed, e[0], e[1], e[2], e[3]);
    ok = ok && good;
  }
  return ok;
}

// The entry points of one build as a type, so check<> can take them as a template argument.
#define KERNEL_TAG(NS)                                                              \
  struct NS##_tag {                                                                 \
    template <typename A>                                                           \
    static void run(const A& a, const Scratch& s, int64_t b, int64_t e) {           \
      NS::run(a, s, b, e);                                                          \
    }                                                                               \
  };

#define CHECK_BUILD(NS, NAME)                                                       \
  for (const Case& c : cases) {                                                    \
    for (bool lanes : {true, false}) ok &= check<float, NS##_tag>(NAME, c, lanes, 2e-5); \
    ok &= check<double, NS##_tag>(NAME, c, false, 1e-12);                          \
  }

KERNEL_TAG(kernels_default)
#ifdef UNIP_V2_CPU_KERNELS_AVX2
KERNEL_TAG(kernels_avx2)
#endif
#ifdef UNIP_V2_CPU_KERNELS_AVX512
KERNEL_TAG(kernels_avx512)
#endif

}  // namespace

int main() {
  // (N, M, D, Lq, P, level shapes): one level and several; D below, at and around the
  // vector widths; L * P below, at and above 16 lanes; batch > 1.
  const std::vector<Case> all = {
      {1, 2, 2, 3, 2, {6, 4, 3, 2}},
      {3, 3, 7, 11, 4, {5, 7}},
      {2, 4, 13, 17, 3, {9, 13, 5, 7, 3, 4, 2, 2}},
      {2, 8, 32, 9, 4, {8, 8, 4, 4, 2, 2}},
      {1, 2, 40, 9, 2, {7, 5, 4, 3}},
      {2, 1, 64, 5, 5, {4, 6, 1, 1, 2, 3}},
      {2, 4, 16, 7, 4, {10, 10, 5, 5, 3, 3, 2, 2}},
  };
  bool ok = true;
  {
    const std::vector<Case>& cases = all;
    CHECK_BUILD(kernels_default, "default")
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
#ifdef UNIP_V2_CPU_KERNELS_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      CHECK_BUILD(kernels_avx2, "avx2")
    } else {
      std::printf("skip avx2: this CPU lacks AVX2 or FMA\n");
    }
#endif
#ifdef UNIP_V2_CPU_KERNELS_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      CHECK_BUILD(kernels_avx512, "avx512")
    } else {
      std::printf("skip avx512: this CPU lacks AVX-512\n");
    }
#endif
#endif
  }
  std::printf(ok ? "all kernel builds agree with the float64 oracle\n" : "FAILED\n");
  return ok ? 0 : 1;
}
