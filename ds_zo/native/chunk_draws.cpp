// Draws many independent z chunks at once on the intra-op (OpenMP) threads.
//
// Why native: torch's CPU normal sampler is serial, and chunks have their own seeds, so chunks can be drawn in
// parallel. Python worker threads can do that, but they compete with the OpenMP team that every parallel torch op
// leaves spinning behind it (libgomp spins for a while before sleeping; on a VM the spin takes far longer), so on a
// 2-core machine they hardly run in parallel. Here the OpenMP team itself draws.
//
// Each chunk's values are those of `torch.Generator().manual_seed(key)` + `out.normal_(0, scale, generator=g)`
// (Bernoulli ±scale for Rademacher), the Python path's, bit for bit: Gaussian chunks from Mt19937Normal (the same
// stream, vectorised; used only while it agrees with torch, see mt19937_normal.h), otherwise from ATen's sampler
// with a fresh CPU generator seeded with the key.
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include "mt19937_normal.h"

namespace {

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();   // may run in a static initialiser, before libgcc's own CPU probe
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// on where the CPU has AVX2 and FMA; ds_zo.native turns it off if it ever disagrees with torch's normal_
std::atomic<bool> fast_gaussian{cpu_has_avx2_fma()};

void draw_chunks(const std::vector<at::Tensor>& outs, const std::vector<int64_t>& keys, double scale,
                 bool gaussian) {
  TORCH_CHECK(outs.size() == keys.size(), "draw_chunks: ", outs.size(), " buffers but ", keys.size(), " keys");
  TORCH_CHECK(scale > 0, "draw_chunks: scale must be > 0, got ", scale);
  for (const auto& out : outs) {
    TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= 16,
                "draw_chunks: buffers must be contiguous float32 CPU tensors of at least 16 elements");
  }
  const int64_t n = static_cast<int64_t>(outs.size());
  // largest first, claimed one at a time by whichever thread is free: balanced even for mixed chunk sizes
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return outs[a].numel() > outs[b].numel(); });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  // the caller's grad / inference mode and dispatch state, on every worker (a buffer made under
  // torch.inference_mode may only be written in inference mode)
  const at::ThreadLocalState caller;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard state(caller);
    for (int64_t i = next++; i < n; i = next++) {
      const at::Tensor& out = outs[order[i]];
      if (gaussian && fast_gaussian.load(std::memory_order_relaxed)) {
        ds_zo::Mt19937Normal::fill(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(keys[order[i]]),
                                   static_cast<float>(scale));
        continue;
      }
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(keys[order[i]]));
      if (gaussian) {
        out.normal_(0.0, scale, gen);
      } else {
        out.bernoulli_(0.5, gen).mul_(2.0 * scale).sub_(scale);
      }
    }
  });
}

// out := the groups of 16 values of one Gaussian chunk that `groups` marks (a uint8 per group), the others left
// unset: a part of a chunk without transforming the rest (only with the vectorised sampler, which can skip groups)
void draw_groups(const at::Tensor& out, int64_t key, double scale, const at::Tensor& groups) {
  TORCH_CHECK(fast_gaussian.load(), "draw_groups: needs the vectorised sampler");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= 16
                  && out.numel() % 16 == 0,
              "draw_groups: the chunk must be a contiguous float32 CPU tensor of a multiple of 16 elements");
  TORCH_CHECK(groups.device().is_cpu() && groups.scalar_type() == at::kByte && groups.is_contiguous()
                  && groups.numel() == out.numel() / 16,
              "draw_groups: groups must be a contiguous uint8 CPU tensor of one entry per 16 values");
  TORCH_CHECK(scale > 0, "draw_groups: scale must be > 0, got ", scale);
  ds_zo::Mt19937Normal::fill(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(key),
                             static_cast<float>(scale), groups.data_ptr<uint8_t>());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("draw_chunks", &draw_chunks, "fill each buffer with z * scale from a generator seeded with its key",
        pybind11::arg("outs"), pybind11::arg("keys"), pybind11::arg("scale"), pybind11::arg("gaussian"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("draw_groups", &draw_groups, "the marked groups of 16 values of one Gaussian chunk (vectorised sampler)",
        pybind11::arg("out"), pybind11::arg("key"), pybind11::arg("scale"), pybind11::arg("groups"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("fast_gaussian", [] { return fast_gaussian.load(); },
        "whether Gaussian chunks come from the vectorised mt19937 sampler");
  m.def("set_fast_gaussian", [](bool on) {
    fast_gaussian.store(on && cpu_has_avx2_fma());
  }, "use the vectorised sampler (where the CPU has AVX2 and FMA) or ATen's", pybind11::arg("on"));
}
