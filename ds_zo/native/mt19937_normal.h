// torch's CPU normal_ for float32, the same values bit for bit, 3.3 times faster (1.0 vs 3.4 ns per value).
//
// Why: a z chunk is `torch.Generator().manual_seed(key)` then `normal_(0, scale)`, and on a CPU that sampler is most
// of ds_zo's own work in a step (SmolLM2-135M, one thread: 1.1 s of a 3.2 s step). torch spends ~2.8 of its ~3.4 ns
// per value on the uniforms: a scalar mt19937 called once per value through its generator interface. The stream
// itself is easy to vectorise: one mt19937 twist makes 624 words, and each word depends on words 1, 227 and 397
// places away, so 8 neighbours can be formed at once; tempering and the float conversion are per word.
//
// What must match torch (ATen/core/MT19937RNGEngine.h, ATen/core/TransformationHelper.h,
// ATen/native/cpu/DistributionTemplates.h; torch builds its distribution kernels for the DEFAULT and AVX2
// capabilities only, so every AVX2 CPU runs the AVX2 one):
//  - seeding: only the low 32 bits of the seed are used; state[j] = 1812433253 * (state[j-1] ^ state[j-1] >> 30) + j;
//  - uniform: (word & 0xFFFFFF) * 2^-24 (exact in float32);
//  - all n uniforms are drawn first; Box-Muller turns each group of 16 (u[0..7] -> radii, u[8..15] -> angles) into
//    16 normals with ATen's avx_mathfun log/sincos; when n % 16 != 0 the last 16 values are redrawn from the next
//    16 uniforms of the stream and transformed again.
// Drawing 624 uniforms and transforming them at once gives the same values, since 624 = 39 groups of 16.
// Nothing here is trusted blindly: ds_zo.native compares it with torch's normal_ when it loads and uses it only if
// every value agrees (another torch version, a CPU without AVX2 or ATEN_CPU_CAPABILITY=default would not).
#pragma once

#include <cstdint>
#include <immintrin.h>

#include <c10/util/MathConstants.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// torch compiles this math with GCC's default contraction of a * b + c into fused multiply-adds; the values match
// only with the same contraction (ds_zo.native builds with -ffp-contract=off otherwise)
#pragma GCC optimize("fp-contract=fast")
// torch's own vector log/sincos, the functions its AVX2 normal_ kernel calls; the header defines them only under
// this capability macro, which is undefined again straight after so that nothing else sees it
#define CPU_CAPABILITY_AVX2
#include <ATen/native/cpu/avx_mathfun.h>
#undef CPU_CAPABILITY_AVX2

namespace ds_zo {

class Mt19937Normal {
 public:
  static constexpr int kWords = 624;   // mt19937's state, and the words one twist makes

  // out[0..n) := N(0, 1) * scale (one float32 rounding of z * scale, as normal_(0, scale) gives), n >= 16.
  // With `groups` (n % 16 == 0): only the groups of 16 values g with groups[g] != 0 are formed; the others are left
  // unset (or holding uniforms), for the caller to overwrite. The stream still runs through every twist, but only
  // the words of marked groups are tempered and only marked groups transformed (the transform is most of the cost).
  static void fill(float* out, int64_t n, uint64_t seed, float scale, const uint8_t* groups = nullptr) {
    Mt19937Normal g(seed);
    const __m256 std_v = _mm256_set1_ps(scale);
    int64_t done = 0;
    while (done < n) {                     // one twist's uniforms at a time, transformed while they are in cache
      const int64_t m = n - done < kWords ? n - done : kWords;
      if (groups != nullptr && !any_marked(groups + done / 16, m / 16)) {
        g.skip(m);                         // nothing wanted from these words: the stream only moves on
        done += m;
        continue;
      }
      g.uniforms(out + done, m);
      for (int64_t i = 0; i + 16 <= m; i += 16) {
        if (groups == nullptr || groups[(done + i) / 16]) box_muller16(out + done + i, std_v);
      }
      done += m;
    }
    if (n % 16 != 0) {                     // torch redraws the last 16 values from the next 16 uniforms
      g.uniforms(out + n - 16, 16);
      box_muller16(out + n - 16, std_v);
    }
  }

