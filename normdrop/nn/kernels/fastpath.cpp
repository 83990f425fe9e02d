// normdrop's fast path: batch norm, dropout and uniform noise as C++ autograd nodes around the numba kernels.
//
// A Python autograd.Function costs ~20 us per call and again in backward, as much as torch's whole batch norm on
// a 64x128 input. These nodes do the same work as normdrop.nn.ops' Functions with no Python in between: the
// kernels are numba's serial loops (normdrop/nn/kernels/numba_cpu.py, entry_points()), reached through C
// function pointers registered once by normdrop/nn/kernels/fastpath.py. The Python caller has already checked
// every argument (CPU, float32/float64, contiguous, per-channel tensors of C values in the input's dtype).
//
// Batch norm, training: y = (x - mu) / sqrt(var + eps) * w + b with batch statistics, running statistics
// updated in place by the kernel; backward dx = w / sqrt(var + eps) * (g - mean(g) - xhat * mean(g * xhat)).
// Inference: y = (x - running_mean) / sqrt(running_var + eps) * w + b; dx = g * w / sqrt(running_var + eps).
// When a double backward is being recorded (grad mode on inside backward), the backward is written with ATen
// ops instead, recomputing the batch statistics from x so that every path from x is differentiated.
//
// Dropout: y = x * keep / (1 - p) with keep = bits(seed, offset + u) >= threshold for element (or unit) u (alpha
// dropout: y = x * scale[keep] + shift[keep]); backward is the same node, without shifts, applied to the gradient,
// so it is differentiable any number of times and keeps only the counter key.
//
// Uniform noise (Uout): y = x * eps, eps = 1 + scale * (2 u - 1) with u the counter's uniform in (0, 1); backward is
// the same node on the gradient, as for dropout.
//
// The *_drawing_seed entry points also draw the mask's seed, as normdrop.nn.rng.draw_seed draws it: one
// ``torch.randint(0, 2**62, (1,), generator=g)``, i.e. ATen's uniform_int_from_to_distribution on the generator
// under its lock (the same value and the same generator state after), and expand it into the counter hash's round
// keys (rng.round_keys: SplitMix64). They draw nothing when they return None, so the caller then draws once itself.
//
// Fleet nodes (normdrop.fleet): a (K, B, C) contiguous input holds K members' (B, C) activations. Member k's slice
// is contiguous, so each node calls the kernels above once per member on that slice with the member's own
// parameters (BN momentum and eps; dropout keys, threshold and scales): every member computes exactly what its
// solo run's node computes on its (B, C) input, in one node per layer instead of K Python calls.

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/extension.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using BatchNormForward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, int64_t, double, double);
using BatchNormBackward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, double);
using Dropout = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double,
                         double, double, double);
using UniformNoise = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double);

// Index 0: float32, 1: float64.
BatchNormForward batch_norm_forward_kernel[2] = {nullptr, nullptr};
BatchNormBackward batch_norm_backward_kernel[2] = {nullptr, nullptr};
Dropout dropout_kernel[2] = {nullptr, nullptr};
UniformNoise uniform_noise_kernel[2] = {nullptr, nullptr};

constexpr uint64_t kSeedBound = uint64_t{1} << 62;  // normdrop.nn.rng.SEED_BOUND

// normdrop.nn.rng.draw_seed: torch.randint(0, SEED_BOUND, (1,), generator=generator) on a CPU generator (None: the
// default one), through the very distribution ATen's CPU randint kernel applies, under the generator's lock.
int64_t draw_seed(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::uniform_int_from_to_distribution<int64_t> random(kSeedBound, 0);
  return random(gen);
}

// One SplitMix64 step (normdrop.nn.rng.splitmix64): advances state, returns the output.
uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ULL;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// normdrop.nn.rng.round_keys: the three 32-bit round keys of a seed.
std::array<int64_t, 3> round_keys(int64_t seed) {
  uint64_t state = static_cast<uint64_t>(seed);
  const uint64_t a = splitmix64(state);
  const uint64_t b = splitmix64(state);
  return {static_cast<int64_t>(a & 0xFFFFFFFFULL), static_cast<int64_t>(a >> 32),
          static_cast<int64_t>(b & 0xFFFFFFFFULL)};
}

