// pybind11 entry points: thin wrappers that take data pointers (as integers), sizes, dtype codes
// and a CUDA stream handle. Python (fasttl/_ops.py) validates every argument first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "fasttl/kernels.h"

#ifdef FASTTL_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION and the version queries of `cuda_versions`
#endif

namespace py = pybind11;

namespace fasttl {
namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

DistillArgs make_distill_args(std::uintptr_t student, int64_t student_row_stride, int student_dtype,
                              std::uintptr_t teacher, int64_t teacher_row_stride, int teacher_dtype,
                              std::uintptr_t target, int64_t ignore_index, double temperature,
                              double alpha, std::uintptr_t loss_rows, std::uintptr_t grad,
                              int64_t rows, int64_t classes, double grad_scale, double label_smoothing) {
  return DistillArgs{as_ptr<const void>(student), student_row_stride, student_dtype,
                     as_ptr<const void>(teacher), teacher_row_stride, teacher_dtype,
                     as_ptr<const int64_t>(target), ignore_index, static_cast<float>(temperature),
                     static_cast<float>(alpha), as_ptr<float>(loss_rows), as_ptr<void>(grad), rows,
                     classes, static_cast<float>(grad_scale), static_cast<float>(label_smoothing)};
}

using Pointers = std::vector<std::uintptr_t>;

// Builds the per-tensor table of a multi-tensor Adam step from parallel lists of addresses
// (0 for an absent master or max_exp_avg_sq).
std::vector<AdamTensor> adam_tensors(const Pointers& params, const Pointers& grads, const Pointers& masters,
                                     const Pointers& exp_avgs, const Pointers& exp_avg_sqs,
                                     const Pointers& max_exp_avg_sqs, const std::vector<int64_t>& numels,
                                     const Pointers& steps) {
  const size_t n = params.size();
  for (const auto* list : {&grads, &masters, &exp_avgs, &exp_avg_sqs, &max_exp_avg_sqs, &steps}) {
    if (list->size() != n) throw std::invalid_argument("adam_step: tensor lists differ in length");
  }
  if (numels.size() != n) throw std::invalid_argument("adam_step: numels differ in length from params");
  std::vector<AdamTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    tensors[i] = AdamTensor{as_ptr<void>(params[i]), as_ptr<const void>(grads[i]), as_ptr<float>(masters[i]),
                            as_ptr<float>(exp_avgs[i]), as_ptr<float>(exp_avg_sqs[i]),
                            as_ptr<float>(max_exp_avg_sqs[i]), numels[i], as_ptr<const float>(steps[i])};
  }
  return tensors;
}

void adam_step(bool cuda, const Pointers& params, const Pointers& grads, const Pointers& masters,
               const Pointers& exp_avgs, const Pointers& exp_avg_sqs, const Pointers& max_exp_avg_sqs,
               const std::vector<int64_t>& numels, const Pointers& steps, int param_dtype, int grad_dtype,
               bool has_master, double lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled_weight_decay, bool amsgrad, bool maximize, std::uintptr_t grad_scale,
               std::uintptr_t found_inf, std::uintptr_t lr_tensor, std::uintptr_t stream);

[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string(what) +
                           ": this fasttl build has no CUDA kernels (nvcc was not found when it was "
                           "built). Reinstall with the CUDA toolkit on PATH, or FASTTL_CUDA=ON to "
                           "make a missing nvcc an error.");
}

void adam_step(bool cuda, const Pointers& params, const Pointers& grads, const Pointers& masters,
               const Pointers& exp_avgs, const Pointers& exp_avg_sqs, const Pointers& max_exp_avg_sqs,
               const std::vector<int64_t>& numels, const Pointers& steps, int param_dtype, int grad_dtype,
               bool has_master, double lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled_weight_decay, bool amsgrad, bool maximize, std::uintptr_t grad_scale,
               std::uintptr_t found_inf, std::uintptr_t lr_tensor, std::uintptr_t stream) {
  const std::vector<AdamTensor> tensors =
      adam_tensors(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, numels, steps);
  const AdamArgs args{tensors.data(), static_cast<int64_t>(tensors.size()), param_dtype, grad_dtype, has_master,
                      static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
                      static_cast<float>(eps), static_cast<float>(weight_decay), decoupled_weight_decay, amsgrad,
                      maximize, as_ptr<const float>(grad_scale), as_ptr<const float>(found_inf),
                      as_ptr<const float>(lr_tensor)};
  if (!cuda) {
    adam_step_cpu(args);
    return;
  }
#ifdef FASTTL_WITH_CUDA
  adam_step_cuda(args, reinterpret_cast<void*>(stream));
#else
  (void)stream;
  no_cuda("adam_step_cuda");
#endif
}

