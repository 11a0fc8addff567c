// pybind11 entry points: thin wrappers that take data pointers (as integers), sizes, dtype codes
// and a CUDA stream handle. Python (fasttl/_ops.py) validates every argument first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <cstdint>
#include <stdexcept>

#include "fasttl/kernels.h"

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
                              int64_t rows, int64_t classes) {
  return DistillArgs{as_ptr<const void>(student), student_row_stride, student_dtype,
                     as_ptr<const void>(teacher), teacher_row_stride, teacher_dtype,
                     as_ptr<const int64_t>(target), ignore_index, static_cast<float>(temperature),
                     static_cast<float>(alpha), as_ptr<float>(loss_rows), as_ptr<void>(grad), rows,
                     classes};
}

[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string(what) +
                           ": this fasttl build has no CUDA kernels (nvcc was not found when it was "
                           "built). Reinstall with the CUDA toolkit on PATH, or FASTTL_CUDA=ON to "
                           "make a missing nvcc an error.");
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTTL_VERSION;
#ifdef FASTTL_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = FASTTL_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  info["openmp_threads"] = omp_get_max_threads();
  return info;
}

}  // namespace
}  // namespace fasttl

PYBIND11_MODULE(_C, m) {
  using namespace fasttl;
  m.doc() = "fasttl native kernels (CPU always, CUDA when built with nvcc)";

  m.def("build_info", &build_info,
        "Version, whether CUDA kernels were compiled and for which architectures, OpenMP threads.");

  const char* distill_doc =
      "Fused distillation loss over rows: writes the fp32 loss of each row and the gradient of "
      "that loss with respect to the student logits. Arguments: student, student_row_stride, "
      "student_dtype, teacher, teacher_row_stride, teacher_dtype, target (0 for none), "
      "ignore_index, temperature, alpha, loss_rows, grad, rows, classes.";
  m.def(
      "distill_rows_cpu",
      [](std::uintptr_t s, int64_t ss, int sd, std::uintptr_t t, int64_t ts, int td, std::uintptr_t y,
         int64_t ignore, double temp, double alpha, std::uintptr_t loss, std::uintptr_t grad,
         int64_t rows, int64_t classes) {
        distill_rows_cpu(make_distill_args(s, ss, sd, t, ts, td, y, ignore, temp, alpha, loss, grad,
                                           rows, classes));
      },
      distill_doc, py::call_guard<py::gil_scoped_release>());
  m.def(
      "distill_rows_cuda",
      [](std::uintptr_t s, int64_t ss, int sd, std::uintptr_t t, int64_t ts, int td, std::uintptr_t y,
         int64_t ignore, double temp, double alpha, std::uintptr_t loss, std::uintptr_t grad,
         int64_t rows, int64_t classes, std::uintptr_t stream) {
#ifdef FASTTL_WITH_CUDA
        distill_rows_cuda(make_distill_args(s, ss, sd, t, ts, td, y, ignore, temp, alpha, loss, grad,
                                            rows, classes),
                          reinterpret_cast<void*>(stream));
#else
        (void)s, (void)ss, (void)sd, (void)t, (void)ts, (void)td, (void)y, (void)ignore, (void)temp;
        (void)alpha, (void)loss, (void)grad, (void)rows, (void)classes, (void)stream;
        no_cuda("distill_rows_cuda");
#endif
      },
      "CUDA variant of distill_rows_cpu; the last argument is the cudaStream_t to launch on.",
      py::call_guard<py::gil_scoped_release>());
}