// Whether the seed may be drawn here: no generator (torch's default CPU one) or a CPU generator.
bool cpu_generator(const std::optional<at::Generator>& generator) {
  return !generator.has_value() || !generator->defined() || generator->device().is_cpu();
}

int dtype_index(const Tensor& x) { return x.scalar_type() == at::kDouble ? 1 : 0; }

int64_t address(const Tensor& t) { return t.defined() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0; }

// The values per channel in a contiguous (N, C, *) input: 1 for (N, C) (rows of C values), else the plane size.
int64_t plane_size(const Tensor& x) { return x.dim() == 2 ? 1 : x.numel() / (x.size(0) * x.size(1)); }

// A gradient in the input's dtype and contiguous layout (it may arrive expanded, e.g. from sum()).
Tensor dense_like(const Tensor& g, const Tensor& x) {
  if (g._is_zerotensor()) return at::zeros_like(x, at::MemoryFormat::Contiguous);
  if (g.scalar_type() == x.scalar_type() && g.is_contiguous() && !g.is_neg()) return g;
  return g.to(x.scalar_type()).resolve_neg().contiguous();
}

std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

Tensor optional_tensor(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// A per-channel vector reshaped to broadcast over x: (1, C, 1, ...).
Tensor per_channel(const Tensor& v, const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return v.view(shape);
}

struct BatchNormNode : public torch::autograd::Function<BatchNormNode> {
  // Absent tensors come as empty optionals: autograd's apply() reads the device of every Tensor argument.
  static Tensor forward(AutogradContext* ctx, Tensor x, std::optional<Tensor> weight_, std::optional<Tensor> bias_,
                        std::optional<Tensor> running_mean_, std::optional<Tensor> running_var_, bool training,
                        double momentum, double eps) {
    const Tensor weight = optional_tensor(weight_), bias = optional_tensor(bias_);
    const Tensor running_mean = optional_tensor(running_mean_), running_var = optional_tensor(running_var_);
    const int64_t channels = x.size(1);
    Tensor y = at::empty_like(x);
    Tensor mean, var;
    if (training) {
      mean = at::empty({channels}, x.options());
      var = at::empty({channels}, x.options());
    } else {
      mean = running_mean;
      var = running_var;
    }
    const bool update = training && running_mean.defined() && running_var.defined();
    batch_norm_forward_kernel[dtype_index(x)](
        address(y), address(x), address(weight), address(bias), address(mean), address(var),
        update ? address(running_mean) : 0, update ? address(running_var) : 0, x.numel(), channels, plane_size(x),
        training ? 1 : 0, eps, momentum);
    if (update) {
      // The kernel wrote the running statistics: bump their version counters as an in-place op would.
      torch::autograd::impl::bump_version(running_mean);
      torch::autograd::impl::bump_version(running_var);
    }
    ctx->save_for_backward({x, weight, mean, var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_y = grads[0];
    variable_list out(8);
    if (!grad_y.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    Tensor grad_x, grad_weight, grad_bias;
    if (at::GradMode::is_enabled()) {
      // Recording a double backward: differentiable ATen ops, batch statistics recomputed from x.
      const auto dims = reduce_dims(x);
      Tensor center, inv_std;
      if (training) {
        center = x.mean(dims, true);
        inv_std = ((x - center).pow(2).mean(dims, true) + eps).rsqrt();
      } else {
        center = per_channel(mean, x);
        inv_std = (per_channel(var, x) + eps).rsqrt();
      }
      Tensor normalized = (x - center) * inv_std;
      grad_bias = grad_y.sum(dims);
      grad_weight = (grad_y * normalized).sum(dims);
      Tensor gain = weight.defined() ? inv_std * per_channel(weight, x) : inv_std;
      if (training) {
        const double count = static_cast<double>(x.numel() / x.size(1));
        grad_x = gain * (grad_y - per_channel(grad_bias, x) / count - normalized * per_channel(grad_weight, x) / count);
      } else {
        grad_x = gain * grad_y;
      }
    } else {
      Tensor grad = dense_like(grad_y, x);
      grad_x = at::empty_like(x);
      grad_weight = at::empty({x.size(1)}, x.options());
      grad_bias = at::empty({x.size(1)}, x.options());
      batch_norm_backward_kernel[dtype_index(x)](
          address(grad_x), address(grad_weight), address(grad_bias), address(grad), address(x), address(weight),
          address(mean), address(var), x.numel(), x.size(1), plane_size(x), training ? 1 : 0, eps);
    }
    out[0] = grad_x;
    if (weight.defined()) out[1] = grad_weight;
    if (has_bias) out[2] = grad_bias;
    return out;
  }
};

struct DropoutNode : public torch::autograd::Function<DropoutNode> {
  // unit_size 1: element-wise; else one mask value per contiguous run of unit_size elements (channel dropout of a
  // contiguous (N, C, *) input, drop path), unit u taking counter counter0 + u. y = x * scale + shift with the
  // (scale, shift) of a dropped or a kept unit; shifts are zero but for alpha dropout's forward.
  static Tensor forward(AutogradContext* ctx, Tensor x, int64_t unit_size, int64_t counter0, int64_t k0, int64_t k1,
                        int64_t k2, int64_t threshold, double drop_scale, double keep_scale, double drop_shift,
                        double keep_shift) {
    Tensor y = at::empty_like(x);
    dropout_kernel[dtype_index(x)](address(y), address(x), x.numel(), unit_size, counter0, k0, k1, k2, threshold,
                                   drop_scale, keep_scale, drop_shift, keep_shift);
    ctx->saved_data["key"] = std::vector<int64_t>{unit_size, counter0, k0, k1, k2, threshold};
    ctx->saved_data["scales"] = std::vector<double>{drop_scale, keep_scale};
    // Nothing of x's size is needed; an empty tensor is saved so that autograd frees it after backward and a
    // second backward without retain_graph raises, as it does for torch.nn.Dropout.
    ctx->save_for_backward({at::empty({0}, x.options())});
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(11);
    if (!grads[0].defined()) return out;
    ctx->get_saved_variables();  // raises if the graph was already freed by an earlier backward
    const auto key = ctx->saved_data["key"].toIntVector();
    const auto scales = ctx->saved_data["scales"].toDoubleVector();
    // dy/dx is the same mask times the same scales (the map is affine in x); through apply() so a double backward
    // is recorded if asked.
    if (grads[0]._is_zerotensor()) {  // a lazily-zero gradient has no memory to read: its gradient is zero too
      out[0] = grads[0];
      return out;
    }
    const Tensor grad = dense_like(grads[0], grads[0]);
    if (at::GradMode::is_enabled()) {  // recording a double backward: through the node again
      out[0] = DropoutNode::apply(grad, key[0], key[1], key[2], key[3], key[4], key[5], scales[0], scales[1], 0.0,
                                  0.0);
    } else {  // the kernel alone: a node's apply() costs more than the kernel on a small gradient
      out[0] = at::empty_like(grad);
      dropout_kernel[dtype_index(grad)](address(out[0]), address(grad), grad.numel(), key[0], key[1], key[2], key[3],
                                        key[4], key[5], scales[0], scales[1], 0.0, 0.0);
    }
    return out;
  }
};

struct UniformNoiseNode : public torch::autograd::Function<UniformNoiseNode> {
  // y = x * (1 + scale * (2 u - 1)), u the uniform of counter counter0 + i; keeps only the key and the scale.
  static Tensor forward(AutogradContext* ctx, Tensor x, int64_t counter0, int64_t k0, int64_t k1, int64_t k2,
                        double scale) {
    Tensor y = at::empty_like(x);
    uniform_noise_kernel[dtype_index(x)](address(y), address(x), x.numel(), counter0, k0, k1, k2, scale);
    ctx->saved_data["key"] = std::vector<int64_t>{counter0, k0, k1, k2};
    ctx->saved_data["scale"] = scale;
    ctx->save_for_backward({at::empty({0}, x.options())});  // as DropoutNode: a second backward raises
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    if (!grads[0].defined()) return out;
    ctx->get_saved_variables();
    const auto key = ctx->saved_data["key"].toIntVector();
    const double scale = ctx->saved_data["scale"].toDouble();
    if (grads[0]._is_zerotensor()) {
      out[0] = grads[0];
      return out;
    }
    const Tensor grad = dense_like(grads[0], grads[0]);  // dy/dx = eps: the same map on the gradient
    if (at::GradMode::is_enabled()) {
      out[0] = UniformNoiseNode::apply(grad, key[0], key[1], key[2], key[3], scale);
    } else {
      out[0] = at::empty_like(grad);
      uniform_noise_kernel[dtype_index(grad)](address(out[0]), address(grad), grad.numel(), key[0], key[1], key[2],
                                              key[3], scale);
    }
    return out;
  }
};

// Real memory holding the values at data_ptr(): not a Python tensor subclass (FakeTensor, wrapper subclasses),
// not a lazily-zero or lazily-negated tensor.
bool plain_memory(const Tensor& x) {
  return x.has_storage() && !x.key_set().has(c10::DispatchKey::Python) && !x._is_zerotensor() && !x.is_neg();
}

// What the kernels take: a dense CPU float32/float64 tensor in row-major order.
bool kernel_ready(const Tensor& x) {
  const auto dtype = x.scalar_type();
  return (dtype == at::kFloat || dtype == at::kDouble) && x.is_cpu() && x.layout() == at::kStrided &&
         x.is_contiguous() && x.numel() > 0 && plain_memory(x);
}

// A per-channel tensor the kernels can read as ``channels`` values of x's dtype (or absent).
bool channel_ready(const std::optional<Tensor>& t, const Tensor& x) {
  if (!t.has_value()) return true;
  return t->scalar_type() == x.scalar_type() && t->is_cpu() && t->layout() == at::kStrided && t->is_contiguous() &&
         t->numel() == x.size(1) && plain_memory(*t);
}

// Batch norm through the node, or None where the inputs are not what the kernels take (the caller then takes the
// general path). The caller has checked the arguments' meaning (ranks, shapes, eps, running statistics present).
std::optional<Tensor> batch_norm(Tensor x, std::optional<Tensor> weight, std::optional<Tensor> bias,
                                 std::optional<Tensor> running_mean, std::optional<Tensor> running_var,
                                 bool training, double momentum, double eps) {
  if (batch_norm_forward_kernel[0] == nullptr || !kernel_ready(x) || x.dim() < 2) return std::nullopt;
  if (!channel_ready(weight, x) || !channel_ready(bias, x) || !channel_ready(running_mean, x) ||
      !channel_ready(running_var, x))
    return std::nullopt;
  return BatchNormNode::apply(x, weight, bias, running_mean, running_var, training, momentum, eps);
}

// Dropout through the node (unit_size as in DropoutNode), or None where x is not what the kernels take.
std::optional<Tensor> dropout(Tensor x, int64_t unit_size, int64_t counter0, int64_t k0, int64_t k1, int64_t k2,
                              int64_t threshold, double drop_scale, double keep_scale, double drop_shift,
                              double keep_shift) {
  if (dropout_kernel[0] == nullptr || !kernel_ready(x) || unit_size < 1 || x.numel() % unit_size != 0)
    return std::nullopt;
  return DropoutNode::apply(x, unit_size, counter0, k0, k1, k2, threshold, drop_scale, keep_scale, drop_shift,
                            keep_shift);
}

// Dropout of x with a mask over its first mask_dims dims (all of them: element-wise), the seed drawn here from
// ``generator``; None (and nothing drawn) where x or the generator is not what this path takes.
std::optional<Tensor> dropout_drawing_seed(Tensor x, const std::optional<at::Generator>& generator, int64_t mask_dims,
                                           int64_t threshold, double drop_scale, double keep_scale,
                                           double drop_shift, double keep_shift) {
  if (dropout_kernel[0] == nullptr || !kernel_ready(x) || !cpu_generator(generator) || mask_dims < 0)
    return std::nullopt;
  int64_t units = 1;
  for (int64_t d = 0; d < std::min<int64_t>(mask_dims, x.dim()); ++d) units *= x.size(d);
  const int64_t unit_size = x.numel() / units;  // numel > 0 (kernel_ready), so units > 0
  const auto keys = round_keys(draw_seed(generator));
  return DropoutNode::apply(x, unit_size, 0, keys[0], keys[1], keys[2], threshold, drop_scale, keep_scale,
                            drop_shift, keep_shift);
}

// Uniform noise (Uout) with offset 0 and the seed drawn here; None (nothing drawn) where the path does not apply.
std::optional<Tensor> uniform_noise_drawing_seed(Tensor x, const std::optional<at::Generator>& generator,
                                                 double scale) {
  if (uniform_noise_kernel[0] == nullptr || !kernel_ready(x) || !cpu_generator(generator)) return std::nullopt;
  const auto keys = round_keys(draw_seed(generator));
  return UniformNoiseNode::apply(x, 0, keys[0], keys[1], keys[2], scale);
}

int64_t element_size(const Tensor& x) { return static_cast<int64_t>(x.element_size()); }

// One member's slice of a contiguous (K, ...) tensor: the address of member k's first value.
int64_t member_address(const Tensor& t, int64_t k) {
  return t.defined() ? address(t) + k * (t.numel() / t.size(0)) * element_size(t) : 0;
}

struct FleetBatchNormNode : public torch::autograd::Function<FleetBatchNormNode> {
  // x (K, B, C); weight, bias, running_mean, running_var (K, C); member k's momentum and eps. Training: batch
  // statistics per member, its running statistics updated in place; inference: its running statistics.
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor weight, Tensor bias, Tensor running_mean,
                        Tensor running_var, bool training, std::vector<double> momenta, std::vector<double> eps) {
    const int64_t members = x.size(0), rows = x.size(1), channels = x.size(2);
    Tensor y = at::empty_like(x);
    Tensor mean = training ? at::empty({members, channels}, x.options()) : running_mean;
    Tensor var = training ? at::empty({members, channels}, x.options()) : running_var;
    const auto kernel = batch_norm_forward_kernel[dtype_index(x)];
    for (int64_t k = 0; k < members; ++k) {
      kernel(member_address(y, k), member_address(x, k), member_address(weight, k), member_address(bias, k),
             member_address(mean, k), member_address(var, k), training ? member_address(running_mean, k) : 0,
             training ? member_address(running_var, k) : 0, rows * channels, channels, 1, training ? 1 : 0, eps[k],
             momenta[k]);
    }
    if (training) {
      torch::autograd::impl::bump_version(running_mean);
      torch::autograd::impl::bump_version(running_var);
    }
    ctx->save_for_backward({x, weight, mean, var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    if (!grads[0].defined()) return out;
    TORCH_CHECK(!at::GradMode::is_enabled(), "normdrop fleet batch norm: double backward is not supported");
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3];
    const bool training = ctx->saved_data["training"].toBool();
    const auto eps = ctx->saved_data["eps"].toDoubleVector();
    const int64_t members = x.size(0), rows = x.size(1), channels = x.size(2);
    const Tensor grad = dense_like(grads[0], x);
    Tensor grad_x = at::empty_like(x);
    Tensor grad_weight = at::empty({members, channels}, x.options());
    Tensor grad_bias = at::empty({members, channels}, x.options());
    const auto kernel = batch_norm_backward_kernel[dtype_index(x)];
    for (int64_t k = 0; k < members; ++k) {
      kernel(member_address(grad_x, k), member_address(grad_weight, k), member_address(grad_bias, k),
             member_address(grad, k), member_address(x, k), member_address(weight, k), member_address(mean, k),
             member_address(var, k), rows * channels, channels, 1, training ? 1 : 0, eps[k]);
    }
    out[0] = grad_x;
    out[1] = grad_weight;
    out[2] = grad_bias;
    return out;
  }
};

struct FleetDropoutNode : public torch::autograd::Function<FleetDropoutNode> {
  // x (K, B, C): member k's element i of its slice kept iff bits(keys_k, i) >= thresholds[k], times keep_scales[k]
  // (else drop_scales[k]); backward applies the same masks and scales to the gradient.
  static Tensor forward(AutogradContext* ctx, Tensor x, std::vector<int64_t> keys, std::vector<int64_t> thresholds,
                        std::vector<double> drop_scales, std::vector<double> keep_scales) {
    Tensor y = at::empty_like(x);
    apply_masks(y, x, keys, thresholds, drop_scales, keep_scales);
    ctx->saved_data["keys"] = keys;
    ctx->saved_data["thresholds"] = thresholds;
    ctx->saved_data["drop_scales"] = drop_scales;
    ctx->saved_data["keep_scales"] = keep_scales;
    ctx->save_for_backward({at::empty({0}, x.options())});  // as DropoutNode: a second backward raises
    ctx->set_materialize_grads(false);
    return y;
  }

  static void apply_masks(Tensor& y, const Tensor& x, const std::vector<int64_t>& keys,
                          const std::vector<int64_t>& thresholds, const std::vector<double>& drop_scales,
                          const std::vector<double>& keep_scales) {
    const int64_t members = x.size(0), per_member = x.numel() / members;
    const auto kernel = dropout_kernel[dtype_index(x)];
    for (int64_t k = 0; k < members; ++k) {
      kernel(member_address(y, k), member_address(x, k), per_member, 1, 0, keys[3 * k], keys[3 * k + 1],
             keys[3 * k + 2], thresholds[k], drop_scales[k], keep_scales[k], 0.0, 0.0);
    }
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);
    if (!grads[0].defined()) return out;
    TORCH_CHECK(!at::GradMode::is_enabled(), "normdrop fleet dropout: double backward is not supported");
    ctx->get_saved_variables();
    if (grads[0]._is_zerotensor()) {
      out[0] = grads[0];
      return out;
    }
    const Tensor grad = dense_like(grads[0], grads[0]);
    out[0] = at::empty_like(grad);
    apply_masks(out[0], grad, ctx->saved_data["keys"].toIntVector(), ctx->saved_data["thresholds"].toIntVector(),
                ctx->saved_data["drop_scales"].toDoubleVector(), ctx->saved_data["keep_scales"].toDoubleVector());
    return out;
  }
};

// A stacked (K, C) per-member tensor the fleet kernels can read (K and C as x's).
bool member_ready(const Tensor& t, const Tensor& x) {
  return t.defined() && t.scalar_type() == x.scalar_type() && t.is_cpu() && t.layout() == at::kStrided &&
         t.is_contiguous() && t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(2) && plain_memory(t);
}

// Fleet batch norm of a (K, B, C) input with member k's (momenta[k], eps[k]); None where the tensors are not what
// the kernels take.
std::optional<Tensor> fleet_batch_norm(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var,
                                       bool training, std::vector<double> momenta, std::vector<double> eps) {
  if (batch_norm_forward_kernel[0] == nullptr || !kernel_ready(x) || x.dim() != 3) return std::nullopt;
  if (!member_ready(weight, x) || !member_ready(bias, x) || !member_ready(running_mean, x) ||
      !member_ready(running_var, x))
    return std::nullopt;
  const auto members = static_cast<size_t>(x.size(0));
  TORCH_CHECK(momenta.size() == members && eps.size() == members, "fleet_batch_norm: one momentum and eps per member");
  return FleetBatchNormNode::apply(x, weight, bias, running_mean, running_var, training, momenta, eps);
}

// Fleet dropout of a (K, B, C) input, member k's seed drawn here from generators[k] as draw_seed draws it (in
// member order; an empty one: torch's default CPU generator); None (nothing drawn) where x or a generator is not
// what this path takes.
std::optional<Tensor> fleet_dropout_drawing_seeds(Tensor x,
                                                  const std::vector<std::optional<at::Generator>>& generators,
                                                  std::vector<int64_t> thresholds, std::vector<double> drop_scales,
                                                  std::vector<double> keep_scales) {
  if (dropout_kernel[0] == nullptr || !kernel_ready(x) || x.dim() != 3) return std::nullopt;
  const auto members = static_cast<size_t>(x.size(0));
  if (generators.size() != members || thresholds.size() != members || drop_scales.size() != members ||
      keep_scales.size() != members)
    return std::nullopt;
  for (const auto& generator : generators)
    if (!cpu_generator(generator)) return std::nullopt;
  std::vector<int64_t> keys;
  keys.reserve(3 * members);
  for (const auto& generator : generators) {
    const auto member_keys = round_keys(draw_seed(generator));
    keys.insert(keys.end(), member_keys.begin(), member_keys.end());
  }
  return FleetDropoutNode::apply(x, keys, thresholds, drop_scales, keep_scales);
}

void register_kernels(int64_t forward32, int64_t forward64, int64_t backward32, int64_t backward64,
                      int64_t dropout32, int64_t dropout64, int64_t noise32, int64_t noise64) {
  batch_norm_forward_kernel[0] = reinterpret_cast<BatchNormForward>(forward32);
  batch_norm_forward_kernel[1] = reinterpret_cast<BatchNormForward>(forward64);
  batch_norm_backward_kernel[0] = reinterpret_cast<BatchNormBackward>(backward32);
  batch_norm_backward_kernel[1] = reinterpret_cast<BatchNormBackward>(backward64);
  dropout_kernel[0] = reinterpret_cast<Dropout>(dropout32);
  dropout_kernel[1] = reinterpret_cast<Dropout>(dropout64);
  uniform_noise_kernel[0] = reinterpret_cast<UniformNoise>(noise32);
  uniform_noise_kernel[1] = reinterpret_cast<UniformNoise>(noise64);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_norm", &batch_norm, "Batch norm as a C++ autograd node (checked inputs only).");
  m.def("dropout", &dropout, "Element-wise or channel (alpha) dropout as a C++ autograd node (checked inputs only).");
  m.def("dropout_drawing_seed", &dropout_drawing_seed,
        "Dropout as a C++ autograd node, its seed drawn from the generator as normdrop.nn.rng.draw_seed draws it.");
  m.def("uniform_noise_drawing_seed", &uniform_noise_drawing_seed,
        "Uniform multiplicative noise (Uout) as a C++ autograd node, its seed drawn as draw_seed draws it.");
  m.def("fleet_batch_norm", &fleet_batch_norm, "Batch norm of K members' (B, C) slices of a (K, B, C) input.");
  m.def("fleet_dropout_drawing_seeds", &fleet_dropout_drawing_seeds,
        "Dropout of K members' (B, C) slices, member k's seed drawn from its own generator.");
  m.def("draw_seed", &draw_seed, "normdrop.nn.rng.draw_seed on a CPU generator (None: torch's default).");
  m.def("round_keys", &round_keys, "normdrop.nn.rng.round_keys.");
  m.def("register_kernels", &register_kernels, "Register the numba kernels' C entry points.");
}
