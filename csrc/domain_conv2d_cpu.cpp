// fastmdl::domain_conv2d_cpu -- the fused mixed-domain convolution on the CPU.
//
// For sample n of domain d and output channel c:
//   y[n, c] = conv(x[n, in_d], W[c, in_d]) * scale[d, c] + shift[d, c]   if c in out_d
//           = 0                                                          otherwise
// then + residual (every channel), then ReLU.
//
// Work is cut into items of whole output rows of one or more samples of ONE
// domain (samples are grouped by domain, so its packed weight stays hot). Each item
// builds an im2col tile that reads ONLY the domain's input channels (the gather is
// part of the im2col), multiplies it by the domain's packed weight with one
// single-threaded BLAS call, and writes every output channel of the tile in the
// epilogue: affine on the domain's filters, zeros on the others, then residual and
// ReLU. Items run in parallel with at::parallel_for, so BLAS inside stays serial.
//
// Small images (squeeze-and-excitation layers, late 7x7 stages) need care, see
// benchmarks/NOTES.md "C++ kernel: small spatial, many filters": the per-thread
// buffers are sized by the largest tile that occurs (not by the cache budget), tiles
// 2-15 pixels wide are multiplied in the transposed layout MKL handles well, tiles
// are split by output-channel blocks when there are fewer of them than 2 x threads
// and handed to the threads largest first from a shared counter, and the NCHW
// epilogue runs as unit-stride loops the compiler vectorises.
//
// float16 and bfloat16 are widened to float for the product and the accumulation,
// as the GPU kernels do.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <type_traits>
#include <vector>

namespace fastmdl {
namespace {

struct Shape {
  int64_t N, C_in, H, W;
  int64_t C_out, KH, KW;
  int64_t Ho, Wo;
  int64_t sh, sw, ph, pw, dh, dw;
};

// One domain's slice of the CSR index lists.
struct DomainSlice {
  int64_t in_begin, in_count, out_begin, out_count;
};

// The output takes x's memory format: channels_last when x is densely
// channels_last (and not also plainly contiguous), contiguous otherwise. The
// Python fake implementation applies the same rule.
at::MemoryFormat output_memory_format(const at::Tensor& x) {
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

void check_index_list(const at::Tensor& index, const at::Tensor& offsets,
                      int64_t D, int64_t limit, const char* index_name,
                      const char* offsets_name) {
  TORCH_CHECK(offsets.numel() == D + 1, offsets_name, " must have D + 1 = ", D + 1,
              " entries, got ", offsets.numel());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* idx = index.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[D] == index.numel(), offsets_name,
              " must start at 0 and end at len(", index_name, ") = ", index.numel());
  for (int64_t d = 0; d < D; ++d) {
    TORCH_CHECK(off[d] <= off[d + 1], offsets_name, " must be non-decreasing");
    for (int64_t i = off[d]; i < off[d + 1]; ++i) {
      TORCH_CHECK(idx[i] >= 0 && idx[i] < limit, index_name, " entry ", idx[i],
                  " is out of range [0, ", limit, ")");
      TORCH_CHECK(i == off[d] || idx[i - 1] < idx[i], index_name,
                  " must be sorted and unique within each domain");
    }
  }
}

// f(std::integral_constant<bool, a>, ..b, ..c): three run-time flags as compile-time ones.
template <typename F>
void with_flags(bool a, bool b, bool c, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (a) {
    if (b) { if (c) f(T{}, T{}, T{}); else f(T{}, T{}, N{}); }
    else   { if (c) f(T{}, N{}, T{}); else f(T{}, N{}, N{}); }
  } else {
    if (b) { if (c) f(N{}, T{}, T{}); else f(N{}, T{}, N{}); }
    else   { if (c) f(N{}, N{}, T{}); else f(N{}, N{}, N{}); }
  }
}

// One contiguous run of the epilogue: y = relu(acc * a + b + residual), each part
// optional at compile time so that the loop vectorises.
template <bool HasAcc, bool HasRes, bool Relu, typename scalar_t, typename acc_t>
void epilogue_run(scalar_t* __restrict__ y, const scalar_t* __restrict__ res,
                  const acc_t* __restrict__ acc, acc_t a, acc_t b, int64_t len) {
  for (int64_t e = 0; e < len; ++e) {
    acc_t v = acc_t(0);
    if constexpr (HasAcc) v = acc[e] * a + b;
    if constexpr (HasRes) v += static_cast<acc_t>(res[e]);
    if constexpr (Relu) v = v < acc_t(0) ? acc_t(0) : v;
    y[e] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& domain,
         const at::Tensor& in_index, const at::Tensor& out_index,
         const std::vector<DomainSlice>& slices,
         const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
         const c10::optional<at::Tensor>& residual, bool relu, const Shape& s,
         at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = static_cast<int64_t>(slices.size());
  const int64_t KK = s.KH * s.KW;
  const int64_t HWo = s.Ho * s.Wo;

  // Samples grouped by domain (counting sort: stable, O(N)).
  const int64_t* dom = domain.data_ptr<int64_t>();
  std::vector<int64_t> order(s.N), start(D + 1, 0);
  for (int64_t n = 0; n < s.N; ++n) start[dom[n] + 1]++;
  for (int64_t d = 0; d < D; ++d) start[d + 1] += start[d];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < s.N; ++n) order[fill[dom[n]]++] = n;
  }

