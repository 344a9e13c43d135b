// One decoding step's low-rank updates, read straight from a kind's stacked shard pools.
//
// At one token per row, an adapter's update is a few matrix-vector products: their cost is
// reading the factors. The torch path first gathers each layer's (G, r, d) factors from the
// pools into a buffer, then multiplies; this op never forms them. Row i of adapter g does
//
//   h[j]  = scale[g, j] * sum_c  x[i, c-th chunk] . pool_a[table_a[g, j, c]]      (j < r)
//   out[i, c-th chunk] += sum_j  h[j] * pool_b[table_b[g, j, c]]
//
// so it reads the pool rows its layer uses (a kind's pools are shared by all its layers, so they
// can stay in cache from one layer to the next) and writes nothing but its output row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace {

// V rank vectors at a time: V independent sums over one read of x, so that V pool rows stream
// in at once (memory-level parallelism; each row is short, d / l floats) and FMA latency is hidden.
template <int V>
inline void dot(const float* __restrict x, const float* const* s, int64_t n, float* acc) {
  // V accumulators of 16 floats (one AVX-512 register, two AVX2 ones), summed at the end
  constexpr int W = 16;
  float a[V][W] = {};
  int64_t k = 0;
  for (; k + W <= n; k += W)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
#pragma omp simd
      for (int w = 0; w < W; ++w) a[v][w] += x[k + w] * s[v][k + w];
  for (int v = 0; v < V; ++v) {
    float t = 0.f;
    for (int w = 0; w < W; ++w) t += a[v][w];
    for (int64_t q = k; q < n; ++q) t += x[q] * s[v][q];
    acc[v] += t;
  }
}

// y += sum_v h[v] s[v]: one pass over y for V rank vectors.
template <int V>
inline void axpy(const float* h, const float* const* s, float* __restrict y, int64_t n) {
  float hv[V];
  const float* p[V];
  for (int v = 0; v < V; ++v) hv[v] = h[v], p[v] = s[v];
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    float t = y[k];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) t += hv[v] * p[v][k];
    y[k] = t;
  }
}

// Calls f.template operator()<V>(j) for rank vectors [0, r) in blocks of V = 8, then 4, then 1.
template <class F>
inline void rank_blocks(int64_t r, F&& f) {
  int64_t j = 0;
  for (; j + 8 <= r; j += 8) f.template operator()<8>(j);
  for (; j + 4 <= r; j += 4) f.template operator()<4>(j);
  for (; j < r; ++j) f.template operator()<1>(j);
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "decode_update: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, "decode_update: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "decode_update: ", name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), "decode_update: ", name, " must be contiguous");
}