 private:
  friend class Mt19937NormalTiles;

  alignas(32) uint32_t state_[kWords];
  int next_ = kWords;                      // next word to temper; kWords: twist first (as torch's left_ = 1 does)

  explicit Mt19937Normal(uint64_t seed) {
    state_[0] = static_cast<uint32_t>(seed & 0xffffffffu);
    for (uint32_t j = 1; j < kWords; ++j) state_[j] = 1812433253u * (state_[j - 1] ^ (state_[j - 1] >> 30)) + j;
  }

  static bool any_marked(const uint8_t* groups, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      if (groups[i]) return true;
    }
    return false;
  }

  // the stream moves m words on without forming them
  void skip(int64_t m) {
    while (m > 0) {
      if (next_ == kWords) twist_state();
      const int64_t take = kWords - next_ < m ? kWords - next_ : m;
      next_ += static_cast<int>(take);
      m -= take;
    }
  }

  static inline uint32_t twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
  }

  static inline __m256i twist8(__m256i u, __m256i v) {
    const __m256i y = _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0x80000000u))),
                                      _mm256_and_si256(v, _mm256_set1_epi32(0x7fffffff)));
    // all ones where v is odd: 0 - (v & 1)
    const __m256i odd = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_and_si256(v, _mm256_set1_epi32(1)));
    return _mm256_xor_si256(_mm256_srli_epi32(y, 1),
                            _mm256_and_si256(odd, _mm256_set1_epi32(static_cast<int>(0x9908b0dfu))));
  }

  // the next 624 words: s[i] = s[i + 397] ^ twist(s[i], s[i + 1]) for i < 227 (old words only), then
  // s[i] = s[i - 227] ^ twist(...) (words made 227 places earlier), then the last word wraps to the new s[0]
  void twist_state() {
    uint32_t* s = state_;
    auto load = [&](int i) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)); };
    auto store = [&](int i, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + i), v); };
    int i = 0;
    for (; i + 8 <= 227; i += 8) store(i, _mm256_xor_si256(load(i + 397), twist8(load(i), load(i + 1))));
    for (; i < 227; ++i) s[i] = s[i + 397] ^ twist(s[i], s[i + 1]);
    for (; i + 8 <= 623; i += 8) store(i, _mm256_xor_si256(load(i - 227), twist8(load(i), load(i + 1))));
    for (; i < 623; ++i) s[i] = s[i - 227] ^ twist(s[i], s[i + 1]);
    s[623] = s[396] ^ twist(s[623], s[0]);
    next_ = 0;
  }

  static inline __m256 uniform8(__m256i y) {
    y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
    y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), _mm256_set1_epi32(static_cast<int>(0x9d2c5680u))));
    y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), _mm256_set1_epi32(static_cast<int>(0xefc60000u))));
    y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
    const __m256i bits24 = _mm256_and_si256(y, _mm256_set1_epi32(0xFFFFFF));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(bits24), _mm256_set1_ps(1.0f / 16777216.0f));   // exact
  }

  static inline float uniform1(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return static_cast<float>(y & 0xFFFFFFu) * (1.0f / 16777216.0f);
  }

  // out[0..m) := the stream's next m uniforms
  void uniforms(float* out, int64_t m) {
    int64_t k = 0;
    while (k < m) {
      if (next_ == kWords) twist_state();
      int64_t take = kWords - next_;
      if (take > m - k) take = m - k;
      int64_t t = 0;
      for (; t + 8 <= take; t += 8) {
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(state_ + next_ + t));
        _mm256_storeu_ps(out + k + t, uniform8(y));
      }
      for (; t < take; ++t) out[k + t] = uniform1(state_[next_ + t]);
      k += take;
      next_ += static_cast<int>(take);
    }
  }

  // ATen's AVX2 NormalFill16 step for float, operation for operation (mean 0)
  // always inlined: called per 16 values from two loops (fill, the tiles), where a call costs ~7 % of a draw
  __attribute__((always_inline)) static inline void box_muller16(float* data, __m256 std_v) {
    const __m256 u1 = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_loadu_ps(data));
    const __m256 u2 = _mm256_loadu_ps(data + 8);
    const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log256_ps(u1)));
    const __m256 theta = _mm256_mul_ps(_mm256_set1_ps(static_cast<float>(2.0f * c10::pi<double>)), u2);
    __m256 sintheta, costheta;
    sincos256_ps(theta, &sintheta, &costheta);
    const __m256 zero = _mm256_setzero_ps();
    _mm256_storeu_ps(data, _mm256_fmadd_ps(_mm256_mul_ps(radius, costheta), std_v, zero));
    _mm256_storeu_ps(data + 8, _mm256_fmadd_ps(_mm256_mul_ps(radius, sintheta), std_v, zero));
  }
};

