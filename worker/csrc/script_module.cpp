// A TorchScript module for ringtrain's worker: what tch's CModule lacks
// (named buffers, the output's shape before it is taken as a tensor) and
// what it has, under one handle. Every entry point catches C++ exceptions
// and returns the message through `err` (malloc'd; freed with
// rt_free_string), so no exception crosses into Rust.
#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

extern "C" {

typedef void (*rt_tensor_cb)(void *data, const char *name, void *tensor);

static void set_err(char **err, const char *what) {
  if (err) *err = strdup(what);
}

#define RT_TRY(body)                    \
  try {                                 \
    body                                \
  } catch (const c10::Error &e) {       \
    set_err(err, e.what_without_backtrace()); \
  } catch (const std::exception &e) {   \
    set_err(err, e.what());             \
  } catch (...) {                       \
    set_err(err, "unknown C++ exception"); \
  }

static c10::Device device_of(int d) {
  if (d < 0) return c10::Device(c10::kCPU);
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(d));
}

void rt_free_string(char *s) { free(s); }

// Loads a TorchScript module from the bytes of a .pt file onto device `d`
// (-1: CPU, n: cuda:n).
void *rt_module_load(const char *data, size_t len, int d, char **err) {
  RT_TRY(std::istringstream stream(std::string(data, len));
         auto m = torch::jit::load(stream, device_of(d));
         return new torch::jit::Module(std::move(m));)
  return nullptr;
}

void rt_module_free(void *m) { delete static_cast<torch::jit::Module *>(m); }

int rt_module_named_parameters(void *m, void *data, rt_tensor_cb f, char **err) {
  RT_TRY(for (const auto &p : static_cast<torch::jit::Module *>(m)->named_parameters()) {
           f(data, p.name.c_str(), new at::Tensor(p.value));
         } return 0;)
  return -1;
}

int rt_module_named_buffers(void *m, void *data, rt_tensor_cb f, char **err) {
  RT_TRY(for (const auto &b : static_cast<torch::jit::Module *>(m)->named_buffers()) {
           f(data, b.name.c_str(), new at::Tensor(b.value));
         } return 0;)
  return -1;
}

int rt_module_train(void *m, int on, char **err) {
  RT_TRY(static_cast<torch::jit::Module *>(m)->train(on != 0); return 0;)
  return -1;
}

// forward(inputs...): the output tensor, or an error naming what forward
// returned instead.
void *rt_module_forward(void *m, void **inputs, int n, char **err) {
  RT_TRY(std::vector<torch::jit::IValue> args;
         for (int i = 0; i < n; ++i) args.push_back(*static_cast<at::Tensor *>(inputs[i]));
         auto out = static_cast<torch::jit::Module *>(m)->forward(std::move(args));
         if (!out.isTensor()) {
           std::string what = "forward returned " + out.tagKind() + ", not a tensor";
           set_err(err, what.c_str());
           return nullptr;
         }
         return new at::Tensor(out.toTensor());)
  return nullptr;
}

// ---- Gradient hooks: what tch does not expose ----
//
// The trainer reduces gradient buckets while the backward pass is still
// running (as DDP does). A hook on a leaf parameter fires once per backward,
// with the parameter's whole gradient for that pass, just before libtorch
// accumulates it into `.grad`; the hook hands it to `cb` as contiguous f32
// on the CPU. `cb` must not unwind (it is Rust code that catches panics).

typedef void (*rt_grad_cb)(void *ctx, size_t index, const float *data, int64_t numel);

// Registers the hook on tensor `t`; returns its handle for
// rt_remove_grad_hook, or -1 with `err` set.
int64_t rt_register_grad_hook(void *t, rt_grad_cb cb, void *ctx, size_t index, char **err) {
  RT_TRY(auto &tensor = *static_cast<at::Tensor *>(t);
         unsigned handle = tensor.register_hook([cb, ctx, index](const at::Tensor &grad) {
           auto g = grad.to(c10::kCPU, c10::kFloat).contiguous();
           cb(ctx, index, g.const_data_ptr<float>(), g.numel());
         });
         return static_cast<int64_t>(handle);)
  return -1;
}

int rt_remove_grad_hook(void *t, int64_t handle, char **err) {
  RT_TRY(static_cast<at::Tensor *>(t)->remove_hook(static_cast<unsigned>(handle)); return 0;)
  return -1;
}

// Drops `t`'s gradient (`.grad = None`), so the next backward hands its
// gradient over instead of adding it to a zeroed one.
int rt_clear_grad(void *t, char **err) {
  RT_TRY(static_cast<at::Tensor *>(t)->mutable_grad().reset(); return 0;)
  return -1;
}

}  // extern "C"