  // Per-domain packed weights Wp_d[j, k], k = (ci_local * KH + r) * KW + t, and
  // the map from output channel to the domain's filter row (or -1).
  const int64_t* in_idx = in_index.data_ptr<int64_t>();
  const int64_t* out_idx = out_index.data_ptr<int64_t>();
  // Packed rows are gathered in parallel over every domain's rows together (D alone
  // is often smaller than the thread count) straight from the weight's memory.
  std::vector<std::unique_ptr<acc_t[]>> packed(D);  // uninitialised: every entry is written
  std::vector<int64_t> out_row(D * s.C_out, -1);
  std::vector<int64_t> row_start(D + 1, 0);  // domain d's rows are [row_start[d], row_start[d+1])
  int64_t max_k = 1, max_rows = 1;
  for (int64_t d = 0; d < D; ++d) {
    const DomainSlice& sl = slices[d];
    row_start[d + 1] = row_start[d];
    if (start[d + 1] == start[d]) continue;  // no samples: nothing to pack
    for (int64_t j = 0; j < sl.out_count; ++j) out_row[d * s.C_out + out_idx[sl.out_begin + j]] = j;
    if (sl.out_count * sl.in_count > 0) packed[d].reset(new acc_t[sl.out_count * sl.in_count * KK]);
    row_start[d + 1] += sl.in_count > 0 ? sl.out_count : 0;
    max_k = std::max(max_k, sl.in_count * KK);
    max_rows = std::max(max_rows, sl.out_count);
  }
  {
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const int64_t wsO = weight.stride(0), wsI = weight.stride(1), wsH = weight.stride(2),
                  wsW = weight.stride(3);
    const int64_t total_rows = row_start[D];
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, max_k));
    at::parallel_for(0, total_rows, grain, [&](int64_t g0, int64_t g1) {
      int64_t d = std::upper_bound(row_start.begin(), row_start.end(), g0) - row_start.begin() - 1;
      for (int64_t g = g0; g < g1; ++g) {
        while (g >= row_start[d + 1]) ++d;
        const DomainSlice& sl = slices[d];
        const int64_t j = g - row_start[d];
        const int64_t K = sl.in_count * KK;
        const int64_t* ci = in_idx + sl.in_begin;
        const scalar_t* wrow = wp + out_idx[sl.out_begin + j] * wsO;
        acc_t* dst = packed[d].get() + j * K;
        if (KK == 1) {
          for (int64_t i = 0; i < sl.in_count; ++i) dst[i] = static_cast<acc_t>(wrow[ci[i] * wsI]);
        } else {
          for (int64_t i = 0; i < sl.in_count; ++i) {
            const scalar_t* wc = wrow + ci[i] * wsI;
            for (int64_t r = 0; r < s.KH; ++r)
              for (int64_t t = 0; t < s.KW; ++t) *dst++ = static_cast<acc_t>(wc[r * wsH + t * wsW]);
          }
        }
      }
    });
  }

  // Work items are tiles of whole output rows: big enough for an efficient GEMM,
  // small enough that the im2col tile (K x P) stays in the per-core L2 cache.
  // Whole rows let the im2col copy runs of contiguous pixels with no per-element
  // index math. When a whole image is smaller than that, one item takes several
  // consecutive samples of the same domain (the order is grouped by domain).
  //
  // The per-thread buffers are sized by the largest tile that actually occurs (P
  // columns), never by the budget: with a 1x1 image and a small K the budget alone
  // would allow tens of thousands of samples per tile, and acc (max_rows x P) ran to
  // 60 MB per thread per call for a squeeze-and-excitation layer of batch 4.
  // An item covers output channels [c0, c1) of its pixels (all of them unless split below).
  struct Item { int64_t first, count, oh0, nrows, d, c0, c1; };
  const int64_t budget_elems = (int64_t(2) * 1024 * 1024) / int64_t(sizeof(acc_t));
  int64_t max_samples = 1;  // the most samples any one domain has
  for (int64_t d = 0; d < D; ++d) max_samples = std::max(max_samples, start[d + 1] - start[d]);
  const int64_t rows_per_tile =
      std::min(s.Ho, std::max<int64_t>(1, budget_elems / (max_k * s.Wo)));
  const int64_t samples_per_tile =
      rows_per_tile < s.Ho
          ? 1
          : std::min(max_samples, std::max<int64_t>(1, budget_elems / (max_k * HWo)));
  std::vector<Item> items;
  int64_t P = 1;  // columns of the largest tile
  for (int64_t d = 0; d < D; ++d) {
    // The domain's samples in equal tiles (11 samples at most 10 a tile: 6 + 5, not 10 + 1).
    const int64_t n_d = start[d + 1] - start[d];
    const int64_t tiles = (n_d + samples_per_tile - 1) / samples_per_tile;
    for (int64_t t = 0, first = start[d]; t < tiles; ++t) {
      const int64_t count = n_d / tiles + (t < n_d % tiles ? 1 : 0);
      const int64_t tile_first = first;
      first += count;
      for (int64_t oh0 = 0; oh0 < s.Ho; oh0 += rows_per_tile) {
        const int64_t nrows = std::min(rows_per_tile, s.Ho - oh0);
        items.push_back({tile_first, count, oh0, nrows, d, 0, s.C_out});
        P = std::max(P, count * nrows * s.Wo);
      }
    }
  }

  // Too few tiles to keep every thread busy (a batch of one, or one tile per domain
  // on small images): split each tile's output channels into blocks, which also
  // splits the domain's weight rather than reading it twice. Only tiles with enough
  // work (>= 256K multiply-adds) are split; their rows are [j0, j1) of the domain's
  // packed weight, those of its filters that lie in [c0, c1).
  {
    const int64_t threads = at::get_num_threads();
    const int64_t n_items = static_cast<int64_t>(items.size());
    if (threads > 1 && n_items < 2 * threads) {
      const int64_t split = std::min<int64_t>((2 * threads + n_items - 1) / n_items,
                                              std::max<int64_t>(1, s.C_out / 64));
      std::vector<Item> split_items;
      for (const Item& item : items) {
        const DomainSlice& sl = slices[item.d];
        const int64_t work = sl.out_count * sl.in_count * KK * item.count * item.nrows * s.Wo;
        const int64_t parts = work >= (int64_t(1) << 18) ? split : 1;
        for (int64_t b = 0; b < parts; ++b) {
          Item part = item;
          part.c0 = s.C_out * b / parts;
          part.c1 = s.C_out * (b + 1) / parts;
          split_items.push_back(part);
        }
      }
      items.swap(split_items);
    }
  }
  // Largest tiles first; the threads take them from a shared counter (below), so
  // uneven tiles still spread evenly over the threads.
  auto item_work = [&](const Item& it) {
    const DomainSlice& sl = slices[it.d];
    return (sl.out_count * (it.c1 - it.c0) / s.C_out + 1) * (sl.in_count * KK + 1) * it.count *
           it.nrows * s.Wo;
  };
  std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
    return item_work(a) > item_work(b);
  });

  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t xsN = x.stride(0), xsC = x.stride(1), xsH = x.stride(2), xsW = x.stride(3);
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t ysN = y.stride(0), ysC = y.stride(1), ysH = y.stride(2), ysW = y.stride(3);
  const bool channels_inner = ysC == 1 && s.C_out > 1;
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  const int64_t rsN = residual ? residual->stride(0) : 0, rsC = residual ? residual->stride(1) : 0,
                rsH = residual ? residual->stride(2) : 0, rsW = residual ? residual->stride(3) : 0;
  // y (and the residual, if any) hold each channel's output rows back to back.
  const bool rows_contiguous = !channels_inner && ysW == 1 && ysH == s.Wo &&
                               (!residual || (rsW == 1 && rsH == s.Wo));
  const scalar_t* scp = scale ? scale->data_ptr<scalar_t>() : nullptr;
  const scalar_t* shp = shift ? shift->data_ptr<scalar_t>() : nullptr;

  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_items);
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Uninitialised on purpose: the im2col writes every column of cols it reads, the
    // GEMM (or the fill for K = 0) every element of acc, and y_off/r_off are set per tile.
    std::unique_ptr<acc_t[]> cols(new acc_t[max_k * P]);
    std::unique_ptr<acc_t[]> acc(new acc_t[max_rows * P]);
    std::unique_ptr<int64_t[]> y_off(new int64_t[P]), r_off(new int64_t[P]);
    for (;;) {
      const int64_t it = next_item.fetch_add(1, std::memory_order_relaxed);
      if (it >= n_items) break;
      const Item& item = items[it];
      const int64_t d = item.d, oh0 = item.oh0, nrows = item.nrows;
      const int64_t per_sample = nrows * s.Wo;
      const int64_t np = item.count * per_sample;
      const DomainSlice& sl = slices[d];
      const int64_t K = sl.in_count * KK;
      // The domain's packed rows [j0, j1) are its filters in [c0, c1).
      const int64_t* od = out_idx + sl.out_begin;
      const int64_t j0 = std::lower_bound(od, od + sl.out_count, item.c0) - od;
      const int64_t j1 = std::lower_bound(od, od + sl.out_count, item.c1) - od;
      const int64_t rows = j1 - j0;
      const acc_t* wd = packed[d] ? packed[d].get() + j0 * K : nullptr;

      // Narrow tiles (small images: 2 <= np < 16 columns) are laid out transposed,
      // cols^T[np, K] and acc^T[np, rows]: MKL's sgemm takes 2.5-8x longer on
      // Wp[rows, K] @ cols[K, np] at those widths than on cols^T @ Wp^T (measured on
      // 1024 x 256 x 3: 297 vs 71 us), and the same at np = 1 or np >= 16.
      const bool tr = np >= 2 && np < 16;
      const int64_t ps = tr ? K : 1;            // cols stride between columns (pixels)
      const int64_t ks = tr ? 1 : np;           // cols stride between rows (taps)
      const int64_t acc_js = tr ? 1 : np, acc_qs = tr ? rows : 1;
      if (rows > 0) {
        // im2col over the domain's input channels only, one output row at a time:
        // the valid output columns [lo, hi) of each tap are found once per tap.
        for (int64_t i = 0; i < sl.in_count; ++i) {
          const int64_t x_chan = in_idx[sl.in_begin + i] * xsC;
          for (int64_t r = 0; r < s.KH; ++r) {
            for (int64_t t = 0; t < s.KW; ++t) {
              const int64_t off_w = t * s.dw - s.pw;  // iw = ow * sw + off_w
              const int64_t lo = std::min(s.Wo, off_w >= 0 ? 0 : (-off_w + s.sw - 1) / s.sw);
              const int64_t hi = std::max(lo, std::min(s.Wo, (s.W - 1 - off_w) / s.sw + 1));
              const int64_t step = s.sw * xsW;
              acc_t* dst = cols.get() + ((i * s.KH + r) * s.KW + t) * ks;
              for (int64_t m = 0; m < item.count; ++m) {
                const scalar_t* xc = xp + order[item.first + m] * xsN + x_chan;
                for (int64_t orow = 0; orow < nrows; ++orow, dst += s.Wo * ps) {
                  const int64_t ih = (oh0 + orow) * s.sh - s.ph + r * s.dh;
                  if (ih < 0 || ih >= s.H) {
                    for (int64_t ow = 0; ow < s.Wo; ++ow) dst[ow * ps] = acc_t(0);
                    continue;
                  }
                  const scalar_t* src = xc + ih * xsH + (lo * s.sw + off_w) * xsW;
                  if (tr) {
                    for (int64_t ow = 0; ow < s.Wo; ++ow)
                      dst[ow * ps] = ow >= lo && ow < hi
                                         ? static_cast<acc_t>(src[(ow - lo) * step])
                                         : acc_t(0);
                    continue;
                  }
                  std::fill(dst, dst + lo, acc_t(0));
                  if (step == 1) {
                    for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = static_cast<acc_t>(src[ow - lo]);
                  } else {
                    for (int64_t ow = lo; ow < hi; ++ow)
                      dst[ow] = static_cast<acc_t>(src[(ow - lo) * step]);
                  }
                  std::fill(dst + hi, dst + s.Wo, acc_t(0));
                }
              }
            }
          }
        }
        if (K > 0) {
          // acc[rows, np] = Wp[rows, K] @ cols[K, np] (or its transpose) through
          // ATen's BLAS (MKL on x86); inside parallel_for it runs on this thread alone.
          const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
          if (tr) {
            at::Tensor a = at::from_blob(cols.get(), {np, K}, opts);
            at::Tensor b = at::from_blob(const_cast<acc_t*>(wd), {K, rows}, {1, K}, opts);
            at::Tensor c = at::from_blob(acc.get(), {np, rows}, opts);
            at::mm_out(c, a, b);
          } else {
            at::Tensor a = at::from_blob(const_cast<acc_t*>(wd), {rows, K}, opts);
            at::Tensor b = at::from_blob(cols.get(), {K, np}, opts);
            at::Tensor c = at::from_blob(acc.get(), {rows, np}, opts);
            at::mm_out(c, a, b);
          }
        } else {
          std::fill(acc.get(), acc.get() + rows * np, acc_t(0));
        }
      }

      const int64_t* row_of = out_row.data() + d * s.C_out;
      if (rows_contiguous && !tr) {
        // NCHW output (and residual) with whole rows per tile: each sample's pixels of
        // one channel are one contiguous run in y, the residual and acc, so the
        // epilogue is a unit-stride loop the compiler vectorises.
        for (int64_t c = item.c0; c < item.c1; ++c) {
          const int64_t j = row_of[c] >= 0 ? row_of[c] - j0 : -1;
          const acc_t a = (j >= 0 && scp) ? static_cast<acc_t>(scp[d * s.C_out + c]) : acc_t(1);
          const acc_t b = (j >= 0 && shp) ? static_cast<acc_t>(shp[d * s.C_out + c]) : acc_t(0);
          for (int64_t m = 0; m < item.count; ++m) {
            const int64_t n = order[item.first + m];
            scalar_t* yo = yp + n * ysN + c * ysC + oh0 * ysH;
            const scalar_t* ro = rp ? rp + n * rsN + c * rsC + oh0 * rsH : nullptr;
            const acc_t* ao = j >= 0 ? acc.get() + j * np + m * per_sample : nullptr;
            with_flags(ao != nullptr, ro != nullptr, relu, [&](auto has_acc, auto has_res, auto do_relu) {
              epilogue_run<decltype(has_acc)::value, decltype(has_res)::value,
                           decltype(do_relu)::value>(yo, ro, ao, a, b, per_sample);
            });
          }
        }
        continue;
      }

      for (int64_t q = 0; q < np; ++q) {
        const int64_t n = order[item.first + q / per_sample];
        const int64_t oh = oh0 + (q % per_sample) / s.Wo, ow = q % s.Wo;
        y_off[q] = n * ysN + oh * ysH + ow * ysW;
        r_off[q] = n * rsN + oh * rsH + ow * rsW;
      }
      auto emit = [&](int64_t c, int64_t q) {
        const int64_t j = row_of[c] >= 0 ? row_of[c] - j0 : -1;
        acc_t v = 0;
        if (j >= 0) {
          v = acc[j * acc_js + q * acc_qs];
          if (scp) v *= static_cast<acc_t>(scp[d * s.C_out + c]);
          if (shp) v += static_cast<acc_t>(shp[d * s.C_out + c]);
        }
        if (rp) v += static_cast<acc_t>(rp[r_off[q] + c * rsC]);
        // ReLU as a select, not a branch (a branch on the sign mispredicts half the
        // time); NaN < 0 is false, so NaN (and -0.0) stay, as torch.relu keeps them.
        if (relu) v = v < acc_t(0) ? acc_t(0) : v;
        yp[y_off[q] + c * ysC] = static_cast<scalar_t>(v);
      };
      if (channels_inner) {
        for (int64_t q = 0; q < np; ++q)
          for (int64_t c = item.c0; c < item.c1; ++c) emit(c, q);
      } else {
        for (int64_t c = item.c0; c < item.c1; ++c)
          for (int64_t q = 0; q < np; ++q) emit(c, q);
      }
    }
  });
}