// The same values as Mt19937Normal::fill(out, n, seed, scale), handed out a tile (at most 624 values) at a time in a
// buffer of its own, so that a pass over a chunk can use them while they are in L1 and never write z to memory.
// Tiles come in position order and cover the wanted positions [from, to) once, each value final (when n % 16 != 0
// the last 16 positions come as a last tile of their own, drawn after the stream has passed the partial group, as
// torch does). Only the groups of 16 that overlap [from, to) are formed (a tile's other values are unset): a part of
// a chunk costs about its share of the chunk's draw, the stream only running through the rest.
class Mt19937NormalTiles {
 public:
  static constexpr int64_t kMaxTile = Mt19937Normal::kWords;

  Mt19937NormalTiles(int64_t n, uint64_t seed, float scale, int64_t from = 0, int64_t to = -1)
      : gen_(seed), n_(n), full_(n / 16 * 16), limit_(n % 16 ? n - 16 : n), from_(from), to_(to < 0 ? n : to),
        std_(scale) {}

  // the next tile that overlaps [from, to): false when there is none left
  bool next() {
    const __m256 std_v = _mm256_set1_ps(std_);
    while (done_ < full_) {
      const int64_t m = full_ - done_ < Mt19937Normal::kWords ? full_ - done_ : Mt19937Normal::kWords;
      offset_ = done_;
      size_ = (done_ + m < limit_ ? done_ + m : limit_) - done_;
      done_ += m;
      if (offset_ >= to_ && (n_ % 16 == 0 || n_ - 16 >= to_)) return false;   // nothing wanted further on
      // the groups of this tile that hold wanted positions: [lo, hi), whole groups
      const int64_t lo = offset_ > from_ / 16 * 16 ? offset_ : from_ / 16 * 16;
      const int64_t end = offset_ + size_ < to_ ? offset_ + size_ : to_;
      const int64_t hi = (end + 15) / 16 * 16;
      // (a tile cut short by limit_ may end before `from`: its wanted positions all come from the tail)
      if (lo >= hi || offset_ + size_ <= from_) {
        gen_.skip(m);
        continue;
      }
      gen_.skip(lo - offset_);
      gen_.uniforms(buf_ + (lo - offset_), hi - lo);
      gen_.skip(offset_ + m - hi);
      for (int64_t g = lo; g < hi; g += 16) {
        Mt19937Normal::box_muller16(buf_ + (g - offset_), std_v);
        formed_ += (g + 16 < limit_ ? g + 16 : limit_) - g;    // a group's positions past limit come from the tail
      }
      return true;
    }
    if (n_ % 16 != 0 && !tail_done_) {
      tail_done_ = true;
      if (n_ - 16 >= to_) return false;
      gen_.skip(n_ - full_);
      gen_.uniforms(buf_, 16);
      Mt19937Normal::box_muller16(buf_, std_v);
      formed_ += 16;
      offset_ = n_ - 16;
      size_ = 16;
      return true;
    }
    return false;
  }

  const float* values() const { return buf_; }   // the tile's values, for positions [offset(), offset() + size())
  int64_t offset() const { return offset_; }
  int64_t size() const { return size_; }
  // values formed so far, counted as a whole chunk drawn by torch counts them (n for the whole chunk)
  int64_t formed() const { return formed_; }

 private:
  Mt19937Normal gen_;
  alignas(32) float buf_[Mt19937Normal::kWords];
  int64_t n_, full_, limit_, from_, to_;
  float std_;
  int64_t done_ = 0, offset_ = 0, size_ = 0, formed_ = 0;
  bool tail_done_ = false;
};

}  // namespace ds_zo

#pragma GCC pop_options
