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
// float16 and bfloat16 are widened to float for the product and the accumulation,
// as the GPU kernels do.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
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
  std::vector<std::vector<acc_t>> packed(D);
  std::vector<int64_t> out_row(D * s.C_out, -1);
  int64_t max_k = 1, max_rows = 1;
  for (int64_t d = 0; d < D; ++d) {
    const DomainSlice& sl = slices[d];
    if (start[d + 1] == start[d]) continue;  // no samples: nothing to pack
    for (int64_t j = 0; j < sl.out_count; ++j) out_row[d * s.C_out + out_idx[sl.out_begin + j]] = j;
    packed[d].resize(sl.out_count * sl.in_count * KK);
    max_k = std::max(max_k, sl.in_count * KK);
    max_rows = std::max(max_rows, sl.out_count);
  }
  auto w = weight.accessor<scalar_t, 4>();
  at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) {
      if (packed[d].empty()) continue;
      const DomainSlice& sl = slices[d];
      const int64_t K = sl.in_count * KK;
      for (int64_t j = 0; j < sl.out_count; ++j) {
        const int64_t co = out_idx[sl.out_begin + j];
        for (int64_t i = 0; i < sl.in_count; ++i) {
          const int64_t ci = in_idx[sl.in_begin + i];
          for (int64_t r = 0; r < s.KH; ++r)
            for (int64_t t = 0; t < s.KW; ++t)
              packed[d][j * K + (i * s.KH + r) * s.KW + t] = static_cast<acc_t>(w[co][ci][r][t]);
        }
      }
    }
  });

  // Work items are tiles of whole output rows: big enough for an efficient GEMM,
  // small enough that the im2col tile (K x P) stays in the per-core L2 cache.
  // Whole rows let the im2col copy runs of contiguous pixels with no per-element
  // index math. When a whole image is smaller than that, one item takes several
  // consecutive samples of the same domain (the order is grouped by domain).
  struct Item { int64_t first, count, oh0, nrows, d; };
  const int64_t budget_elems = (int64_t(2) * 1024 * 1024) / int64_t(sizeof(acc_t));
  const int64_t rows_per_tile =
      std::min(s.Ho, std::max<int64_t>(1, budget_elems / (max_k * s.Wo)));
  const int64_t samples_per_tile =
      rows_per_tile < s.Ho ? 1 : std::max<int64_t>(1, budget_elems / (max_k * HWo));
  std::vector<Item> items;
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t first = start[d]; first < start[d + 1]; first += samples_per_tile) {
      const int64_t count = std::min(samples_per_tile, start[d + 1] - first);
      for (int64_t oh0 = 0; oh0 < s.Ho; oh0 += rows_per_tile)
        items.push_back({first, count, oh0, std::min(rows_per_tile, s.Ho - oh0), d});
    }
  }
  const int64_t P = samples_per_tile * rows_per_tile * s.Wo;

  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t xsN = x.stride(0), xsC = x.stride(1), xsH = x.stride(2), xsW = x.stride(3);
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t ysN = y.stride(0), ysC = y.stride(1), ysH = y.stride(2), ysW = y.stride(3);
  const bool channels_inner = ysC == 1 && s.C_out > 1;
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  const int64_t rsN = residual ? residual->stride(0) : 0, rsC = residual ? residual->stride(1) : 0,
                rsH = residual ? residual->stride(2) : 0, rsW = residual ? residual->stride(3) : 0;
  const scalar_t* scp = scale ? scale->data_ptr<scalar_t>() : nullptr;
  const scalar_t* shp = shift ? shift->data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cols(max_k * P);
    std::vector<acc_t> acc(max_rows * P);
    std::vector<int64_t> y_off(P), r_off(P);
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = items[it];
      const int64_t d = item.d, oh0 = item.oh0, nrows = item.nrows;
      const int64_t per_sample = nrows * s.Wo;
      const int64_t np = item.count * per_sample;
      const DomainSlice& sl = slices[d];
      const int64_t K = sl.in_count * KK;
      const int64_t rows = sl.out_count;

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
              acc_t* dst = cols.data() + ((i * s.KH + r) * s.KW + t) * np;
              for (int64_t m = 0; m < item.count; ++m) {
                const scalar_t* xc = xp + order[item.first + m] * xsN + x_chan;
                for (int64_t orow = 0; orow < nrows; ++orow, dst += s.Wo) {
                  const int64_t ih = (oh0 + orow) * s.sh - s.ph + r * s.dh;
                  if (ih < 0 || ih >= s.H) {
                    std::fill(dst, dst + s.Wo, acc_t(0));
                    continue;
                  }
                  std::fill(dst, dst + lo, acc_t(0));
                  const scalar_t* src = xc + ih * xsH + (lo * s.sw + off_w) * xsW;
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
          // acc[rows, np] = Wp[rows, K] @ cols[K, np] through ATen's BLAS (MKL on
          // x86); inside parallel_for it runs on this thread alone.
          const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
          at::Tensor a = at::from_blob(packed[d].data(), {rows, K}, opts);
          at::Tensor b = at::from_blob(cols.data(), {K, np}, opts);
          at::Tensor c = at::from_blob(acc.data(), {rows, np}, opts);
          at::mm_out(c, a, b);
        } else {
          std::fill(acc.begin(), acc.begin() + rows * np, acc_t(0));
        }
      }

      for (int64_t q = 0; q < np; ++q) {
        const int64_t n = order[item.first + q / per_sample];
        const int64_t oh = oh0 + (q % per_sample) / s.Wo, ow = q % s.Wo;
        y_off[q] = n * ysN + oh * ysH + ow * ysW;
        r_off[q] = n * rsN + oh * rsH + ow * rsW;
      }
      const int64_t* row_of = out_row.data() + d * s.C_out;
      auto emit = [&](int64_t c, int64_t q) {
        const int64_t j = row_of[c];
        acc_t v = 0;
        if (j >= 0) {
          v = acc[j * np + q];
          if (scp) v *= static_cast<acc_t>(scp[d * s.C_out + c]);
          if (shp) v += static_cast<acc_t>(shp[d * s.C_out + c]);
        }
        if (rp) v += static_cast<acc_t>(rp[r_off[q] + c * rsC]);
        if (relu && !(v > acc_t(0))) v = (v != v) ? v : acc_t(0);  // ReLU keeps NaN, like torch
        yp[y_off[q] + c * ysC] = static_cast<scalar_t>(v);
      };
      if (channels_inner) {
        for (int64_t q = 0; q < np; ++q)
          for (int64_t c = 0; c < s.C_out; ++c) emit(c, q);
      } else {
        for (int64_t c = 0; c < s.C_out; ++c)
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
