// The Python module of the C++ kernels (columnformer/native.py builds it from every source in csrc/).
#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> sparse_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor index,
                                          torch::Tensor valid, torch::Tensor bias, torch::Tensor W, torch::Tensor order,
                                          double scale, int64_t lanes, bool record, torch::Tensor uni,
                                          torch::Tensor ucount, torch::Tensor slot);
std::vector<torch::Tensor> sparse_reader_groups(torch::Tensor index, torch::Tensor valid, torch::Tensor order);
std::vector<torch::Tensor> sparse_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor index,
                                           torch::Tensor valid, torch::Tensor bias, torch::Tensor W, torch::Tensor order,
                                           double scale, int64_t lanes, torch::Tensor lse, torch::Tensor g, double gw,
                                           torch::Tensor rev, torch::Tensor qry, torch::Tensor blocks,
                                           torch::Tensor phase_ptr, int64_t block, torch::Tensor uni,
                                           torch::Tensor ucount, torch::Tensor slot, bool need_q, bool need_k,
                                           bool need_v, bool need_bias, bool need_w);
torch::Tensor sparse_block_colours(torch::Tensor index, torch::Tensor valid, torch::Tensor order, int64_t block);
torch::Tensor linear_forward(torch::Tensor x, torch::Tensor w, torch::Tensor b, bool gelu_input);
torch::Tensor linear_backward(torch::Tensor x, torch::Tensor w, torch::Tensor g, std::vector<torch::Tensor> dws,
                              torch::Tensor db, bool need_dx, bool accumulate, bool gelu_input);
std::vector<torch::Tensor> norm_forward(torch::Tensor x, torch::Tensor w, torch::Tensor b, double eps);
std::vector<torch::Tensor> norm_backward(torch::Tensor g, torch::Tensor x, torch::Tensor mean, torch::Tensor rstd,
                                         torch::Tensor w, bool need_x, bool need_w, bool need_b);
torch::Tensor to_lanes(torch::Tensor x, int64_t P);
torch::Tensor from_lanes(torch::Tensor y, int64_t R);
void adamw_8bit_step(torch::Tensor p, torch::Tensor g, torch::Tensor m_codes, torch::Tensor m_scales,
                     torch::Tensor r_codes, torch::Tensor r_scales, torch::Tensor m_table, torch::Tensor r_table,
                     torch::Tensor r_bounds, double beta1, double beta2, double eps, double step_size, double bc2_sqrt,
                     double decay);
void adamw_bf16_step(torch::Tensor p, torch::Tensor g, torch::Tensor m, torch::Tensor v, double beta1, double beta2,
                     double eps, double step_size, double bc2_sqrt, double decay, int64_t seed, int64_t offset);
bool host_cache_enable(int64_t min_bytes, bool huge_pages, int64_t max_pieces);
void host_cache_disable();
std::vector<int64_t> host_cache_stats();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_forward", &sparse_forward, "fused sparse attention, forward (fused_sparse.cpp)");
  m.def("sparse_backward", &sparse_backward, "fused sparse attention, backward (fused_sparse.cpp)");
  m.def("sparse_block_colours", &sparse_block_colours, "blocks of the visiting order coloured for the one-pass backward (fused_sparse.cpp)");
  m.def("sparse_reader_groups", &sparse_reader_groups, "groups of neighbouring readers and their sources' union (fused_sparse.cpp)");
  m.def("adamw_8bit_step", &adamw_8bit_step, "one AdamW step of a parameter with 8-bit moments (optim_ops.cpp)");
  m.def("adamw_bf16_step", &adamw_bf16_step, "one AdamW step of a parameter with bf16 moments (optim_ops.cpp)");
  m.def("linear_forward", &linear_forward, "untied linear per column, forward (column_ops.cpp)", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("b"), pybind11::arg("gelu_input") = false);
  m.def("linear_backward", &linear_backward, "untied linear per column, backward (column_ops.cpp)", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("g"), pybind11::arg("dws"), pybind11::arg("db"), pybind11::arg("need_dx"),
        pybind11::arg("accumulate"), pybind11::arg("gelu_input") = false);
  m.def("norm_forward", &norm_forward, "layer norm with a per-column affine, forward (column_ops.cpp)");
  m.def("to_lanes", &to_lanes, "(N, R, d) -> (N, d, P): the fused attention kernel's layout (column_ops.cpp)");
  m.def("from_lanes", &from_lanes, "(N, d, P) -> (N, R, d) (column_ops.cpp)");
  m.def("host_cache_enable", &host_cache_enable, "cache large CPU blocks for reuse (host_cache.cpp)");
  m.def("host_cache_disable", &host_cache_disable, "stop caching, free the cached blocks (host_cache.cpp)");
  m.def("host_cache_stats", &host_cache_stats, "hits, misses, moved, fresh, cached and live bytes, memory mappings and their limit (host_cache.cpp)");
  m.def("norm_backward", &norm_backward, "layer norm with a per-column affine, backward (column_ops.cpp)");
}
