// fastllama's CPU matmuls for few rows (the decode step): int8 activations times 4- or 8-bit weights in integer SIMD
// (AVX2 maddubs), as llama.cpp computes its Q4 and Q8 formats. The operators fastllama::int4_matmul and
// fastllama::int8_matmul (CPU), built, loaded and described by fastllama/kernels.py.
//
// Activations: each 64 values of a row quantized to int8 with one float scale d (absmax / 127).
// int4 weight: rows of K/2 bytes, each 64 values in 32 bytes, byte j holding value j (low nibble) and j + 32 (high), so
//   one 32-byte load and two masks give 64 values in order. Grid: per row and group of G values (G a multiple of 64) a
//   bfloat16 scale s and zero z, the weight being (q - 8) s + z, the layout of PyTorch's int4 kernels. Per 64-block:
//       sum_k x_k w_k  ~=  s d (sum_k q_k xq_k - 8 sum_k xq_k)  +  z sum_k x_k     (the last sum in float, exactly)
//   The rounding error is carried by q - 8 (centred), not by q: 5-6 dB less error than folding the 8 into z.
// int8 weight: rows of K int8 values q and one bfloat16 scale s per row (PyTorch's int8 layout), the weight being q s:
//       sum_k x_k w_k  ~=  s sum_blocks d sum_k q_k xq_k     (maddubs of |q| and xq signed by q)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

static inline float bf16(const at::BFloat16 h) {
    const uint32_t u = (uint32_t)h.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline float hmax(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// x [M, K] quantized: q [M, K] int8; per row and 64-block its scale d, the float sum xs of the block, and d8, eight
// times d times the sum of the block's q (float arrays of M * K / 64 each, in that order in `scales`).
struct Activations {
    int64_t M, K;
    at::Tensor q, scales;
    int8_t *row(int64_t m) const { return q.data_ptr<int8_t>() + m * K; }
    float *d(int64_t m) const { return scales.data_ptr<float>() + m * (K / 64); }
    float *xs(int64_t m) const { return d(m) + M * (K / 64); }
    float *d8(int64_t m) const { return d(m) + 2 * M * (K / 64); }
};

static Activations quantize(const at::Tensor &x_) {
    const at::Tensor x = x_.to(at::kFloat).contiguous();
    TORCH_CHECK(x.dim() == 2 && x.size(1) % 64 == 0, "fastllama matmul: x must be [M, K] with K a multiple of 64");
    const int64_t M = x.size(0), K = x.size(1), blocks = K / 64;
    Activations a{M, K, at::empty({M, K}, x.options().dtype(at::kChar)), at::empty({3, M, blocks}, x.options())};
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
    for (int64_t m = 0; m < M; m++) {
        float *d = a.d(m), *xs = a.xs(m), *d8 = a.d8(m);
        int8_t *q = a.row(m);
        for (int64_t b = 0; b < blocks; b++) {
            const float *p = x.data_ptr<float>() + m * K + 64 * b;
            __m256 top = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
            for (int i = 0; i < 64; i += 8) {
                const __m256 v = _mm256_loadu_ps(p + i);
                top = _mm256_max_ps(top, _mm256_and_ps(v, abs_mask));
                sum = _mm256_add_ps(sum, v);
            }
            const float amax = hmax(top);
            d[b] = amax / 127.f;
            xs[b] = hsum(sum);
            const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m256i total = _mm256_setzero_si256();
            for (int i = 0; i < 64; i += 32) {
                __m256i v[4];
                for (int j = 0; j < 4; j++) {
                    v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + i + 8 * j), inv));
                    total = _mm256_add_epi32(total, v[j]);
                }
                const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
                _mm256_storeu_si256((__m256i *)(q + 64 * b + i), _mm256_permutevar8x32_epi32(packed, order));
            }
            d8[b] = 8.f * d[b] * hsum(_mm256_cvtepi32_ps(total));
        }
    }
    return a;
}

constexpr int ROWS = 4;  // weight rows computed together, sharing each activation load
// Weights are prefetched this many bytes ahead of their loads: a decode step streams every weight once, from memory,
// and the hardware prefetchers alone left the kernels at 10 GB/s there. Measured on gptq4's step (embedded model, run
// as AVX2 on a 2-core Xeon): 8.5-9.7 ms with none, 7.1-8.0 at 1 KB, 5.5-6.3 from 2 to 16 KB.
constexpr int AHEAD = 8192;

