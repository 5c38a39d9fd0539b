// libmoe's fused CPU expert kernel: the `fused` dispatch backend (see dispatch.py).
//
// For x [T, D], rows sorted by expert (tok [N] token of each row, counts [E] rows per expert,
// w [N] each row's routing weight):
//
//     y[tok[r]] += (act(x[tok[r]] @ w1[e] + b1[e]) * gate * w[r]) @ w2[e] + w[r] * b2[e]
//
// Each expert's rows (in blocks of at most `block_rows`) are gathered into a small per-thread
// buffer, multiplied (ATen's mm, i.e. MKL), activated (ATen's vectorised kernels; plain ReLU in
// place) and weighted in one pass, multiplied again and added straight into the output; backward
// saves only the hidden pre-activation (post-ReLU for plain ReLU) and the gate projection. The
// loop over experts is C++, so there is no per-expert Python work; with `parallel`, the experts
// are shared out between the intra-op threads by a fixed plan (largest first, each to the least
// loaded thread: deterministic), each running single-threaded matmuls into its own output
// accumulator, which are summed at the end; otherwise the row loops and the matmuls use the
// threads. This is the computation of `_BlockedExperts` in dispatch.py (its rounding differs:
// other summation orders). Measured no faster than it on the 2-core development CPU
// (docs/performance.md, "Fine-grained experts").

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

enum Activation : int64_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

// act(h) into `out`, by ATen's vectorised kernels (ReLU only for gated ReLU; plain ReLU is done in
// place by the loops below).
void act_out(at::Tensor out, const at::Tensor& h, int64_t act) {
  switch (act) {
    case kRelu: at::clamp_min_out(out, h, 0); break;
    case kGelu: at::gelu_out(out, h, "none"); break;
    case kGeluTanh: at::gelu_out(out, h, "tanh"); break;
    default: at::silu_out(out, h); break;
  }
}

// grad *= act'(h), in place, by ATen's kernels (plain ReLU: h kept post-ReLU, the same mask).
void act_backward_(at::Tensor grad, const at::Tensor& h, int64_t act) {
  switch (act) {
    case kRelu: at::threshold_backward_out(grad, grad, h, 0); break;
    case kGelu: at::gelu_backward_out(grad, grad, h, "none"); break;
    case kGeluTanh: at::gelu_backward_out(grad, grad, h, "tanh"); break;
    default: at::silu_backward_out(grad, grad, h); break;
  }
}

// Runs f(begin, end) over row ranges of [0, rows) on the intra-op threads (inline when already
// inside a parallel region, i.e. when the experts themselves are shared out between threads).
template <typename F>
void over_rows(int64_t rows, int64_t width, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)), f);
}

// The weighting pass over one block of c rows of width M: dst = v (* g) * w, v = src, or, with
// RELU_IN_PLACE (plain ReLU experts), v = relu(src) written back into src (all backward needs).
// KEEP also stores v (* g), unweighted, in `keep`. Forward: src the hidden activation, dst the
// output projection's input; backward: src act(h), dst (and keep, gated) recomputed.
template <bool GATED, bool RELU_IN_PLACE, bool KEEP, typename T>
void weigh_rows(T* src, const T* g, T* keep, T* dst, const T* w, int64_t c, int64_t M) {
  over_rows(c, M, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* sr = src + r * M;
      T* dr = dst + r * M;
      T* kr = KEEP ? keep + r * M : nullptr;
      const T* gr = GATED ? g + r * M : nullptr;
      const T wr = w[r];
#pragma omp simd
      for (int64_t j = 0; j < M; ++j) {
        T v = sr[j];
        if constexpr (RELU_IN_PLACE) {
          v = v > T(0) ? v : T(0);
          sr[j] = v;
        }
        if constexpr (GATED) v *= gr[j];
        if constexpr (KEEP) kr[j] = v;
        dr[j] = v * wr;
      }
    }
  });
}