void pool_store(bool cuda, std::uintptr_t src, int src_dtype, int64_t n, int64_t channels, int64_t hw,
                int64_t image_stride, int64_t channel_stride, int64_t hw_stride, std::uintptr_t cache,
                int cache_dtype, std::uintptr_t scales, std::uintptr_t rows, std::uintptr_t stream) {
  const PoolStoreArgs args{as_ptr<const void>(src), src_dtype, n, channels, hw, image_stride, channel_stride,
                           hw_stride, as_ptr<void>(cache), cache_dtype, as_ptr<float>(scales),
                           as_ptr<const int64_t>(rows)};
  if (!cuda) return pool_store_cpu(args);
#ifdef FASTTL_WITH_CUDA
  pool_store_cuda(args, reinterpret_cast<void*>(stream));
#else
  (void)stream;
  no_cuda("pool_store_cuda");
#endif
}

void gather(bool cuda, std::uintptr_t cache, int cache_dtype, std::uintptr_t scales, std::uintptr_t indices,
            int64_t n, int64_t channels, std::uintptr_t out, int out_dtype, std::uintptr_t stream) {
  const GatherArgs args{as_ptr<const void>(cache), cache_dtype, as_ptr<const float>(scales),
                        as_ptr<const int64_t>(indices), n, channels, as_ptr<void>(out), out_dtype};
  if (!cuda) return gather_cpu(args);
#ifdef FASTTL_WITH_CUDA
  gather_cuda(args, reinterpret_cast<void*>(stream));
#else
  (void)stream;
  no_cuda("gather_cuda");
#endif
}

void gather_shards(std::uintptr_t shard_caches, std::uintptr_t shard_scales, int64_t shard_rows, int cache_dtype,
                   std::uintptr_t indices, int64_t n, int64_t channels, std::uintptr_t out, int out_dtype,
                   int threads) {
  GatherArgs args{nullptr, cache_dtype, nullptr, as_ptr<const int64_t>(indices), n, channels, as_ptr<void>(out),
                  out_dtype};
  args.shard_caches = as_ptr<const void* const>(shard_caches);
  args.shard_scales = as_ptr<const float* const>(shard_scales);
  args.shard_rows = shard_rows;
  args.threads = threads;
  gather_cpu(args);
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTTL_VERSION;
#ifdef FASTTL_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = FASTTL_CUDA_ARCHS;
  info["cuda_runtime_built"] = CUDART_VERSION;  // e.g. 12040 for 12.4: the headers compiled against
  info["cuda_runtime_linking"] = FASTTL_CUDART_LINKING;  // "shared" (torch's libcudart) or "static"
  info["torch_cuda_built"] = FASTTL_TORCH_CUDA;  // torch.version.cuda at build time ("" for none)
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_runtime_built"] = 0;
  info["cuda_runtime_linking"] = "";
  info["torch_cuda_built"] = "";
#endif
  info["openmp_threads"] = omp_get_max_threads();
  return info;
}

// The CUDA runtime the kernels call into and the newest CUDA the driver supports (0 where there is
// none); neither call creates a context, so this is safe on a machine without a GPU.
py::dict cuda_versions() {
  py::dict out;
  int runtime = 0, driver = 0;
#ifdef FASTTL_WITH_CUDA
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
#endif
  out["runtime"] = runtime;
  out["driver"] = driver;
  return out;
}

}  // namespace
}  // namespace fasttl

