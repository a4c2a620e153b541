// The Python module of the CPU kernels: every entry point of cpu_kernels.h, registered
// in this one place.
#include <torch/extension.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &pagedserve::paged_attention,
        "Paged attention over K/V read in place (CPU)");
  m.def("fused_moe", &pagedserve::fused_moe,
        "A MoE layer's float32 experts over each token's top-k, on packed weights");
  m.def("quant_linear", &pagedserve::quant_linear,
        "x @ W^T for an int4, int8 or fp8 W with a scale and offset per group, packed");
  m.def("argmax_rows", &pagedserve::argmax_rows,
        "The first index of each row's maximum (float32)");
  m.def("silu_and_mul", &pagedserve::silu_and_mul,
        "SiLU(gate) * up of float32 rows holding gate then up");
  m.def("rotary_", &pagedserve::rotary_,
        "Rotate-half rotary embedding of q and k in place (float32)");
  m.def("rms_norm", &pagedserve::rms_norm,
        "RMSNorm of float32 rows, after adding them into a residual",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("write_kv_cache", &pagedserve::write_kv_cache,
        "New K/V rows into their cache slots (negative slots skipped)");
}
