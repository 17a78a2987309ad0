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
//
// It also runs the two fused element-wise passes of z_passes.h (working copies, update) on the same team.
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

#include "mt19937_normal.h"
#include "z_passes.h"

namespace {

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();   // may run in a static initialiser, before libgcc's own CPU probe
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// on where the CPU has AVX2 and FMA; ds_zo.native turns it off if it ever disagrees with torch's normal_
std::atomic<bool> fast_gaussian{cpu_has_avx2_fma()};

// Runs work(i) for every job i on the intra-op (OpenMP) team: largest first, each claimed by whichever thread is
// free (balanced even for mixed sizes), with the caller's grad / inference mode and dispatch state on every worker
// (a buffer made under torch.inference_mode may only be written in inference mode).
template <typename Work>
void on_team(const std::vector<int64_t>& sizes, Work&& work) {
  const int64_t n = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes[a] > sizes[b]; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  const at::ThreadLocalState caller;
  // the caller's flush-to-zero / denormals-are-zero modes (torch.set_flush_denormal sets them on its own thread
  // only): without them, denormal results would depend on which thread took a job
  constexpr unsigned int kFtzDaz = 0x8040;
  const unsigned int caller_modes = _mm_getcsr() & kFtzDaz;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard state(caller);
    const unsigned int worker_csr = _mm_getcsr();
    _mm_setcsr((worker_csr & ~kFtzDaz) | caller_modes);
    for (int64_t i = next++; i < n; i = next++) work(order[i]);
    _mm_setcsr(worker_csr);   // the team's threads go on to run torch's ops
  });
}

void check_float_buffer(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
              " must be contiguous float32 CPU tensors");
}

void draw_chunks(const std::vector<at::Tensor>& outs, const std::vector<int64_t>& keys, double scale,
                 bool gaussian) {
  TORCH_CHECK(outs.size() == keys.size(), "draw_chunks: ", outs.size(), " buffers but ", keys.size(), " keys");
  TORCH_CHECK(scale > 0, "draw_chunks: scale must be > 0, got ", scale);
  std::vector<int64_t> sizes;
  for (const auto& out : outs) {
    check_float_buffer(out, "draw_chunks: buffers");
    TORCH_CHECK(out.numel() >= 16, "draw_chunks: buffers must hold at least 16 elements");
    sizes.push_back(out.numel());
  }
  on_team(sizes, [&](int64_t i) {
    const at::Tensor& out = outs[i];
    if (gaussian && fast_gaussian.load(std::memory_order_relaxed)) {
      ds_zo::Mt19937Normal::fill(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(keys[i]),
                                 static_cast<float>(scale));
      return;
    }
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(keys[i]));
    if (gaussian) {
      out.normal_(0.0, scale, gen);
    } else {
      out.bernoulli_(0.5, gen).mul_(2.0 * scale).sub_(scale);
    }
  });
}

// The pieces of z chunks a fused pass covers: piece i holds positions [froms[i], froms[i] + numel) of a chunk of
// chunk_sizes[i] values
std::vector<ds_zo::ChunkPiece> chunk_pieces(const char* op, const std::vector<at::Tensor>& tensors,
                                           const std::vector<int64_t>& chunk_sizes,
                                           const std::vector<int64_t>& froms) {
  TORCH_CHECK(fast_gaussian.load(), op, ": needs the vectorised sampler");
  TORCH_CHECK(tensors.size() == chunk_sizes.size() && tensors.size() == froms.size(), op, ": ", tensors.size(),
              " pieces but ", chunk_sizes.size(), " chunk sizes and ", froms.size(), " offsets");
  std::vector<ds_zo::ChunkPiece> pieces;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_float_buffer(tensors[i], op);
    const int64_t n = chunk_sizes[i], from = froms[i], numel = tensors[i].numel();
    // (numel <= n - from, not from + numel <= n: that sum can overflow)
    TORCH_CHECK(n >= 16 && from >= 0 && from <= n && numel <= n - from, op, ": piece [", from, ", +", numel,
                ") of a chunk of ", n, " values (chunks of at least 16)");
    pieces.push_back({n, from, from + numel});
  }
  return pieces;
}

