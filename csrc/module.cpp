// `import kangaroo_ext._C`: loading this shared library runs registration.cpp's static
// registrations (torch.ops.kangaroo.*). The module itself reports what it was built for (CUDA
// architectures; the torch, CUDA and C++ ABI it was compiled against) and exposes the CUDA-graph
// branching calls of graph_branch.h (not tensor ops: they steer a capture), taking plain integers (a
// device pointer, counts) that kangaroo_ext/engine/conditional.py validates.
// Plain CPython API: nothing here needs pybind11.
#include <Python.h>

#include <exception>
#include <string>

#include "graph_branch.h"
#include "launch_options.h"
#include "ops.h"

// Two levels so the macro's value, not its name, is stringified. setup.py / CMakeLists.txt pass
// the arch list as one preprocessor number (e.g. 8.0_9.0a) to avoid shell quoting.
#define KANGAROO_STRINGIFY_IMPL(x) #x
#define KANGAROO_STRINGIFY(x) KANGAROO_STRINGIFY_IMPL(x)

#ifdef KANGAROO_CUDA_ARCHS
#define KANGAROO_CUDA_ARCHS_STR KANGAROO_STRINGIFY(KANGAROO_CUDA_ARCHS)
#else
#define KANGAROO_CUDA_ARCHS_STR "unknown"
#endif

// The torch the extension was compiled against: torch.__version__ and torch.version.cuda, each passed
// as one hex number of its UTF-8 bytes (0x322e...: a single preprocessor token whatever the version
// says, e.g. "2.14.1+cu130", so no shell quoting and no macro expansion of its parts), and
// torch._C._GLIBCXX_USE_CXX11_ABI as 0/1. "0x" (nothing) means unknown: a build that did not pass them.
#ifndef KANGAROO_TORCH_VERSION_HEX
#define KANGAROO_TORCH_VERSION_HEX 0x
#endif
#ifndef KANGAROO_TORCH_CUDA_HEX
#define KANGAROO_TORCH_CUDA_HEX 0x
#endif
#ifndef KANGAROO_TORCH_CXX11_ABI
#define KANGAROO_TORCH_CXX11_ABI unknown
#endif

// The same facts in one literal that kangaroo_ext/_extension.py finds in this file's bytes before it
// loads the library: a library built for another torch may not load at all (undefined symbols) or,
// worse, load and register its ops through a different ABI. `used`: kept though nothing reads it here.
extern "C" __attribute__((used)) const char kangaroo_build_info[] =
    "KANGAROO_BUILD_INFO{torch=" KANGAROO_STRINGIFY(KANGAROO_TORCH_VERSION_HEX) ";cuda=" KANGAROO_STRINGIFY(
        KANGAROO_TORCH_CUDA_HEX) ";cxx11_abi=" KANGAROO_STRINGIFY(KANGAROO_TORCH_CXX11_ABI) "}";

