// Entry points of every native kernel. Each takes raw pointers, sizes, dtype codes and, for the
// CUDA variants, the stream to launch on; Python has validated all of them before the call.
#pragma once

#include <cstdint>

namespace fasttl {

// ---- fused distillation loss --------------------------------------------------------------
struct DistillArgs {
  const void* student;         // (rows, classes), unit column stride
  int64_t student_row_stride;  // in elements
  int student_dtype;
  const void* teacher;
  int64_t teacher_row_stride;
  int teacher_dtype;
  const int64_t* target;       // (rows,) or nullptr for the soft term alone
  int64_t ignore_index;
  float temperature;
  float alpha;
  float* loss_rows;            // (rows,) fp32
  void* grad;                  // (rows, classes) contiguous, student dtype
  int64_t rows;
  int64_t classes;
};

void distill_rows_cpu(const DistillArgs& args);
void distill_rows_cuda(const DistillArgs& args, void* stream);

}  // namespace fasttl