// outs[s] := masters[out_piece[s]] ± eps·z of that piece's chunk (out_add[s]: +), all of a piece's outs from one
// sweep over its z. Returns the z values drawn.
int64_t perturb_pieces(const std::vector<at::Tensor>& masters, const std::vector<int64_t>& keys,
                       const std::vector<int64_t>& chunk_sizes, const std::vector<int64_t>& froms, double eps,
                       const std::vector<at::Tensor>& outs, const std::vector<int64_t>& out_piece,
                       const std::vector<bool>& out_add) {
  const auto pieces = chunk_pieces("perturb_pieces", masters, chunk_sizes, froms);
  TORCH_CHECK(keys.size() == masters.size(), "perturb_pieces: ", keys.size(), " keys for ", masters.size(), " pieces");
  TORCH_CHECK(outs.size() == out_piece.size() && outs.size() == out_add.size(),
              "perturb_pieces: outs, out_piece and out_add differ in length");
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "perturb_pieces: eps must be finite and > 0, got ", eps);
  std::vector<std::vector<float*>> dst(masters.size());
  std::vector<std::vector<bool>> add(masters.size());
  for (size_t s = 0; s < outs.size(); ++s) {
    const int64_t i = out_piece[s];
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(masters.size()), "perturb_pieces: out ", s, " names piece ", i);
    check_float_buffer(outs[s], "perturb_pieces: outs");
    TORCH_CHECK(outs[s].numel() == masters[i].numel(), "perturb_pieces: out ", s, " holds ", outs[s].numel(),
                " values, its piece ", masters[i].numel());
    dst[i].push_back(outs[s].data_ptr<float>());
    add[i].push_back(out_add[s]);
  }
  std::vector<int64_t> sizes;
  for (const auto& p : pieces) sizes.push_back(p.n);
  std::atomic<int64_t> formed{0};
  on_team(sizes, [&](int64_t i) {
    formed += ds_zo::perturb_piece(pieces[i], static_cast<uint64_t>(keys[i]), static_cast<float>(eps),
                                   masters[i].data_ptr<float>(), dst[i], add[i]);
  });
  return formed.load();
}

// thetas[i] ← thetas[i] − lr·((1/q) Σ_j grads[j]·z_j + wd·θ) (wd where decays[i]), z_j of piece i from
// keys[i·q + j]: optimizer.apply_step_pieces, bit for bit. Returns the z values drawn. Sets done[0] to 1 once
// every piece is written: an update is not idempotent, and the caller must know it ran even when an interrupt
// (raised as soon as this call returns) keeps it from reading the return value. Everything is checked before the
// first write, so a call that raises has written nothing.
int64_t update_pieces(const std::vector<at::Tensor>& thetas, const std::vector<int64_t>& keys,
                      const std::vector<int64_t>& chunk_sizes, const std::vector<int64_t>& froms,
                      const std::vector<double>& grads, double lr, double wd, const std::vector<bool>& decays,
                      const at::Tensor& done) {
  TORCH_CHECK(done.device().is_cpu() && done.scalar_type() == at::kByte && done.is_contiguous() && done.numel() == 1,
              "update_pieces: done must be a one-element contiguous uint8 CPU tensor");
  const auto pieces = chunk_pieces("update_pieces", thetas, chunk_sizes, froms);
  const size_t q = grads.size();
  TORCH_CHECK(q > 0 && keys.size() == thetas.size() * q, "update_pieces: ", keys.size(), " keys for ",
              thetas.size(), " pieces and ", q, " perturbations");
  TORCH_CHECK(decays.size() == thetas.size(), "update_pieces: ", decays.size(), " decay flags for ", thetas.size(),
              " pieces");
  for (double g : grads) {
    TORCH_CHECK(g != 0 && std::isfinite(g), "update_pieces: projected gradients must be finite and nonzero, got ", g);
  }
  std::vector<int64_t> sizes;
  for (const auto& p : pieces) sizes.push_back(p.n);
  std::atomic<int64_t> formed{0};
  on_team(sizes, [&](int64_t i) {
    const std::vector<uint64_t> mine(keys.begin() + i * q, keys.begin() + (i + 1) * q);
    formed += ds_zo::update_piece(pieces[i], mine, grads, static_cast<float>(lr), static_cast<float>(wd), decays[i],
                                  thetas[i].data_ptr<float>());
  });
  done.data_ptr<uint8_t>()[0] = 1;
  return formed.load();
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
  m.def("perturb_pieces", &perturb_pieces, "each out := its piece's master ± eps·z, z drawn a tile at a time",
        pybind11::arg("masters"), pybind11::arg("keys"), pybind11::arg("chunk_sizes"), pybind11::arg("froms"),
        pybind11::arg("eps"), pybind11::arg("outs"), pybind11::arg("out_piece"), pybind11::arg("out_add"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("update_pieces", &update_pieces, "the ZO-SGD update of each piece, z drawn a tile at a time",
        pybind11::arg("thetas"), pybind11::arg("keys"), pybind11::arg("chunk_sizes"), pybind11::arg("froms"),
        pybind11::arg("grads"), pybind11::arg("lr"), pybind11::arg("wd"), pybind11::arg("decays"),
        pybind11::arg("done"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("fast_gaussian", [] { return fast_gaussian.load(); },
        "whether Gaussian chunks come from the vectorised mt19937 sampler");
  m.def("set_fast_gaussian", [](bool on) {
    fast_gaussian.store(on && cpu_has_avx2_fma());
  }, "use the vectorised sampler (where the CPU has AVX2 and FMA) or ATen's", pybind11::arg("on"));
}