PYBIND11_MODULE(_C, m) {
  using namespace fasttl;
  m.doc() = "fasttl native kernels (CPU always, CUDA when built with nvcc)";

  m.def("cuda_versions", &cuda_versions,
        "CUDA runtime version in use and the driver's supported CUDA version (ints like 12040; 0 for none).");
  m.def("build_info", &build_info,
        "Version, whether CUDA kernels were compiled and for which architectures, OpenMP threads.");

  const char* distill_doc =
      "Fused distillation loss over rows: writes the fp32 loss of each row and the gradient of "
      "that loss with respect to the student logits, times grad_scale. Arguments: student, "
      "student_row_stride, student_dtype, teacher, teacher_row_stride, teacher_dtype, target (0 for "
      "none), ignore_index, temperature, alpha, loss_rows, grad, rows, classes, grad_scale, "
      "label_smoothing.";
  m.def(
      "distill_rows_cpu",
      [](std::uintptr_t s, int64_t ss, int sd, std::uintptr_t t, int64_t ts, int td, std::uintptr_t y,
         int64_t ignore, double temp, double alpha, std::uintptr_t loss, std::uintptr_t grad,
         int64_t rows, int64_t classes, double grad_scale, double smoothing) {
        distill_rows_cpu(make_distill_args(s, ss, sd, t, ts, td, y, ignore, temp, alpha, loss, grad,
                                           rows, classes, grad_scale, smoothing));
      },
      distill_doc, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_kernel_clone", &cpu_kernel_clone,
        "Which clone of the CPU kernels (x86-64-v4: AVX-512, x86-64-v3: AVX2+FMA, default) this CPU runs.");
  m.def(
      "distill_rows_cuda",
      [](std::uintptr_t s, int64_t ss, int sd, std::uintptr_t t, int64_t ts, int td, std::uintptr_t y,
         int64_t ignore, double temp, double alpha, std::uintptr_t loss, std::uintptr_t grad,
         int64_t rows, int64_t classes, double grad_scale, double smoothing, std::uintptr_t stream) {
#ifdef FASTTL_WITH_CUDA
        distill_rows_cuda(make_distill_args(s, ss, sd, t, ts, td, y, ignore, temp, alpha, loss, grad,
                                            rows, classes, grad_scale, smoothing),
                          reinterpret_cast<void*>(stream));
#else
        (void)s, (void)ss, (void)sd, (void)t, (void)ts, (void)td, (void)y, (void)ignore, (void)temp;
        (void)alpha, (void)loss, (void)grad, (void)rows, (void)classes, (void)grad_scale, (void)smoothing;
        (void)stream;
        no_cuda("distill_rows_cuda");
#endif
      },
      "CUDA variant of distill_rows_cpu; the last argument is the cudaStream_t to launch on.",
      py::call_guard<py::gil_scoped_release>());

  m.def("pool_store", &pool_store,
        "Feature cache write: average-pool rows of src (n, channels, hw), convert to the cache dtype "
        "(int8 with a per-row fp32 scale) and store them at cache rows `rows`: cuda, src, src_dtype, n, "
        "channels, hw, image_stride, channel_stride, hw_stride (elements: NCHW or channels_last), cache, "
        "cache_dtype, scales (0 unless int8), rows, stream.",
        py::call_guard<py::gil_scoped_release>());
  m.def("gather", &gather,
        "Feature cache read: out[i] = dequantized cache[indices[i]] as fp32 or bf16: cuda, cache, "
        "cache_dtype, scales, indices, n, channels, out, out_dtype, stream.",
        py::call_guard<py::gil_scoped_release>());
  m.def("gather_shards", &gather_shards,
        "Feature cache read from a cache stored as shards (CPU): out[i] = dequantized row indices[i], found in "
        "shard indices[i] / shard_rows: shard_caches (address of a table of shard addresses), shard_scales (int8: "
        "a table of scale addresses, else 0), shard_rows, cache_dtype, indices, n, channels, out, out_dtype, "
        "threads (0: OpenMP's default).",
        py::call_guard<py::gil_scoped_release>());
  m.def("adam_step", &adam_step,
        "One fused Adam/AdamW step over a list of tensors of one device and dtype group: "
        "cuda, params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (addresses, 0 for "
        "none), numels, step addresses (fp32, already incremented), param_dtype, grad_dtype, "
        "has_master, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, "
        "maximize, grad_scale, found_inf and lr tensor addresses (0 for none; a set lr tensor "
        "overrides lr), stream.",
        py::call_guard<py::gil_scoped_release>());
}