namespace {

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// "0x322e3131" -> "2.11"; "" for "0x" (unknown) or anything that is not hex (no exceptions: module init).
std::string decode_hex(const std::string& token) {
  if (token.rfind("0x", 0) != 0 || token.size() % 2 != 0) return "";
  std::string out;
  for (size_t i = 2; i + 1 < token.size(); i += 2) {
    const int hi = hex_digit(token[i]), lo = hex_digit(token[i + 1]);
    if (hi < 0 || lo < 0) return "";
    out.push_back(static_cast<char>(hi * 16 + lo));
  }
  return out;
}

// C++ exceptions (c10::Error from TORCH_CHECK / C10_CUDA_CHECK) become Python RuntimeErrors.
template <typename Fn>
PyObject* guarded(Fn&& fn) {
  try {
    return fn();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* branch_unsupported_reason(PyObject*, PyObject* args) {
  int device = 0;
  if (!PyArg_ParseTuple(args, "i", &device)) return nullptr;
  return guarded([&] {
    const std::string reason = kangaroo::graph::branch_unsupported_reason(device);
    return PyUnicode_FromString(reason.c_str());
  });
}

PyObject* branch_begin(PyObject*, PyObject* args) {
  unsigned long long values = 0, pool_a = 0, pool_b = 0;
  long long n = 0, num_branches = 0;
  int is_bool = 0, device = 0;
  if (!PyArg_ParseTuple(args, "KLpLi(KK)", &values, &n, &is_bool, &num_branches, &device, &pool_a, &pool_b))
    return nullptr;
  return guarded([&] {
    kangaroo::graph::branch_begin(static_cast<std::uintptr_t>(values), n, is_bool != 0, num_branches, device,
                                  {pool_a, pool_b});
    Py_RETURN_NONE;
  });
}

PyObject* branch_depth(PyObject*, PyObject*) {
  return guarded([&] { return PyLong_FromLongLong(kangaroo::graph::branch_depth()); });
}

// The launchers' process-wide switches (launch_options.h): one setter and one getter shape for all of them.
template <void (*Set)(bool)>
PyObject* set_switch(PyObject*, PyObject* args) {
  int enabled = 0;
  if (!PyArg_ParseTuple(args, "p", &enabled)) return nullptr;
  Set(enabled != 0);
  Py_RETURN_NONE;
}

template <bool (*Get)()>
PyObject* get_switch(PyObject*, PyObject*) {
  return PyBool_FromLong(Get() ? 1 : 0);
}

// An int setting >= 0 (value,): `refused` names the setter and what 0 means, for the ValueError.
PyObject* set_count(PyObject* args, void (*set)(int), const char* refused) {
  int value = 0;
  if (!PyArg_ParseTuple(args, "i", &value)) return nullptr;
  if (value < 0) {
    PyErr_Format(PyExc_ValueError, "%s, got %d", refused, value);
    return nullptr;
  }
  set(value);
  Py_RETURN_NONE;
}

template <int (*Get)()>
PyObject* get_count(PyObject*, PyObject*) {
  return PyLong_FromLong(Get());
}

PyObject* set_persistent_max_blocks(PyObject*, PyObject* args) {
  return set_count(args, kangaroo::set_persistent_max_blocks,
                   "set_persistent_max_blocks: blocks must be >= 0 (0: every block that fits)");
}

PyObject* set_attention_max_tile_rows(PyObject*, PyObject* args) {
  return set_count(args, kangaroo::set_attention_max_tile_rows,
                   "set_attention_max_tile_rows: rows must be >= 0 (0: no cap)");
}

PyObject* attention_invariant_max_tokens(PyObject*, PyObject* args) {
  long long group = 0, head_dim = 0, elem_size = 0, device = 0;
  if (!PyArg_ParseTuple(args, "LLLL", &group, &head_dim, &elem_size, &device)) return nullptr;
  return guarded([&] {
    return PyLong_FromLongLong(kangaroo::attention_invariant_max_tokens(group, head_dim, elem_size, device));
  });
}

PyObject* branch_select(PyObject*, PyObject* args) {
  long long index = 0;
  if (!PyArg_ParseTuple(args, "L", &index)) return nullptr;
  return guarded([&] {
    kangaroo::graph::branch_select(index);
    Py_RETURN_NONE;
  });
}

PyObject* branch_end_body(PyObject*, PyObject*) {
  return guarded([&] {
    kangaroo::graph::branch_end_body();
    Py_RETURN_NONE;
  });
}

PyObject* branch_close(PyObject*, PyObject* args) {
  long long depth = 0;
  int raise_errors = 1;
  if (!PyArg_ParseTuple(args, "Lp", &depth, &raise_errors)) return nullptr;
  return guarded([&] {
    kangaroo::graph::branch_close(depth, raise_errors != 0);
    Py_RETURN_NONE;
  });
}

PyMethodDef kMethods[] = {
    {"set_pdl_launches", set_switch<kangaroo::set_pdl_launches>, METH_VARARGS,
     "set_pdl_launches(enabled: bool): whether later kernel launches may use programmatic dependent launch"},
    {"pdl_launches", get_switch<kangaroo::pdl_launches>, METH_NOARGS, "pdl_launches() -> bool"},
    {"set_batch_invariant_attention", set_switch<kangaroo::set_batch_invariant_attention>, METH_VARARGS,
     "set_batch_invariant_attention(enabled: bool): whether later attention launches sum every row's keys in "
     "the key groups of a one-token step (csrc/kernels/attention.cuh)"},
    {"batch_invariant_attention", get_switch<kangaroo::batch_invariant_attention>, METH_NOARGS,
     "batch_invariant_attention() -> bool"},
    {"set_tensor_core_gemv", set_switch<kangaroo::set_tensor_core_gemv>, METH_VARARGS,
     "set_tensor_core_gemv(enabled: bool): whether later 16-bit decode GEMV launches use tensor cores where the "
     "shapes allow (csrc/kernels/decode_linear_mma.cuh)"},
    {"tensor_core_gemv", get_switch<kangaroo::tensor_core_gemv>, METH_NOARGS, "tensor_core_gemv() -> bool"},
    {"set_persistent_split_barrier", set_switch<kangaroo::set_persistent_split_barrier>, METH_VARARGS,
     "set_persistent_split_barrier(enabled: bool): whether the persistent draft kernel's GEMV stages wait for the "
     "grid barrier inside their tiles, after the weight loads (csrc/kernels/persistent_draft.cuh)"},
    {"persistent_split_barrier", get_switch<kangaroo::persistent_split_barrier>, METH_NOARGS,
     "persistent_split_barrier() -> bool"},
    {"set_gemv_deep_prefetch", set_switch<kangaroo::set_gemv_deep_prefetch>, METH_VARARGS,
     "set_gemv_deep_prefetch(enabled: bool): whether tensor-core GEMVs with long K on few blocks keep more weight "
     "loads in flight (csrc/kernels/decode_linear_mma.cuh, deep_in_flight)"},
    {"gemv_deep_prefetch", get_switch<kangaroo::gemv_deep_prefetch>, METH_NOARGS, "gemv_deep_prefetch() -> bool"},
    {"set_persistent_l2_prefetch", set_switch<kangaroo::set_persistent_l2_prefetch>, METH_VARARGS,
     "set_persistent_l2_prefetch(enabled: bool): whether the persistent draft kernel asks the L2 for the next GEMV "
     "stage's weights while it waits at a barrier (csrc/kernels/persistent_draft.cuh)"},
    {"persistent_l2_prefetch", get_switch<kangaroo::persistent_l2_prefetch>, METH_NOARGS,
     "persistent_l2_prefetch() -> bool"},
    {"set_interleaved_key_splits", set_switch<kangaroo::set_interleaved_key_splits>, METH_VARARGS,
     "set_interleaved_key_splits(enabled: bool): whether later attention launches deal each tile's keys to its "
     "splits in fixed units, round-robin (csrc/kernels/key_split.h), so verified rows equal decode rows at any "
     "context"},
    {"interleaved_key_splits", get_switch<kangaroo::interleaved_key_splits>, METH_NOARGS,
     "interleaved_key_splits() -> bool"},
    {"set_warp_chunk_attention", set_switch<kangaroo::set_warp_chunk_attention>, METH_VARARGS,
     "set_warp_chunk_attention(enabled: bool): whether later attention launches run the warp-chunk kernel where it "
     "can take them (csrc/kernels/warp_chunk_attention.cuh), else the tiled one"},
    {"warp_chunk_attention", get_switch<kangaroo::warp_chunk_attention>, METH_NOARGS,
     "warp_chunk_attention() -> bool"},
    {"set_persistent_max_blocks", set_persistent_max_blocks, METH_VARARGS,
     "set_persistent_max_blocks(blocks: int): the most blocks a persistent draft kernel launch may use (0: every "
     "block that fits at once)"},
    {"persistent_max_blocks", get_count<kangaroo::persistent_max_blocks>, METH_NOARGS,
     "persistent_max_blocks() -> int"},
    {"set_attention_max_tile_rows", set_attention_max_tile_rows, METH_VARARGS,
     "set_attention_max_tile_rows(rows: int): the most query rows of one attention q-tile at decode and verify "
     "sizes, in whole tokens (0: no cap)"},
    {"attention_max_tile_rows", get_count<kangaroo::attention_max_tile_rows>, METH_NOARGS,
     "attention_max_tile_rows() -> int"},
    {"attention_invariant_max_tokens", attention_invariant_max_tokens, METH_VARARGS,
     "attention_invariant_max_tokens(group, head_dim, elem_size, device) -> int: the most query tokens one "
     "attention call may carry in the batch-invariant order (0: none; csrc/ops.h)"},
    {"branch_unsupported_reason", branch_unsupported_reason, METH_VARARGS,
     "branch_unsupported_reason(device) -> str: why conditional graph nodes cannot be captured ('' if they can)"},
    {"branch_begin", branch_begin, METH_VARARGS,
     "branch_begin(values_ptr, n, is_bool, num_branches, device, pool): add a conditional node to the capture"},
    {"branch_depth", branch_depth, METH_NOARGS, "branch_depth() -> int: conditional nodes open on this thread"},
    {"branch_select", branch_select, METH_VARARGS, "branch_select(i): capture what follows into body i"},
    {"branch_end_body", branch_end_body, METH_NOARGS,
     "branch_end_body(): stop capturing the open body; capture continues in the enclosing graph"},
    {"branch_close", branch_close, METH_VARARGS,
     "branch_close(depth, raise_errors): close every node opened above depth (restores the stream; "
     "with raise_errors=False never raises)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                              // m_name
    "CUDA kernels of kangaroo_ext, registered as torch.ops.kangaroo.*",  // m_doc
    -1,                                                                // m_size: no per-module state
    kMethods,                                                          // m_methods
    nullptr,                                                           // m_slots
    nullptr,                                                           // m_traverse
    nullptr,                                                           // m_clear
    nullptr,                                                           // m_free
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  const std::string torch_version = decode_hex(KANGAROO_STRINGIFY(KANGAROO_TORCH_VERSION_HEX));
  const std::string torch_cuda = decode_hex(KANGAROO_STRINGIFY(KANGAROO_TORCH_CUDA_HEX));
  if (PyModule_AddStringConstant(m, "CUDA_ARCH_LIST", KANGAROO_CUDA_ARCHS_STR) < 0 ||
      PyModule_AddStringConstant(m, "TORCH_VERSION", torch_version.c_str()) < 0 ||
      PyModule_AddStringConstant(m, "TORCH_CUDA_VERSION", torch_cuda.c_str()) < 0 ||
      PyModule_AddStringConstant(m, "TORCH_CXX11_ABI", KANGAROO_STRINGIFY(KANGAROO_TORCH_CXX11_ABI)) < 0 ||
      PyModule_AddIntConstant(m, "MAX_BRANCH_DEPTH", kangaroo::graph::kMaxNestingDepth) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