// Backward hidden pass 2, per row: ga = ga * w (* g), the gradient of act(h), and, gated,
// gg = ga * w * t, the gradient of the gate projection. (act'(h) is applied after, by
// act_backward_; the weight gradient <ga, a> before, by ATen.)
template <bool GATED, typename T>
void hidden_backward(T* ga, const T* t, const T* g, T* gg, const T* w, int64_t c, int64_t M) {
  over_rows(c, M, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* gar = ga + r * M;
      const T* tr = t + r * M;
      const T* gr = GATED ? g + r * M : nullptr;
      T* ggr = GATED ? gg + r * M : nullptr;
      const T wr = w[r];
#pragma omp simd
      for (int64_t j = 0; j < M; ++j) {
        T gai = gar[j] * wr;
        if constexpr (GATED) {
          ggr[j] = gai * tr[j];
          gai *= gr[j];
        }
        gar[j] = gai;
      }
    }
  });
}

// The output is (a @ w2 + b2) * w: each row's weight gradient gets <gy[r], b2> too.
template <typename T>
void add_row_dots(T* gw, const T* gy, const T* b2, int64_t c, int64_t width) {
  for (int64_t r = 0; r < c; ++r) {
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < width; ++j) dot += gy[r * width + j] * b2[j];
    gw[r] += dot;
  }
}

// Copies rows src[idx[r]] (width `width`) into dst[r].
template <typename T>
inline void gather_rows(T* dst, const T* src, const int64_t* idx, int64_t rows, int64_t width) {
  over_rows(rows, width, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::memcpy(dst + r * width, src + idx[r] * width, sizeof(T) * width);
    }
  });
}

// dst[idx[r]] += src[r]. The rows of one expert block are distinct tokens (a token picks an
// expert at most once), so the rows can be shared out between threads.
template <typename T>
inline void scatter_add_rows(T* dst, const T* src, const int64_t* idx, int64_t rows, int64_t width) {
  over_rows(rows, width, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* out = dst + idx[r] * width;
      const T* in = src + r * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) out[j] += in[j];
    }
  });
}

// The experts that got rows, shared out between `threads` workers: one worker takes them in
// expert order; several get a fixed share each, the largest experts first, each to the worker
// with the fewest rows so far. Fixed by the counts alone, so that every worker's accumulator
// sums the same experts in the same order at every call: results do not depend on timing.
std::vector<std::vector<int64_t>> share_out(const std::vector<int64_t>& counts, int64_t threads) {
  std::vector<int64_t> order;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
    if (counts[e] > 0) order.push_back(e);
  }
  std::vector<std::vector<int64_t>> shares(threads);
  if (threads == 1) {
    shares[0] = order;
    return shares;
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  std::vector<int64_t> load(threads, 0);
  for (int64_t e : order) {
    const auto least = std::min_element(load.begin(), load.end()) - load.begin();
    shares[least].push_back(e);
    load[least] += counts[e];
  }
  return shares;
}

// Runs body(expert, worker) for every expert of every share: each share on an intra-op thread,
// or everything on the calling thread when there is one share (ATen's matmuls then use their
// own threading).
template <typename F>
void for_each_expert(const std::vector<std::vector<int64_t>>& shares, const F& body) {
  const int64_t workers = static_cast<int64_t>(shares.size());
  if (workers == 1) {
    for (int64_t e : shares[0]) body(e, 0);
    return;
  }
  // The workers' ATen calls must see the caller's grad mode (off, inside autograd's forward and
  // backward). Only that: copying the whole thread-local state would copy Python objects (saved
  // tensor hooks) and deadlock on the GIL.
  const bool grad = at::GradMode::is_enabled();
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    const at::AutoGradMode guard(grad);
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t e : shares[w]) body(e, w);
    }
  });
}

int64_t thread_count(bool parallel, const std::vector<int64_t>& counts) {
  if (!parallel) return 1;
  const int64_t with_rows = std::count_if(counts.begin(), counts.end(), [](int64_t c) { return c > 0; });
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), with_rows));
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> start(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), start.begin() + 1);
  return start;
}

std::vector<int64_t> to_vector(const at::Tensor& counts) {
  auto c = counts.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// out = a @ b (first) or out += a @ b.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool first) {
  if (first) at::mm_out(out, a, b);
  else out.addmm_(a, b);
}

// out = a.sum(0) (first) or out += a.sum(0).
void sum_into(at::Tensor out, const at::Tensor& a, bool first) {
  if (first) at::sum_out(out, a, {0});
  else out.add_(a.sum(0));
}

// What forward and backward share: the counts on the host, each expert's first row, the block
// size, the largest buffer, the threads and their shares of the experts.
struct Plan {
  std::vector<int64_t> counts, start;
  int64_t rows, cmax, threads;
  std::vector<std::vector<int64_t>> shares;