// x: (B, ..., d_in) of any float dtype (read as float32), out: (B, ..., d_out) float32, contiguous,
// updated in place: the leading dimensions are rows; pool_a: (N, d_in / l), pool_b: (N, d_out / l);
// table_a, table_b: (G, r, l) int64 rows of the pools; groups: (B,) int64, a row's adapter in [0, G)
// or -1 (no update); scale: (G, r) float32, each adapter's scaling times its layer scale.
void decode_update(const at::Tensor& x_in, const at::Tensor& out, const at::Tensor& pool_a, const at::Tensor& pool_b,
                   const at::Tensor& table_a, const at::Tensor& table_b, const at::Tensor& groups,
                   const at::Tensor& scale) {
  // the caller's (B, 1, d) views and dtype casts happen here, not in Python: one op call per layer
  TORCH_CHECK(x_in.device().is_cpu() && at::isFloatingType(x_in.scalar_type()), "decode_update: x must be a float CPU tensor");
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)}).to(at::kFloat).contiguous();
  check(out, "out", at::kFloat, out.dim());
  check(pool_a, "pool_a", at::kFloat, 2);
  check(pool_b, "pool_b", at::kFloat, 2);
  check(table_a, "table_a", at::kLong, 3);
  check(table_b, "table_b", at::kLong, 3);
  check(groups, "groups", at::kLong, 1);
  check(scale, "scale", at::kFloat, 2);
  const int64_t rows = x.size(0), d_in = x.size(1), d_out = out.size(-1);
  const int64_t G = table_a.size(0), r = table_a.size(1), l = table_a.size(2);
  const int64_t wa = pool_a.size(1), wb = pool_b.size(1);
  TORCH_CHECK(out.numel() == rows * d_out && groups.size(0) == rows, "decode_update: x, out and groups disagree on rows");
  TORCH_CHECK(table_b.sizes() == table_a.sizes(), "decode_update: table_a and table_b must have one shape");
  TORCH_CHECK(scale.size(0) == G && scale.size(1) == r, "decode_update: scale must be (G, r)");
  TORCH_CHECK(wa * l == d_in && wb * l == d_out, "decode_update: pool widths times l must be d_in and d_out");
  const float* X = x.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  const float* PA = pool_a.data_ptr<float>();
  const float* PB = pool_b.data_ptr<float>();
  const int64_t* TA = table_a.data_ptr<int64_t>();
  const int64_t* TB = table_b.data_ptr<int64_t>();
  const int64_t* GR = groups.data_ptr<int64_t>();
  const float* S = scale.data_ptr<float>();
  // a wrong row would read outside the pools: check every entry (G·r·l + B numbers, nothing next to the products)
  for (int64_t k = 0; k < G * r * l; ++k)
    TORCH_CHECK(TA[k] >= 0 && TA[k] < pool_a.size(0) && TB[k] >= 0 && TB[k] < pool_b.size(0),
                "decode_update: a table names a row outside its pool");
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(GR[i] >= -1 && GR[i] < G, "decode_update: groups must be in [-1, G)");
  // Work items of up to kRows rows of one adapter: each pool row read serves all of an item's
  // rows while it is in L1, and an adapter with many rows (one adapter, 32 rows) still splits
  // over threads.
  constexpr int64_t kRows = 8;
  std::vector<int64_t> first(G + 1, 0), order(rows);
  for (int64_t i = 0; i < rows; ++i)
    if (GR[i] >= 0) ++first[GR[i] + 1];
  for (int64_t g = 0; g < G; ++g) first[g + 1] += first[g];
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < rows; ++i)
    if (GR[i] >= 0) order[fill[GR[i]]++] = i;
  std::vector<std::pair<int64_t, int64_t>> items;  // (adapter, offset of its first row in order)
  for (int64_t g = 0; g < G; ++g)
    for (int64_t o = first[g]; o < first[g + 1]; o += kRows) items.emplace_back(g, o);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(kRows * r);
    for (int64_t it = begin; it < end; ++it) {
      const auto [g, o] = items[it];
      const int64_t m = std::min(kRows, first[g + 1] - o);
      const int64_t* R = order.data() + o;
      const int64_t* ta = TA + g * r * l;
      const int64_t* tb = TB + g * r * l;
      std::fill(h.begin(), h.end(), 0.f);
      for (int64_t c = 0; c < l; ++c)  // h[t, j] = chunk c of row t's x . pool row of rank vector j, summed over c
        rank_blocks(r, [&]<int V>(int64_t j) {
          const float* s[V];
          for (int v = 0; v < V; ++v) s[v] = PA + ta[(j + v) * l + c] * wa;
          for (int64_t t = 0; t < m; ++t) dot<V>(X + R[t] * d_in + c * wa, s, wa, &h[t * r + j]);
        });
      for (int64_t t = 0; t < m; ++t)
        for (int64_t j = 0; j < r; ++j) h[t * r + j] *= S[g * r + j];
      for (int64_t c = 0; c < l; ++c)  // chunk c of row t's out += sum_j h[t, j] pool row of rank vector j
        rank_blocks(r, [&]<int V>(int64_t j) {
          const float* s[V];
          for (int v = 0; v < V; ++v) s[v] = PB + tb[(j + v) * l + c] * wb;
          for (int64_t t = 0; t < m; ++t) axpy<V>(&h[t * r + j], s, Y + R[t] * d_out + c * wb, wb);
        });
    }
  });
}

}  // namespace

TORCH_LIBRARY(moslora, m) {
  m.def("decode_update(Tensor x, Tensor(a!) out, Tensor pool_a, Tensor pool_b, Tensor table_a, "
        "Tensor table_b, Tensor groups, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(moslora, CPU, m) { m.impl("decode_update", &decode_update); }