// y [M, N] float32: `rows(n0, m, out)` writes the outputs of rows n0..n0+ROWS for activation row m, threads over rows.
template <class Rows>
static at::Tensor run(const Activations &a, int64_t N, const Rows &rows) {
    TORCH_CHECK(N % ROWS == 0, "fastllama matmul: needs N % 4 == 0");
    at::Tensor y = at::empty({a.M, N}, a.scales.options());
    float *out = y.data_ptr<float>();
    at::parallel_for(0, N / ROWS, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n0 = begin * ROWS; n0 < end * ROWS; n0 += ROWS)
            for (int64_t m = 0; m < a.M; m++) rows(n0, m, out + m * N + n0);
    });
    return y;
}

static at::Tensor int4_matmul(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales_and_zeros,
                              int64_t group_size) {
    const Activations a = quantize(x);
    const int64_t K = a.K, N = packed.size(0), G = group_size, blocks = K / 64, per_group = G / 64, groups = K / G;
    TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte && packed.size(1) * 2 == K,
                "int4_matmul: packed must be contiguous uint8 [N, K/2] for x [M, K]");
    TORCH_CHECK(G % 64 == 0 && K % G == 0, "int4_matmul: needs G % 64 == 0 and K % G == 0");
    TORCH_CHECK(scales_and_zeros.is_contiguous() && scales_and_zeros.scalar_type() == at::kBFloat16
                && scales_and_zeros.numel() == N * groups * 2, "int4_matmul: scales_and_zeros must be bfloat16 [N, K/G, 2]");
    const uint8_t *w = packed.data_ptr<uint8_t>();
    const at::BFloat16 *sz = scales_and_zeros.data_ptr<at::BFloat16>();
    return run(a, N, [&](int64_t n0, int64_t m, float *out) {
        const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
        const int8_t *xq = a.row(m);
        const float *d = a.d(m), *xs = a.xs(m), *d8 = a.d8(m);
        __m256 acc[ROWS];
        float zero[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps(), zero[r] = 0.f;
        for (int64_t b = 0; b < blocks; b++) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 64 * b));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64 * b + 32));
            for (int r = 0; r < ROWS; r++) {
                const int64_t n = n0 + r;
                const at::BFloat16 *g = sz + 2 * (n * groups + b / per_group);
                const float s = bf16(g[0]);
                const uint8_t *wp = w + n * K / 2 + 32 * b;
                _mm_prefetch((const char *)(wp + AHEAD), _MM_HINT_T0);
                const __m256i wb = _mm256_loadu_si256((const __m256i *)wp);
                const __m256i lo = _mm256_and_si256(wb, low), hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), low);
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_set1_ps(s * d[b]), acc[r]);
                zero[r] += bf16(g[1]) * xs[b] - s * d8[b];
            }
        }
        for (int r = 0; r < ROWS; r++) out[r] = hsum(acc[r]) + zero[r];
    });
}

static at::Tensor int8_matmul(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &scales) {
    const Activations a = quantize(x);
    const int64_t K = a.K, N = weight.size(0), blocks = K / 64;
    TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kChar && weight.size(1) == K,
                "int8_matmul: weight must be contiguous int8 [N, K] for x [M, K]");
    TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kBFloat16 && scales.numel() == N,
                "int8_matmul: scales must be bfloat16 [N]");
    const int8_t *w = weight.data_ptr<int8_t>();
    const at::BFloat16 *s = scales.data_ptr<at::BFloat16>();
    return run(a, N, [&](int64_t n0, int64_t m, float *out) {
        const __m256i ones = _mm256_set1_epi16(1);
        const int8_t *xq = a.row(m);
        const float *d = a.d(m);
        __m256 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 64 * b));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64 * b + 32));
            for (int r = 0; r < ROWS; r++) {
                const int8_t *wr = w + (n0 + r) * K + 64 * b;
                _mm_prefetch((const char *)(wr + AHEAD), _MM_HINT_T0);
                const __m256i w0 = _mm256_loadu_si256((const __m256i *)wr);
                const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wr + 32));
                const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(x0, w0)), ones);
                const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(x1, w1)), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), _mm256_set1_ps(d[b]), acc[r]);
            }
        }
        for (int r = 0; r < ROWS; r++) out[r] = hsum(acc[r]) * bf16(s[n0 + r]);
    });
}

TORCH_LIBRARY(fastllama, m) {
    m.def("int4_matmul(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size) -> Tensor");
    m.def("int8_matmul(Tensor x, Tensor weight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastllama, CPU, m) {
    m.impl("int4_matmul", &int4_matmul);
    m.impl("int8_matmul", &int8_matmul);
}