  Plan(const at::Tensor& counts_t, bool parallel, int64_t block_rows)
      : counts(to_vector(counts_t)), start(offsets_of(counts)) {
    const int64_t largest = counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
    rows = block_rows > 0 ? block_rows : std::max<int64_t>(largest, 1);
    cmax = std::min(largest, rows);
    threads = thread_count(parallel, counts);
    shares = share_out(counts, threads);
  }
};

// Sums the per-thread accumulators 1.. into accumulator 0.
void reduce_into(at::Tensor& out, std::vector<at::Tensor>& extra) {
  for (auto& t : extra) out.add_(t);
}

}  // namespace

// Returns {y [T, D_out], h [N, M] (saved), g [N, M] (saved, gated only; else empty)}.
std::vector<at::Tensor> fused_experts_forward(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& w1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& w3, const c10::optional<at::Tensor>& b1,
    const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& b3,
    const at::Tensor& tok, const at::Tensor& counts_t, int64_t act, bool parallel,
    int64_t block_rows) {
  TORCH_CHECK(x.is_contiguous() && w1.is_contiguous() && w2.is_contiguous(), "contiguous inputs");
  const Plan plan(counts_t, parallel, block_rows);
  const auto& [counts, start, rows, cmax, threads, shares] = plan;
  const int64_t T = x.size(0), D = x.size(1), M = w1.size(2), Dout = w2.size(2);
  const int64_t N = start.back();
  const bool gated = w3.has_value();
  const bool inplace_relu = act == kRelu && !gated;

  auto y = at::zeros({T, Dout}, x.options());
  auto h_all = at::empty({N, M}, x.options());
  auto g_all = gated ? at::empty({N, M}, x.options()) : at::Tensor();
  std::vector<at::Tensor> y_extra;
  for (int64_t i = 1; i < threads; ++i) y_extra.push_back(at::zeros({T, Dout}, x.options()));
  std::vector<at::Tensor> xbuf, abuf, obuf;
  for (int64_t i = 0; i < threads; ++i) {
    xbuf.push_back(at::empty({cmax, D}, x.options()));
    abuf.push_back(at::empty({cmax, M}, x.options()));
    obuf.push_back(at::empty({cmax, Dout}, x.options()));
  }
  const int64_t* tok_p = tok.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_experts_forward", [&] {
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    const scalar_t* w_p = w.data_ptr<scalar_t>();
    for_each_expert(shares, [&](int64_t e, int64_t tid) {
     for (int64_t r0 = 0; r0 < counts[e]; r0 += rows) {  // blocks of at most `rows` rows
      const int64_t c = std::min(rows, counts[e] - r0), s = start[e] + r0;
      const int64_t* t = tok_p + s;
      auto xe = xbuf[tid].narrow(0, 0, c);
      gather_rows(xe.data_ptr<scalar_t>(), x_p, t, c, D);
      auto h = h_all.narrow(0, s, c);
      if (b1.has_value()) at::addmm_out(h, b1->select(0, e), xe, w1.select(0, e));
      else at::mm_out(h, xe, w1.select(0, e));
      const scalar_t* we = w_p + s;
      const scalar_t* g_p = nullptr;
      if (gated) {
        auto g = g_all.narrow(0, s, c);
        if (b3.has_value()) at::addmm_out(g, b3->select(0, e), xe, w3->select(0, e));
        else at::mm_out(g, xe, w3->select(0, e));
        g_p = g.data_ptr<scalar_t>();
      }
      scalar_t* h_p = h.data_ptr<scalar_t>();
      scalar_t* a_p = abuf[tid].data_ptr<scalar_t>();  // the output projection's input
      if (inplace_relu) {
        weigh_rows<false, true, false, scalar_t>(h_p, g_p, nullptr, a_p, we, c, M);
      } else {
        act_out(abuf[tid].narrow(0, 0, c), h, act);
        if (gated) weigh_rows<true, false, false, scalar_t>(a_p, g_p, nullptr, a_p, we, c, M);
        else weigh_rows<false, false, false, scalar_t>(a_p, g_p, nullptr, a_p, we, c, M);
      }
      auto out = obuf[tid].narrow(0, 0, c);
      at::mm_out(out, abuf[tid].narrow(0, 0, c), w2.select(0, e));
      scalar_t* o_p = out.data_ptr<scalar_t>();
      if (b2.has_value()) {  // the weight multiplies the output bias too
        const scalar_t* b2_p = b2->select(0, e).data_ptr<scalar_t>();
        for (int64_t r = 0; r < c; ++r)
          for (int64_t j = 0; j < Dout; ++j) o_p[r * Dout + j] += we[r] * b2_p[j];
      }
      scalar_t* acc = (tid == 0 ? y : y_extra[tid - 1]).data_ptr<scalar_t>();
      scatter_add_rows(acc, o_p, t, c, Dout);
     }
    });
  });
  reduce_into(y, y_extra);
  return {y, h_all, gated ? g_all : at::Tensor()};
}

