// ds_zo's two element-wise passes over a z chunk, each in one sweep with its z drawn a tile at a time (in L1, never
// written to memory): forming the working copies θ ± εz, and applying the update θ ← θ − lr·(g·z + wd·θ).
//
// Why: on a CPU the Python path draws a chunk of ε·z (4 MB) into scratch and then runs torch's element-wise kernels
// over it, several passes that each stream the chunk through memory again (about 52 bytes per parameter per step
// for both passes, against 20 here: θ read and written by the update, θ read and both copies written by the
// perturbation). Memory bandwidth is what two ranks on one machine share.
//
// Every value is the Python path's bit for bit: the same z (Mt19937NormalTiles), and each product, sum and quotient
// rounded on its own to float32 in the order that path's kernels use (no fused multiply-add: this code is built
// for AVX2 without FMA, and with -ffp-contract=off). Only float32 parameters, Gaussian z and scales the draw folds;
// ds_zo's Python code decides, and uses its own path otherwise.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <vector>

#include "mt19937_normal.h"

#pragma GCC push_options
#pragma GCC target("avx2")

namespace ds_zo {

// A piece of one z chunk: positions [from, to) of a chunk of n values, drawn from the chunk's key.
struct ChunkPiece {
  int64_t n, from, to;
};

// out = master + z (add) or master − z, 8 at a time, one rounding each (torch.add / torch.sub)
inline void shifted(float* out, const float* master, const float* z, int64_t len, bool add) {
  int64_t i = 0;
  if (add) {
    for (; i + 8 <= len; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(master + i), _mm256_loadu_ps(z + i)));
    }
    for (; i < len; ++i) out[i] = master[i] + z[i];
  } else {
    for (; i + 8 <= len; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_sub_ps(_mm256_loadu_ps(master + i), _mm256_loadu_ps(z + i)));
    }
    for (; i < len; ++i) out[i] = master[i] - z[i];
  }
}

// outs[s][i] = master[i] ± ε·z[i] over a piece (master and the outs hold its positions [from, to)), the sign of
// each out given by adds[s]: every working copy of one perturbation from one draw of z. Returns the z values drawn.
inline int64_t perturb_piece(const ChunkPiece& piece, uint64_t key, float eps, const float* master,
                             const std::vector<float*>& outs, const std::vector<bool>& adds) {
  Mt19937NormalTiles tiles(piece.n, key, eps, piece.from, piece.to);
  while (tiles.next()) {
    const int64_t a = std::max(tiles.offset(), piece.from);
    const int64_t b = std::min(tiles.offset() + tiles.size(), piece.to);
    const float* ez = tiles.values() + (a - tiles.offset());
    for (size_t s = 0; s < outs.size(); ++s) {
      shifted(outs[s] + (a - piece.from), master + (a - piece.from), ez, b - a, adds[s]);
    }
  }
  return tiles.formed();
}

// θ ← θ − lr·(u + wd·θ) over a piece (theta holds its positions [from, to)), u = (1/q) Σ_j g_j·z_j with z_j drawn
// from keys[j], in the Python path's order (optimizer.apply_step_pieces): u starts as |g_0|·z_0 (the draw's own
// product) and carries g_0's sign aside; |g_j|·z_j is added where g_j has that sign and subtracted where not; then
// u / q. `decays`: weight decay applies to this tensor (wd·θ, with u turned to the sign of the step). Returns the z
// values drawn.
inline int64_t update_piece(const ChunkPiece& piece, const std::vector<uint64_t>& keys,
                            const std::vector<double>& grads, float lr, float wd, bool decays, float* theta) {
  const size_t q = keys.size();
  std::vector<Mt19937NormalTiles> tiles;
  tiles.reserve(q);
  for (size_t j = 0; j < q; ++j) {
    tiles.emplace_back(piece.n, keys[j], static_cast<float>(std::fabs(grads[j])), piece.from, piece.to);
  }
  const bool positive = !std::signbit(grads[0]);
  std::vector<bool> same(q);
  for (size_t j = 0; j < q; ++j) same[j] = std::signbit(grads[j]) == std::signbit(grads[0]);
  // the step is subtracted (θ − lr·step) where g_0 > 0 or weight decay applies, else lr·u is added
  const bool negate = decays && !positive, down = positive || decays;
  const __m256 lr_v = _mm256_set1_ps(lr), wd_v = _mm256_set1_ps(wd), q_v = _mm256_set1_ps(static_cast<float>(q));
  alignas(32) float u[Mt19937NormalTiles::kMaxTile];
  while (tiles[0].next()) {
    for (size_t j = 1; j < q; ++j) tiles[j].next();     // same n and range: the same positions
    const int64_t off = tiles[0].offset();
    const int64_t a = std::max(off, piece.from), b = std::min(off + tiles[0].size(), piece.to), len = b - a;
    std::copy(tiles[0].values() + (a - off), tiles[0].values() + (b - off), u);
    for (size_t j = 1; j < q; ++j) {
      const float* z = tiles[j].values() + (a - off);
      if (same[j]) {
        for (int64_t i = 0; i < len; ++i) u[i] = u[i] + z[i];
      } else {
        for (int64_t i = 0; i < len; ++i) u[i] = u[i] - z[i];
      }
    }
    float* t = theta + (a - piece.from);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      __m256 step = _mm256_loadu_ps(u + i);
      const __m256 th = _mm256_loadu_ps(t + i);
      if (q > 1) step = _mm256_div_ps(step, q_v);
      if (negate) step = _mm256_xor_ps(step, _mm256_set1_ps(-0.0f));
      if (decays) step = _mm256_add_ps(step, _mm256_mul_ps(th, wd_v));
      step = _mm256_mul_ps(step, lr_v);
      _mm256_storeu_ps(t + i, down ? _mm256_sub_ps(th, step) : _mm256_add_ps(th, step));
    }
    for (; i < len; ++i) {
      float step = u[i];
      if (q > 1) step = step / static_cast<float>(q);
      if (negate) step = -step;
      if (decays) step = step + t[i] * wd;
      step = step * lr;
      t[i] = down ? t[i] - step : t[i] + step;
    }
  }
  int64_t formed = 0;
  for (const auto& t : tiles) formed += t.formed();
  return formed;
}

}  // namespace ds_zo

#pragma GCC pop_options