at::Tensor domain_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& domain, const at::Tensor& in_index,
                             const at::Tensor& in_offsets, const at::Tensor& out_index,
                             const at::Tensor& out_offsets,
                             const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift,
                             const c10::optional<at::Tensor>& residual, bool relu,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C_in, H, W)");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1),
              "weight must be (C_out, C_in, kh, kw) with C_in = x.size(1)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must have two entries");
  for (const at::Tensor* t : {&x, &weight, &domain, &in_index, &in_offsets, &out_index, &out_offsets})
    TORCH_CHECK(t->device().is_cpu(), "domain_conv2d_cpu takes CPU tensors");
  for (const at::Tensor* t : {&domain, &in_index, &in_offsets, &out_index, &out_offsets})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1, "index tensors must be 1-D int64");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype");

  Shape s;
  s.N = x.size(0); s.C_in = x.size(1); s.H = x.size(2); s.W = x.size(3);
  s.C_out = weight.size(0); s.KH = weight.size(2); s.KW = weight.size(3);
  s.sh = stride[0]; s.sw = stride[1]; s.ph = padding[0]; s.pw = padding[1];
  s.dh = dilation[0]; s.dw = dilation[1];
  TORCH_CHECK(s.sh > 0 && s.sw > 0 && s.dh > 0 && s.dw > 0 && s.ph >= 0 && s.pw >= 0,
              "stride and dilation must be positive, padding non-negative");
  s.Ho = (s.H + 2 * s.ph - s.dh * (s.KH - 1) - 1) / s.sh + 1;
  s.Wo = (s.W + 2 * s.pw - s.dw * (s.KW - 1) - 1) / s.sw + 1;
  TORCH_CHECK(s.Ho > 0 && s.Wo > 0, "the output would be empty: input too small for the kernel");
  TORCH_CHECK(domain.numel() == s.N, "domain must have one entry per sample");

  const int64_t D = in_offsets.numel() - 1;
  TORCH_CHECK(D >= 1, "in_offsets must have at least two entries");
  at::Tensor in_idx = in_index.contiguous(), in_off = in_offsets.contiguous();
  at::Tensor out_idx = out_index.contiguous(), out_off = out_offsets.contiguous();
  at::Tensor dom = domain.contiguous();
  check_index_list(in_idx, in_off, D, s.C_in, "in_index", "in_offsets");
  check_index_list(out_idx, out_off, D, s.C_out, "out_index", "out_offsets");
  const int64_t* dp = dom.data_ptr<int64_t>();
  for (int64_t n = 0; n < s.N; ++n)
    TORCH_CHECK(dp[n] >= 0 && dp[n] < D, "domain id ", dp[n], " is out of range [0, ", D, ")");

  c10::optional<at::Tensor> sc, sf, res;
  if (scale) {
    TORCH_CHECK(scale->sizes() == at::IntArrayRef({D, s.C_out}) && scale->scalar_type() == x.scalar_type(),
                "scale must be (D, C_out) with x's dtype");
    sc = scale->contiguous();
  }
  if (shift) {
    TORCH_CHECK(shift->sizes() == at::IntArrayRef({D, s.C_out}) && shift->scalar_type() == x.scalar_type(),
                "shift must be (D, C_out) with x's dtype");
    sf = shift->contiguous();
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({s.N, s.C_out, s.Ho, s.Wo}) &&
                    residual->scalar_type() == x.scalar_type(),
                "residual must have the output's shape and x's dtype");
    res = *residual;
  }

  std::vector<DomainSlice> slices(D);
  const int64_t* io = in_off.data_ptr<int64_t>();
  const int64_t* oo = out_off.data_ptr<int64_t>();
  for (int64_t d = 0; d < D; ++d)
    slices[d] = {io[d], io[d + 1] - io[d], oo[d], oo[d + 1] - oo[d]};

  at::Tensor y = at::empty({s.N, s.C_out, s.Ho, s.Wo},
                           x.options().memory_format(output_memory_format(x)));
  if (s.N == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "domain_conv2d_cpu", [&] {
    run<scalar_t>(x, weight, dom, in_idx, out_idx, slices, sc, sf, res, relu, s, y);
  });
  return y;
}

}  // namespace

// The schema of the public op fastmdl::domain_conv2d lives in Python
// (fastmdl/_ops.py); this fragment adds the C++ kernel as its own op so that it
// can be called, tested and traced on its own.
TORCH_LIBRARY_FRAGMENT(fastmdl, m) {
  m.def(
      "domain_conv2d_cpu(Tensor x, Tensor weight, Tensor domain, Tensor in_index, "
      "Tensor in_offsets, Tensor out_index, Tensor out_offsets, Tensor? scale, "
      "Tensor? shift, Tensor? residual, bool relu, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmdl, CPU, m) {
  m.impl("domain_conv2d_cpu", &domain_conv2d_cpu);
}

}  // namespace fastmdl