// Returns {gx, gw [N] (per row), gw1, gw2, gw3, gb1, gb2, gb3} (undefined where not given).
std::vector<at::Tensor> fused_experts_backward(
    const at::Tensor& gy_in, const at::Tensor& x, const at::Tensor& w, const at::Tensor& w1,
    const at::Tensor& w2, const c10::optional<at::Tensor>& w3, const c10::optional<at::Tensor>& b1,
    const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& b3,
    const at::Tensor& tok, const at::Tensor& counts_t, const at::Tensor& h_all,
    const c10::optional<at::Tensor>& g_all, int64_t act, bool parallel, int64_t block_rows) {
  const auto gy = gy_in.contiguous();
  const Plan plan(counts_t, parallel, block_rows);
  const auto& [counts, start, rows, cmax, threads, shares] = plan;
  const int64_t D = x.size(1), M = w1.size(2), Dout = w2.size(2);
  const int64_t E = w1.size(0), N = start.back();
  const bool gated = w3.has_value();
  const bool inplace_relu = act == kRelu && !gated;

  auto gx = at::zeros_like(x);
  std::vector<at::Tensor> gx_extra;
  for (int64_t i = 1; i < threads; ++i) gx_extra.push_back(at::zeros_like(x));
  // Every expert's gradient block is written below (zeroed when it got no rows): no fill.
  auto gw1 = at::empty_like(w1), gw2 = at::empty_like(w2);
  auto gw3 = gated ? at::empty_like(*w3) : at::Tensor();
  auto gb1 = b1.has_value() ? at::empty_like(*b1) : at::Tensor();
  auto gb2 = b2.has_value() ? at::empty_like(*b2) : at::Tensor();
  auto gb3 = b3.has_value() ? at::empty_like(*b3) : at::Tensor();
  auto gw = at::empty({N}, x.options());
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] > 0) continue;
    for (auto* grad : {&gw1, &gw2, &gw3, &gb1, &gb2, &gb3})
      if (grad->defined()) grad->select(0, e).zero_();
  }
  std::vector<at::Tensor> xbuf, gybuf, abuf, tbuf, awbuf, gabuf, ggbuf, gxbuf;
  for (int64_t i = 0; i < threads; ++i) {
    xbuf.push_back(at::empty({cmax, D}, x.options()));
    gybuf.push_back(at::empty({cmax, Dout}, x.options()));
    abuf.push_back(gated ? at::empty({cmax, M}, x.options()) : at::Tensor());
    tbuf.push_back(inplace_relu ? at::Tensor() : at::empty({cmax, M}, x.options()));
    awbuf.push_back(at::empty({cmax, M}, x.options()));
    gabuf.push_back(at::empty({cmax, M}, x.options()));
    ggbuf.push_back(gated ? at::empty({cmax, M}, x.options()) : at::Tensor());
    gxbuf.push_back(at::empty({cmax, D}, x.options()));
  }
  const int64_t* tok_p = tok.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_experts_backward", [&] {
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    const scalar_t* gy_p = gy.data_ptr<scalar_t>();
    const scalar_t* w_p = w.data_ptr<scalar_t>();
    scalar_t* gw_p = gw.data_ptr<scalar_t>();
    for_each_expert(shares, [&](int64_t e, int64_t tid) {
      auto gw1e = gw1.select(0, e);
      auto gw2e = gw2.select(0, e);
      auto gw3e = gated ? gw3.select(0, e) : at::Tensor();
      scalar_t* gb2_p = b2.has_value() ? gb2.select(0, e).data_ptr<scalar_t>() : nullptr;
      if (gb2_p != nullptr) std::fill(gb2_p, gb2_p + Dout, scalar_t(0));
      for (int64_t r0 = 0; r0 < counts[e]; r0 += rows) {  // blocks of at most `rows` rows
        const bool first = r0 == 0;  // the first block writes the weight gradients, later ones add
        const int64_t c = std::min(rows, counts[e] - r0), s = start[e] + r0;
        const int64_t* t = tok_p + s;
        const scalar_t* we = w_p + s;
        auto xe = xbuf[tid].narrow(0, 0, c);
        auto gye = gybuf[tid].narrow(0, 0, c);
        gather_rows(xe.data_ptr<scalar_t>(), x_p, t, c, D);
        gather_rows(gye.data_ptr<scalar_t>(), gy_p, t, c, Dout);
        auto h = h_all.narrow(0, s, c);
        const scalar_t* g_p = gated ? g_all->data_ptr<scalar_t>() + s * M : nullptr;
        // t = act(h) (plain ReLU: h itself, kept post-ReLU); a = t (* g), unweighted; aw = a * w.
        auto act_h = inplace_relu ? h : tbuf[tid].narrow(0, 0, c);
        if (!inplace_relu) act_out(act_h, h, act);
        auto a = gated ? abuf[tid].narrow(0, 0, c) : act_h;
        scalar_t* t_p = act_h.data_ptr<scalar_t>();
        scalar_t* aw_p = awbuf[tid].data_ptr<scalar_t>();
        if (gated)
          weigh_rows<true, false, true>(t_p, g_p, abuf[tid].data_ptr<scalar_t>(), aw_p, we, c, M);
        else weigh_rows<false, false, false, scalar_t>(t_p, g_p, nullptr, aw_p, we, c, M);
        mm_into(gw2e, awbuf[tid].narrow(0, 0, c).t(), gye, first);
        auto ga = gabuf[tid].narrow(0, 0, c);  // gradient of the weighted hidden activation
        at::mm_out(ga, gye, w2.select(0, e).t());
        scalar_t* ga_p = ga.data_ptr<scalar_t>();
        const scalar_t* gye_p = gye.data_ptr<scalar_t>();
        scalar_t* gg_p = gated ? ggbuf[tid].data_ptr<scalar_t>() : nullptr;
        // Each row's weight gradient <ga, a>, by ATen's kernels as `blocked` computes it, so that
        // one thread reproduces `blocked` bitwise for ReLU experts.
        auto gw_rows = gw.narrow(0, s, c);
        at::sum_out(gw_rows, at::mul(ga, a), {-1});
        if (gated) hidden_backward<true>(ga_p, t_p, g_p, gg_p, we, c, M);
        else hidden_backward<false>(ga_p, t_p, g_p, gg_p, we, c, M);
        act_backward_(ga, h, act);  // now the gradient of h
        if (gb2_p != nullptr) {  // the output is (a @ w2 + b2) * weight
          const scalar_t* b2_p = b2->select(0, e).data_ptr<scalar_t>();
          add_row_dots(gw_p + s, gye_p, b2_p, c, Dout);
          for (int64_t r = 0; r < c; ++r)
            for (int64_t j = 0; j < Dout; ++j) gb2_p[j] += we[r] * gye_p[r * Dout + j];
        }
        if (b1.has_value()) sum_into(gb1.select(0, e), ga, first);
        auto gxe = gxbuf[tid].narrow(0, 0, c);
        at::mm_out(gxe, ga, w1.select(0, e).t());
        mm_into(gw1e, xe.t(), ga, first);
        if (gated) {
          auto gg = ggbuf[tid].narrow(0, 0, c);
          mm_into(gw3e, xe.t(), gg, first);
          if (b3.has_value()) sum_into(gb3.select(0, e), gg, first);
          gxe.addmm_(gg, w3->select(0, e).t());
        }
        scalar_t* acc = (tid == 0 ? gx : gx_extra[tid - 1]).data_ptr<scalar_t>();
        scatter_add_rows(acc, gxe.data_ptr<scalar_t>(), t, c, D);
      }
    });
  });
  reduce_into(gx, gx_extra);
  return {gx, gw, gw1, gw2, gw3, gb1, gb2, gb3};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while the kernel runs: it touches no Python object.
  m.def("forward", &fused_experts_forward, "fused expert FFN forward (CPU)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("backward", &fused_experts_backward, "fused expert FFN backward (CPU)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
