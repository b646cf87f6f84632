#pragma once
// Decoder<Arch, Policy, T>: a decoder-only transformer of an architecture bundle (arch::Gpt2,
// arch::Llama) with a PEFT policy attached at its hook sites.
//
// Data flow (docs/architecture.md draws it): token ids → embedding [policy: token table]
// (+ learned positions) → [policy: virtual tokens] → for each block: norm → q, k, v projections
// [policy: linear] → rotary (LLaMA) → [policy: prefix keys/values] → attention → output
// projection [linear] → [policy: adapt_attention, after_attention] → residual → norm → MLP
// [linear at each projection] →
// [policy: after_mlp] → residual → [policy: after_block] → final norm → head → logits →
// cross-entropy.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/arch/gpt2.hpp"
#include "peft/arch/llama.hpp"
#include "peft/io/checkpoint.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/methods/policy.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/model_shapes.hpp"
#include "peft/nn/modules.hpp"

namespace peft {

/// A batch of token sequences, right-padded, row-major [batch, seq].
struct Batch {
  std::int64_t batch = 0;
  std::int64_t seq = 0;
  std::vector<std::int64_t> input_ids;       ///< [B·T]
  std::vector<std::int64_t> attention_mask;  ///< [B·T], 1 = token, 0 = padding; empty: all 1
  std::vector<std::int64_t>
      labels;  ///< [B·T], −100 = ignored; empty: input_ids with −100 at padding
  /// [B] or empty: the adapter each row runs with, by name (Decoder::add_adapter), or
  /// kBaseAdapterName for the base model alone — the reference's `adapter_names` argument.
  /// Empty: every row runs with the active adapter.
  std::vector<std::string> adapter_names;

  void validate() const {
    const auto n = static_cast<std::size_t>(batch * seq);
    if (batch <= 0 || seq <= 0 || input_ids.size() != n)
      throw ShapeError("batch: input_ids has " + std::to_string(input_ids.size()) +
                       " entries, expected batch·seq = " + std::to_string(n));
    if (!attention_mask.empty() && attention_mask.size() != n)
      throw ShapeError("batch: attention_mask size != batch·seq");
    if (!labels.empty() && labels.size() != n) throw ShapeError("batch: labels size != batch·seq");
    if (!adapter_names.empty() && adapter_names.size() != static_cast<std::size_t>(batch))
      throw ShapeError("batch: adapter_names has " + std::to_string(adapter_names.size()) +
                       " entries, expected one per row (" + std::to_string(batch) + ")");
  }
};

/// The next-token targets of a batch, [B, virtual_tokens + T]: targets[b, t] = labels'[b, t + 1],
/// where labels' is −100 (kIgnoreIndex) over the virtual tokens, then the labels (or input_ids
/// with −100 at padding). The loss is the mean cross-entropy over the targets that are not −100;
/// the data-parallel trainer weights each rank's share by its count of them
/// (train/data_parallel.hpp).
inline std::vector<std::int64_t> shifted_targets(const Batch& batch, std::int64_t virtual_tokens) {
  const std::int64_t Tn = batch.seq + virtual_tokens;
  std::vector<std::int64_t> targets(static_cast<std::size_t>(batch.batch * Tn), ops::kIgnoreIndex);
  for (std::int64_t b = 0; b < batch.batch; ++b)
    for (std::int64_t t = 0; t + 1 < Tn; ++t) {
      const std::int64_t src = t + 1 - virtual_tokens;  // index into the real tokens
      if (src < 0) continue;
      const auto i = static_cast<std::size_t>(b * batch.seq + src);
      std::int64_t label;
      if (!batch.labels.empty())
        label = batch.labels[i];
      else
        label = (!batch.attention_mask.empty() && batch.attention_mask[i] == 0)
                    ? ops::kIgnoreIndex
                    : batch.input_ids[i];
      targets[static_cast<std::size_t>(b * Tn + t)] = label;
    }
  return targets;
}

/// The first adapter's name, as the reference names it.
inline constexpr std::string_view kDefaultAdapterName = "default";
/// In Batch::adapter_names: the row runs the base model without any adapter (the reference's).
inline constexpr std::string_view kBaseAdapterName = "__base__";

/// Puts a model in evaluation mode (no dropout) for a scope and restores its mode after:
/// evaluate() and generate() use it, so that they are deterministic whatever the caller's mode.
template <class Model>
class EvaluationScope {
 public:
  explicit EvaluationScope(Model& model) : model_(model) {
    if constexpr (requires { model.training(); }) {
      was_training_ = model.training();
      model.set_training(false);
    }
  }
  ~EvaluationScope() {
    if constexpr (requires { model_.training(); }) model_.set_training(was_training_);
  }
  EvaluationScope(const EvaluationScope&) = delete;
  EvaluationScope& operator=(const EvaluationScope&) = delete;

 private:
  Model& model_;
  bool was_training_ = false;
};

/// Runs the base model without any adapter for a scope (the reference's `with
/// model.disable_adapter():`) and restores the previous setting after.
template <class Model>
class DisableAdapterScope {
 public:
  explicit DisableAdapterScope(Model& model) : model_(model), was_(model.adapters_disabled()) {
    model_.set_adapters_disabled(true);
  }
  ~DisableAdapterScope() { model_.set_adapters_disabled(was_); }
  DisableAdapterScope(const DisableAdapterScope&) = delete;
  DisableAdapterScope& operator=(const DisableAdapterScope&) = delete;

 private:
  Model& model_;
  bool was_;
};

template <class T>
struct ForwardResult {
  Var<T> logits;  ///< [B, P + T, V] (P virtual tokens of prompt tuning)
  Var<T> loss;    ///< [1], defined when the forward was asked for the loss
  std::int64_t virtual_tokens = 0;
  Var<T> hidden;  ///< the last hidden states after the final norm: set by a pre-pass only
};

template <class Arch, class Method = NoPeft, class T = float>
class Decoder {
  // The contract, one message per missing member (methods/policy.hpp); a failing method is
  // replaced by NoPeft so that nothing below adds errors of its own.
  static_assert(sizeof(detail::StateContract<Method>) > 0);
  using Policy = std::conditional_t<detail::PolicyCheck<Method>::ok, Method, NoPeft>;

 public:
  using Scalar = T;
  using Architecture = Arch;
  using AdapterPolicy = Policy;  /// the method (NoPeft when the given one fails the contract)
  using Adapter = typename Policy::template State<T>;
  using Norm = typename Arch::template Norm<T>;

  struct Block {
    Norm attention_norm, mlp_norm;
    nn::Linear<T> qkv;      // fused (GPT-2)
    nn::Linear<T> q, k, v;  // separate (LLaMA)
    nn::Linear<T> attention_out;
    nn::Linear<T> mlp_in, mlp_out;  // GELU MLP (GPT-2: c_fc, c_proj)
    nn::Linear<T> gate, up, down;   // SwiGLU MLP (LLaMA)
  };

  /// A model with random base weights (normal(0, 0.02), biases 0, norms 1) and the policy
  /// attached with the given config. `seed` fixes both. `base` is the frozen weights' storage
  /// (core/frozen_weight.hpp): in bf16 or NF4 each weight is drawn in fp32 one module at a
  /// time and stored in the format, so the model never exists in fp32 (the values are those of
  /// the fp32 model of the same seed, rounded or quantized).
  explicit Decoder(ModelConfig config, typename Policy::Config peft_config = {},
                   std::uint64_t seed = 0, BaseFormat base = BaseFormat::fp32)
      : Decoder(std::move(config), std::move(peft_config), seed, base, "model config", true) {}

  /// A model whose base weights come from `model_dir/model.safetensors`, or from the shards
  /// `model_dir/model.safetensors.index.json` lists (io::Checkpoint: memory-mapped; config from
  /// `model_dir/config.json` must match Arch), with the policy attached. Validates before it
  /// allocates: the config's sizes are bounded (check_plausible_size) and the checkpoint's
  /// header is checked against the config (check_base_tensors) before any weight exists.
  /// `base`: the frozen weights' storage, as for the constructor; a weight is converted as it
  /// is read (a BF16 tensor kept as its bytes for bf16), so peak memory is the model in its
  /// format plus one tensor in fp32.
  static Decoder load(const std::filesystem::path& model_dir,
                      typename Policy::Config peft_config = {}, std::uint64_t seed = 0,
                      BaseFormat base = BaseFormat::fp32) {
    const std::filesystem::path config_path = model_dir / "config.json";
    ModelConfig config = ModelConfig::from_json(io::load_json(config_path), config_path.string());
    if (config.model_type != Arch::model_type)
      throw ConfigError(config_path.string() + ": config is for '" + config.model_type +
                        "', the decoder is " + std::string(Arch::model_type));
    check_plausible_size<Arch>(config, config_path.string(), base_element_bytes(base, sizeof(T)));
    const io::Checkpoint file = io::Checkpoint::open(model_dir);  // mapped; one file or shards
    check_base_tensors(file, base_tensor_shapes<Arch>(config));
    Decoder model(std::move(config), std::move(peft_config), seed, base, config_path.string(),
                  false);
    model.load_base_weights(file);
    return model;
  }

  /// Checks a checkpoint's table of tensors against the base tensors a config implies, from the
  /// header alone: every expected tensor present with its shape and a float dtype, and no tensor
  /// the model does not have (a file for another model or config must not load half-used).
  /// Throws FileError naming the file and the tensor.
  /// `File`: an io::SafetensorsFile or an io::Checkpoint (sharded).
  template <class File>
  static void check_base_tensors(const File& file, const std::vector<BaseTensorShape>& expected) {
    std::set<std::string_view> known;
    for (const BaseTensorShape& e : expected) {
      known.insert(e.name);
      if (!file.contains(e.name))
        throw FileError(io::printable(file.name()) + ": missing tensor '" + e.name +
                        "' (expected shape " + io::shape_to_string(e.shape) + " for this config)");
      const io::TensorInfo& info = file.info(e.name);
      if (info.shape != e.shape)
        throw FileError(io::printable(file.name()) + ": tensor '" + e.name + "' has shape " +
                        io::shape_to_string(info.shape) + ", expected " +
                        io::shape_to_string(e.shape) + " for this config");
      if (!io::is_floating_dtype(info.dtype))
        throw FileError(io::printable(file.name()) + ": tensor '" + e.name + "' has dtype " +
                        std::string(io::dtype_name(info.dtype)) +
                        ", expected a float dtype (F64, F32, F16 or BF16) for a weight");
    }
    for (const io::TensorInfo& info : file.tensors())
      if (!known.count(info.name))
        throw FileError(io::printable(file.name()) + ": tensor '" + io::printable(info.name) +
                        "' is not a tensor of this model (a checkpoint of another model or "
                        "config?)");
  }

  Decoder(Decoder&&) noexcept = default;
  Decoder& operator=(Decoder&&) noexcept = default;
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  const ModelConfig& config() const { return config_; }
  /// How the frozen base weights are stored (core/frozen_weight.hpp).
  BaseFormat base_format() const { return base_format_; }
  /// Bytes held by the base model's tensors (frozen weights in their format, the rest in T).
  std::size_t base_weight_bytes() {
    std::size_t bytes = frozen_embedding_ ? frozen_embedding_->bytes() : 0;
    for (const NamedParameter<T>& p : base_parameters())
      bytes += static_cast<std::size_t>(p.var.value().numel()) * sizeof(T);
    for (nn::Linear<T>* lin : linear_modules())
      if (lin->frozen) bytes += lin->frozen->bytes();
    return bytes;
  }
  /// The active adapter's state (the one forward, training and saving use).
  Adapter& adapter() { return adapters_[active_]->state; }
  const Adapter& adapter() const { return adapters_[active_]->state; }

  // NAMED ADAPTERS (the reference's multi-adapter API). A model starts with one adapter named
  // kDefaultAdapterName, built from the config it was given; more of the same method (P) are
  // added by name, each with its own tensors, and one is active at a time. The others are left
  // untouched, bit for bit, by whatever the active one does. A batch may also name an adapter
  // per row (Batch::adapter_names). Composites (Compose<...>) are one method here: each named
  // adapter is then a whole composite.

  /// Every adapter's name, in the order they were added.
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> out;
    for (const auto& a : adapters_) out.push_back(a->name);
    return out;
  }
  const std::string& active_adapter() const { return adapters_[active_]->name; }
  bool has_adapter(std::string_view name) const { return find_adapter(name) < adapters_.size(); }
  /// An adapter's state by name; ConfigError naming the adapters there are if none is called so.
  Adapter& adapter(std::string_view name) { return adapters_[adapter_index(name)]->state; }
  const Adapter& adapter(std::string_view name) const {
    return adapters_[adapter_index(name)]->state;
  }

  /// Adds an adapter called `name` with fresh tensors initialised from `seed` (as the model's
  /// own adapter is from the model's seed), attached to the same modules its config selects.
  /// It is not made active (set_adapter). The name must be new, not kBaseAdapterName, and usable
  /// as a folder name (save_adapters writes it in a sub-folder so called).
  Adapter& add_adapter(const std::string& name, const typename Policy::Config& config,
                       std::uint64_t seed = 0) {
    check_new_adapter_name(name);
    auto added = std::make_unique<NamedAdapter>(name, config);
    std::mt19937_64 rng(seed);
    AttachContext<T> ctx{config_, linear_modules(), rng, base_parameters()};
    added->state.attach(ctx);
    adapters_.push_back(std::move(added));
    return adapters_.back()->state;
  }
  /// Makes `name` the active adapter. Refused while the active one is merged into the weights
  /// (the base the other adapters see would include it): unmerge first.
  void set_adapter(std::string_view name) {
    const std::size_t i = adapter_index(name);
    if (i != active_ && adapters_[active_]->merged)
      throw ConfigError("set_adapter: adapter '" + active_adapter() +
                        "' is merged into the base weights; unmerge() it before switching to '" +
                        std::string(name) + "'");
    active_ = i;
  }
  /// Removes an adapter and its tensors. The last adapter cannot be deleted; deleting the
  /// active one makes the first remaining one active (as the reference does). A merged adapter
  /// is unmerged first by the caller (refused otherwise).
  void delete_adapter(std::string_view name) {
    const std::size_t i = adapter_index(name);
    if (adapters_.size() == 1)
      throw ConfigError("delete_adapter: '" + std::string(name) +
                        "' is the model's only adapter (a model keeps at least one)");
    if (adapters_[i]->merged)
      throw ConfigError("delete_adapter: adapter '" + std::string(name) +
                        "' is merged into the base weights; unmerge() it first");
    const std::string active = active_adapter();
    adapters_.erase(adapters_.begin() + static_cast<std::ptrdiff_t>(i));
    active_ = i == active_ ? 0 : find_adapter(active);
  }
  /// Runs the base model alone while on (DisableAdapterScope sets it for a scope); the
  /// adapters are kept as they are.
  void set_adapters_disabled(bool on) { adapters_disabled_ = on; }
  bool adapters_disabled() const { return adapters_disabled_; }
  std::vector<Block>& blocks() { return blocks_; }

  /// Activation checkpointing: a training forward keeps only each block's input; the block is
  /// run again in backward to rebuild its activations (one block's worth alive at a time), for
  /// about a third more compute. Off by default.
  void set_activation_checkpointing(bool on) { checkpoint_blocks_ = on; }
  bool activation_checkpointing() const { return checkpoint_blocks_; }

  /// Elements of the base weights held in bf16 or NF4 (not in base_parameters()).
  std::int64_t frozen_base_elements() {
    std::int64_t n = frozen_embedding_ ? frozen_embedding_->rows() * frozen_embedding_->cols() : 0;
    for (nn::Linear<T>* lin : linear_modules())
      if (lin->frozen) n += lin->frozen->rows() * lin->frozen->cols();
    return n;
  }

  /// Every base-model tensor held as a Tensor<T>, named as in the reference model.safetensors
  /// (the tied head is not listed: it is the token embedding). Weights held in bf16 or NF4
  /// (base_format() other than fp32) are not Vars and are not listed.
  std::vector<NamedParameter<T>> base_parameters() {
    std::vector<NamedParameter<T>> out;
    auto visit = [&](const std::string& name, Var<T>& var) {
      if (var) out.push_back({name, var});
    };
    visit(Arch::token_embedding() + ".weight", token_embedding_);
    if constexpr (Arch::learned_positions)
      visit(Arch::position_embedding() + ".weight", position_embedding_);
    for (int i = 0; i < static_cast<int>(blocks_.size()); ++i) {
      Block& b = blocks_[static_cast<std::size_t>(i)];
      b.attention_norm.visit_parameters(Arch::attention_norm(i), visit);
      for (nn::Linear<T>* lin : block_linears(b)) {
        visit(lin->name + ".weight", lin->weight);
        if (lin->bias) visit(lin->name + ".bias", lin->bias);
      }
      b.mlp_norm.visit_parameters(Arch::mlp_norm(i), visit);
    }
    final_norm_.visit_parameters(Arch::final_norm(), visit);
    if (!config_.tie_word_embeddings) visit(lm_head_.name + ".weight", lm_head_.weight);
    return out;
  }

  /// Every projection, in site order (the indices adapters are keyed by).
  std::vector<nn::Linear<T>*> linear_modules() {
    std::vector<nn::Linear<T>*> out;
    for (Block& b : blocks_)
      for (nn::Linear<T>* lin : block_linears(b)) out.push_back(lin);
    if (!config_.tie_word_embeddings) out.push_back(&lm_head_);
    return out;
  }

  /// Tensors the optimizer updates: the adapter's trainable ones, and the base weights when
  /// full fine-tuning is on.
  std::vector<NamedParameter<T>> trainable_parameters() {
    std::vector<NamedParameter<T>> out;
    for (NamedParameter<T>& p : adapter().parameters())
      if (p.var.requires_grad()) out.push_back(p);
    const std::size_t from_adapter = out.size();
    for (NamedParameter<T>& p : base_parameters()) {
      if (!p.var.requires_grad()) continue;
      // A base tensor the adapter trains in place (LN tuning's norms) is listed once.
      bool listed = false;
      for (std::size_t i = 0; i < from_adapter && !listed; ++i) listed = out[i].var.same_as(p.var);
      if (!listed) out.push_back(p);
    }
    return out;
  }

  /// Full fine-tuning: every base tensor trainable (off by default: the base is frozen).
  /// ConfigError for a base held in bf16 or NF4 (those weights are frozen by construction).
  void set_base_trainable(bool trainable) {
    if (trainable && base_format_ != BaseFormat::fp32)
      throw ConfigError(
          "full fine-tuning needs base format fp32; this model holds its weights in " +
          std::string(base_format_name(base_format_)));
    for (NamedParameter<T>& p : base_parameters()) p.var.set_requires_grad(trainable);
  }

  /// Loads base weights, checking the file's table against the config first (every tensor
  /// present with its shape and a float dtype, none the model lacks: check_base_tensors), then
  /// that every value is finite (FileError naming the tensor). Converts any float dtype of the
  /// file to T. A table that does not fit changes nothing; a non-finite tensor is found only as
  /// it is read (one tensor at a time, so loading never holds two copies of the model), and
  /// leaves the tensors before it replaced: discard the model then (load() does).
  /// Weights in bf16 or NF4 are converted as they are read (frozen_from_file).
  template <class File>
  void load_base_weights(const File& file) {
    check_base_tensors(file, base_tensor_shapes<Arch>(config_));
    for (NamedParameter<T>& p : base_parameters())
      p.var.value() = Tensor<T>(p.var.shape(), file.template read_finite<T>(p.name, p.var.shape()));
    if (base_format_ != BaseFormat::fp32) {
      const std::string embedding = Arch::token_embedding() + ".weight";
      frozen_embedding_ = frozen_from_file(file, embedding, embedding_format(), config_.vocab_size,
                                           config_.hidden_size, ops::WeightLayout::OutIn);
      for (nn::Linear<T>* lin : linear_modules())
        lin->store_frozen(frozen_from_file(file, lin->name + ".weight", storage_format(*lin),
                                           lin->out_features, lin->in_features, lin->layout));
    }
    base_weights_changed();
  }

  /// Adapters initialised from base tensors (prompt tuning from token embeddings, PiSSA from
  /// the weights' singular vectors, DoRA's magnitudes from the weights' norms) redo it: call
  /// after replacing base weights by hand (load_base_weights calls it).
  void base_weights_changed() {
    if constexpr (DependsOnBaseWeights<Adapter, T>) {
      std::vector<nn::Linear<T>*> modules = linear_modules();
      for (auto& a : adapters_) a->state.on_base_weights_loaded(modules);
    }
  }

  /// Training mode (torch's model.train()): the adapters' dropouts draw their masks from
  /// dropout_generator(). Off by default and in evaluation: forward is then deterministic, as
  /// evaluate(), generate() and the golden cases need. The Trainer turns it on for its steps.
  void set_training(bool on) { training_ = on; }
  bool training() const { return training_; }
  /// The generator of the dropout masks, seeded with the model's seed; its state travels in
  /// training checkpoints, so that a resumed run draws the masks the uninterrupted one drew.
  std::mt19937_64& dropout_generator() { return dropout_rng_; }

  /// Forward pass; with `with_loss`, also the causal-LM loss: mean cross-entropy of
  /// logits[:, t] against labels[:, t + 1] over labels that are not −100.
  ForwardResult<T> forward(Tape<T>& tape, const Batch& batch, bool with_loss = true) {
    batch.validate();
    const RowGroupsGuard groups = resolve_row_groups(batch);
    // The pre-pass hook (policy.hpp, HasPrePass: X-LoRA's scaling pass): this forward, run once
    // without recording up to the final norm, whose hidden states the adapter reads.
    if constexpr (HasPrePass<Adapter, T>)
      if (Adapter* a = hooked(); a && !in_pre_pass_)
        a->pre_pass(
            tape,
            [&] {
              struct Flag {
                bool& f;
                ~Flag() { f = false; }
              } flag{in_pre_pass_ = true};
              Tape<T> off(false);
              return forward(off, batch, false).hidden.value();
            },
            training_ ? &dropout_rng_ : nullptr);
    const std::int64_t B = batch.batch, T0 = batch.seq, d = config_.hidden_size;
    const Var<T> table = token_table(tape);
    Var<T> h = frozen_embedding_ ? ops::frozen_embedding<T>(frozen_embedding_, batch.input_ids)
                                 : ops::embedding(tape, table, batch.input_ids);
    h = ops::reshape(tape, h, Shape{B, T0, d});
    std::int64_t virtual_tokens = 0;
    if constexpr (HasVirtualTokens<Adapter, T>) {
      if (Adapter* a = hooked()) {
        virtual_tokens = a->num_virtual_tokens();
        if (virtual_tokens > 0) h = a->prepend_virtual_tokens(tape, h);
      }
    }
    const std::int64_t Tn = T0 + virtual_tokens;  // sequence length through the blocks
    std::int64_t prefix = 0;
    if constexpr (HasPrefix<Adapter, T>)
      if (Adapter* a = hooked()) prefix = a->num_prefix_tokens();
    // Real tokens sit at positions prefix .. prefix + Tn − 1 (after a cache of the prefix).
    h = add_positions(tape, h, prefix, Tn);
    ops::AttentionSpec spec = attention_spec(prefix);
    spec.key_visible = key_visibility(batch, prefix, virtual_tokens);

    const TokenSpans spans = token_spans(batch, virtual_tokens, 0);
    for (int layer = 0; layer < static_cast<int>(blocks_.size()); ++layer) {
      Block& block = blocks_[static_cast<std::size_t>(layer)];
      if (checkpoint_blocks_ && tape.enabled())
        h = checkpointed_block_forward(tape, block, layer, h, spec, prefix, B);
      else
        h = block_forward(tape, block, layer, h, spec, prefix, B);
      h = after_block(tape, layer, h, spans);
    }

    h = final_norm_.forward(tape, h);
    ForwardResult<T> result;
    result.virtual_tokens = virtual_tokens;
    if constexpr (HasPrePass<Adapter, T>)
      if (in_pre_pass_) {  // the pre-pass needs the hidden states only
        result.hidden = h;
        return result;
      }
    if (config_.tie_word_embeddings && with_loss && frozen_embedding_) {
      auto [logits, loss] = ops::frozen_linear_cross_entropy(
          tape, h, frozen_embedding_, shifted_targets(batch, virtual_tokens));
      result.logits = std::move(logits);
      result.loss = std::move(loss);
    } else if (config_.tie_word_embeddings && with_loss) {
      // Head and loss fused: the logits are the only vocabulary-sized buffer, and backward
      // turns them into their gradient in place once the caller has let go of them.
      auto [logits, loss] =
          ops::linear_cross_entropy(tape, h, table, Var<T>{}, ops::WeightLayout::OutIn,
                                    shifted_targets(batch, virtual_tokens));
      result.logits = std::move(logits);
      result.loss = std::move(loss);
    } else {
      result.logits = head_logits(tape, h, table);
      // cross_entropy reads [B, T, V] as B·T rows: no flattened copy of the logits.
      if (with_loss)
        result.loss =
            ops::cross_entropy(tape, result.logits, shifted_targets(batch, virtual_tokens));
    }
    if constexpr (HasExtraLoss<Adapter, T>)
      if (Adapter* a = hooked(); a && with_loss)
        result.loss = ops::add(tape, result.loss, a->extra_loss(tape));
    return result;
  }

  /// Keys and values of every layer for the positions a forward_cached sequence has processed:
  /// the prefix's (prefix tuning), the virtual tokens' (prompt tuning, P-tuning) and the
  /// tokens'. One per sequence being generated; empty before its first step.
  struct KvCache {
    std::vector<Tensor<T>> keys, values;  ///< per layer [B, S, kv_dim], S = prefix + past
    std::int64_t batch = 0;
    std::int64_t past = 0;  ///< positions processed after the prefix (virtual tokens included)
    bool empty() const { return keys.empty(); }
    void clear() { *this = KvCache{}; }
  };

  /// Generation with a key/value cache: runs `batch`'s tokens after the positions `cache` holds
  /// (all of them on the first call, the prefill: virtual tokens and the prefix then), extends
  /// the cache, and returns the logits of the last position only, [B, 1, V]. Each token then
  /// costs one position's work instead of the whole context's. Evaluation only (no tape, no
  /// dropout); no attention mask (every row of the batch has the same length). Every policy
  /// hook sees the new positions as the full forward shows them, so the logits are those of
  /// forward() over the whole context (tests/test_additive.cpp, "key/value cache").
  Tensor<T> forward_cached(const Batch& batch, KvCache& cache) {
    batch.validate();
    if (training_)
      throw ConfigError("forward_cached: the model is in training mode (generation evaluates)");
    if (!batch.attention_mask.empty())
      throw ShapeError("forward_cached: an attention mask is not supported (rows of one length)");
    if constexpr (HasPrePass<Adapter, T>)
      if (hooked())
        throw ConfigError(std::string("forward_cached: ") + std::string(method_title<Policy>()) +
                          " runs a pre-pass over the whole sequence; generate without the "
                          "cache (use_cache false, as the reference generates)");
    if (!cache.empty() && cache.batch != batch.batch)
      throw ShapeError("forward_cached: the cache holds " + std::to_string(cache.batch) +
                       " rows, the batch " + std::to_string(batch.batch));
    const RowGroupsGuard groups = resolve_row_groups(batch);
    Tape<T> tape(false);
    const std::int64_t B = batch.batch, T0 = batch.seq, d = config_.hidden_size;
    const Var<T> table = token_table(tape);
    Var<T> h = frozen_embedding_ ? ops::frozen_embedding<T>(frozen_embedding_, batch.input_ids)
                                 : ops::embedding(tape, table, batch.input_ids);
    h = ops::reshape(tape, h, Shape{B, T0, d});
    std::int64_t Tn = T0;
    if constexpr (HasVirtualTokens<Adapter, T>) {
      const std::int64_t virtual_tokens = hooked() ? hooked()->num_virtual_tokens() : 0;
      if (cache.empty() && virtual_tokens > 0) {
        h = hooked()->prepend_virtual_tokens(tape, h);
        Tn += virtual_tokens;
      }
    }
    std::int64_t prefix = 0;
    if constexpr (HasPrefix<Adapter, T>)
      if (Adapter* a = hooked()) prefix = a->num_prefix_tokens();
    const std::int64_t first = prefix + cache.past;  // position of the step's first token
    h = add_positions(tape, h, first, Tn);
    const ops::AttentionSpec spec = attention_spec(first);
    // The tokens before this step: the cache's positions less the virtual tokens among them.
    const TokenSpans spans =
        token_spans(batch, Tn - T0, cache.empty() ? 0 : cache.past - virtual_token_count());
    for (int layer = 0; layer < static_cast<int>(blocks_.size()); ++layer) {
      h = block_forward(tape, blocks_[static_cast<std::size_t>(layer)], layer, h, spec, prefix, B,
                        CacheStep{&cache, first});
      h = after_block(tape, layer, h, spans);
    }
    cache.batch = B;
    cache.past += Tn;
    h = ops::slice(tape, h, 1, Tn - 1, 1);  // the last position: what the next token needs
    h = final_norm_.forward(tape, h);
    return head_logits(tape, h, table).value();
  }

  /// Logits without recording anything for backward.
  Tensor<T> logits(const Batch& batch) {
    Tape<T> tape(false);
    return forward(tape, batch, false).logits.value();
  }

  /// Folds the active adapter into the base weights (and back). While merged, the model runs
  /// as the adapted model without the adapter's product, and switching or mixing adapters is
  /// refused.
  void merge() requires Mergeable<Adapter, T> {
    auto modules = linear_modules();
    adapter().merge(modules);
    adapters_[active_]->merged = true;
  }
  void unmerge() requires Mergeable<Adapter, T> {
    auto modules = linear_modules();
    adapter().unmerge(modules);
    adapters_[active_]->merged = false;
  }

 private:
  Decoder(ModelConfig config, typename Policy::Config peft_config, std::uint64_t seed,
          BaseFormat base, const std::string& source, bool initialise)
      : config_(std::move(config)),
        rng_(seed),
        dropout_rng_(seed ^ 0xD5A61266F0C9392Cull),
        base_format_(base) {
    if (config_.model_type != Arch::model_type)
      throw ConfigError(source + ": config is for '" + config_.model_type + "', the decoder is " +
                        std::string(Arch::model_type));
    config_.validate(source);
    check_plausible_size<Arch>(config_, source, base_element_bytes(base, sizeof(T)));
    build_modules();
    if (initialise) initialise_base_weights();
    adapters_.push_back(
        std::make_unique<NamedAdapter>(std::string(kDefaultAdapterName), peft_config));
    attach_adapter();
  }

  // A module's storage: the model's format, except that an NF4 model keeps its untied head in
  // bf16 (as QLoRA does).
  BaseFormat storage_format(const nn::Linear<T>& lin) const {
    if (base_format_ == BaseFormat::nf4 && &lin == &lm_head_) return BaseFormat::bf16;
    return base_format_;
  }
  // The token embedding's storage (a format other than fp32): bf16 for bf16 and NF4 (as QLoRA
  // keeps it), fp16 for fp16.
  BaseFormat embedding_format() const {
    return base_format_ == BaseFormat::fp16 ? BaseFormat::fp16 : BaseFormat::bf16;
  }

  // One checkpoint tensor as a FrozenWeight [rows, cols] = [out, in]: a BF16 or F16 tensor's
  // bits used as they are (no fp32 copy; FrozenWeight converts them where the format differs),
  // any other float dtype read as finite fp32; a tensor stored [in, out] (GPT-2's Conv1D)
  // transposed first.
  template <class File>
  static std::shared_ptr<const FrozenWeight> frozen_from_file(const File& file,
                                                              const std::string& name,
                                                              BaseFormat format, std::int64_t rows,
                                                              std::int64_t cols,
                                                              ops::WeightLayout layout) {
    const bool transpose = layout == ops::WeightLayout::InOut;
    const std::vector<std::int64_t> stored =
        transpose ? std::vector<std::int64_t>{cols, rows} : std::vector<std::int64_t>{rows, cols};
    const std::string what = io::printable(file.name()) + ": " + name;
    const io::Dtype dtype = file.info(name).dtype;
    if (dtype == io::Dtype::BF16 || dtype == io::Dtype::F16) {
      const std::span<const std::uint8_t> bytes = file.raw_bytes(name);
      std::vector<std::uint16_t> bits(static_cast<std::size_t>(rows * cols));
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < cols; ++c) {
          const std::int64_t from = transpose ? c * rows + r : r * cols + c;
          std::uint16_t b;
          std::memcpy(&b, bytes.data() + 2 * from, 2);
          bits[static_cast<std::size_t>(r * cols + c)] = b;
        }
      return std::make_shared<const FrozenWeight>(
          dtype == io::Dtype::BF16
              ? FrozenWeight::from_bf16(format, std::move(bits), rows, cols, what)
              : FrozenWeight::from_fp16(format, std::move(bits), rows, cols, what));
    }
    std::vector<float> values = file.template read_finite<float>(name, stored);
    if (transpose) values = transposed(values, cols, rows);
    return std::make_shared<const FrozenWeight>(
        FrozenWeight::from_values(format, values, rows, cols, what));
  }

  // [rows, cols] row-major → [cols, rows].
  static std::vector<float> transposed(const std::vector<float>& v, std::int64_t rows,
                                       std::int64_t cols) {
    std::vector<float> out(v.size());
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c)
        out[static_cast<std::size_t>(c * rows + r)] = v[static_cast<std::size_t>(r * cols + c)];
    return out;
  }

  static std::vector<nn::Linear<T>*> block_linears(Block& b) {
    if constexpr (Arch::fused_qkv && !Arch::gated_mlp)
      return {&b.qkv, &b.attention_out, &b.mlp_in, &b.mlp_out};
    else
      return {&b.q, &b.k, &b.v, &b.attention_out, &b.gate, &b.up, &b.down};
  }

  void build_modules() {
    const std::int64_t d = config_.hidden_size, V = config_.vocab_size;
    const std::int64_t kv = config_.kv_dim(), ff = config_.intermediate_size;
    const bool ab = config_.attention_bias, mb = config_.mlp_bias;
    constexpr ops::WeightLayout L = Arch::layout;
    const bool dense = base_format_ == BaseFormat::fp32;  // else weights come in their format
    if (dense) token_embedding_ = Var<T>(Tensor<T>(Shape{V, d}));
    if constexpr (Arch::learned_positions)
      position_embedding_ = Var<T>(Tensor<T>(Shape{config_.max_positions, d}));
    blocks_.resize(static_cast<std::size_t>(config_.num_layers));
    for (int i = 0; i < static_cast<int>(blocks_.size()); ++i) {
      Block& b = blocks_[static_cast<std::size_t>(i)];
      b.attention_norm = Norm(d, config_.norm_eps);
      b.mlp_norm = Norm(d, config_.norm_eps);
      if constexpr (Arch::fused_qkv) {
        b.qkv = nn::Linear<T>(Arch::qkv(i), d, d + 2 * kv, L, ab, dense);
      } else {
        b.q = nn::Linear<T>(Arch::q(i), d, config_.num_heads * config_.head_dim, L, ab, dense);
        b.k = nn::Linear<T>(Arch::k(i), d, kv, L, ab, dense);
        b.v = nn::Linear<T>(Arch::v(i), d, kv, L, ab, dense);
      }
      b.attention_out = nn::Linear<T>(Arch::attention_out(i), config_.num_heads * config_.head_dim,
                                      d, L, ab, dense);
      if constexpr (Arch::gated_mlp) {
        b.gate = nn::Linear<T>(Arch::gate(i), d, ff, L, mb, dense);
        b.up = nn::Linear<T>(Arch::up(i), d, ff, L, mb, dense);
        b.down = nn::Linear<T>(Arch::down(i), ff, d, L, mb, dense);
      } else {
        b.mlp_in = nn::Linear<T>(Arch::mlp_in(i), d, ff, L, mb, dense);
        b.mlp_out = nn::Linear<T>(Arch::mlp_out(i), ff, d, L, mb, dense);
      }
    }
    final_norm_ = Norm(d, config_.norm_eps);
    if (!config_.tie_word_embeddings)
      lm_head_ = nn::Linear<T>(Arch::lm_head(), d, V, ops::WeightLayout::OutIn, false, dense);
    int site = 0;
    for (Block& b : blocks_)
      for (nn::Linear<T>* lin : block_linears(b)) {
        lin->site = site++;
        lin->layer = static_cast<int>(&b - blocks_.data());
      }
    lm_head_.site = config_.tie_word_embeddings ? -1 : site;
  }

  // GPT-2 / LLaMA style: projections and embeddings normal(0, 0.02); biases stay 0 and norm
  // scales 1, as their constructors left them.
  void initialise_base_weights() {
    std::normal_distribution<double> normal(0.0, 0.02);
    auto fill = [&](Var<T>& var) {
      for (std::int64_t i = 0; i < var.value().numel(); ++i)
        var.value()[i] = static_cast<T>(normal(rng_));
    };
    if (base_format_ == BaseFormat::fp32) {
      fill(token_embedding_);
      if constexpr (Arch::learned_positions) fill(position_embedding_);
      for (nn::Linear<T>* lin : linear_modules()) fill(lin->weight);
      return;
    }
    // The same draws in the same order, in fp32 one tensor at a time, then stored in the format
    // (a weight stored [in, out] is drawn in that order and transposed).
    auto draw = [&](std::int64_t rows, std::int64_t cols, bool transpose) {
      std::vector<float> v(static_cast<std::size_t>(rows * cols));
      for (float& x : v) x = static_cast<float>(static_cast<T>(normal(rng_)));
      return transpose ? transposed(v, cols, rows) : v;
    };
    const std::int64_t V = config_.vocab_size, d = config_.hidden_size;
    frozen_embedding_ = std::make_shared<const FrozenWeight>(FrozenWeight::from_values(
        embedding_format(), draw(V, d, false), V, d, Arch::token_embedding() + ".weight"));
    if constexpr (Arch::learned_positions) fill(position_embedding_);
    for (nn::Linear<T>* lin : linear_modules()) {
      const bool transpose = lin->layout == ops::WeightLayout::InOut;
      lin->store_frozen(std::make_shared<const FrozenWeight>(FrozenWeight::from_values(
          storage_format(*lin), draw(lin->out_features, lin->in_features, transpose),
          lin->out_features, lin->in_features, lin->name + ".weight")));
    }
  }

  void attach_adapter() {
    AttachContext<T> ctx{config_, linear_modules(), rng_, base_parameters()};
    adapter().attach(ctx);
  }

  struct NamedAdapter {
    NamedAdapter(std::string n, const typename Policy::Config& c) : name(std::move(n)), state(c) {}
    std::string name;
    Adapter state;
    bool merged = false;
  };

  std::size_t find_adapter(std::string_view name) const {
    for (std::size_t i = 0; i < adapters_.size(); ++i)
      if (adapters_[i]->name == name) return i;
    return adapters_.size();
  }
  std::string adapter_list() const {
    std::string list;
    for (const auto& a : adapters_) list += (list.empty() ? "'" : ", '") + a->name + "'";
    return list;
  }
  std::size_t adapter_index(std::string_view name) const {
    const std::size_t i = find_adapter(name);
    if (i == adapters_.size())
      throw ConfigError("no adapter named '" + std::string(name) + "' (the model has " +
                        adapter_list() + ")");
    return i;
  }
  void check_new_adapter_name(const std::string& name) const {
    const bool printable = std::all_of(name.begin(), name.end(), [](char c) {
      return static_cast<unsigned char>(c) >= 0x20 && c != 0x7f;
    });
    if (name.empty() || name.size() > 128 || !printable || name == "." || name == ".." ||
        name.find_first_of("/\\") != std::string::npos || name == kBaseAdapterName)
      throw ConfigError("add_adapter: adapter name '" + name +
                        "' is not usable (expected 1 to 128 printable characters, no '/' or "
                        "'\\', not '.', '..' or '" +
                        std::string(kBaseAdapterName) + "')");
    if (has_adapter(name))
      throw ConfigError("add_adapter: the model already has an adapter named '" + name + "'");
  }

  /// The adapter the hooks of a forward call: the active one, or none while disabled or for a
  /// mixed batch (whose projections are grouped; its other hooks are refused up front).
  Adapter* hooked() { return adapters_disabled_ || !row_groups_.empty() ? nullptr : &adapter(); }

  /// Resolves a batch's adapter_names into groups of rows (row_groups_), for the forward that
  /// follows; clears them after (the returned guard).
  struct RowGroupsGuard {
    Decoder* model;
    ~RowGroupsGuard() {
      if (model) model->row_groups_.clear();
    }
  };
  [[nodiscard]] RowGroupsGuard resolve_row_groups(const Batch& batch) {
    if (batch.adapter_names.empty()) return {nullptr};
    constexpr bool projections_only =
        !HasVirtualTokens<Adapter, T> && !HasPrefix<Adapter, T> && !HasTokenEmbedding<Adapter, T> &&
        !HasAttentionHook<Adapter, T> && !HasBeforeAttention<Adapter, T> &&
        !HasAfterAttention<Adapter, T> && !HasAfterMlp<Adapter, T> && !HasAfterBlock<Adapter, T> &&
        !HasExtraLoss<Adapter, T> && !HasPrePass<Adapter, T>;
    if (!projections_only)
      throw ConfigError(std::string("batch: adapter_names: mixed-adapter batches need a method "
                                    "that only adapts projections (LoRA and its family, IA3, "
                                    "SSF, ...); ") +
                        std::string(method_title<Policy>()) +
                        " also changes the sequence or the blocks");
    for (const auto& a : adapters_)
      if (a->merged)
        throw ConfigError("batch: adapter_names: adapter '" + a->name +
                          "' is merged into the base weights; unmerge() it for mixed batches");
    std::vector<RowGroup<Adapter>> groups;
    std::vector<std::string> names;
    for (std::int64_t r = 0; r < batch.batch; ++r) {
      const std::string& name = batch.adapter_names[static_cast<std::size_t>(r)];
      Adapter* state = name == kBaseAdapterName || adapters_disabled_
                           ? nullptr
                           : &adapters_[adapter_index(name)]->state;
      auto it = std::find(names.begin(), names.end(), state ? name : std::string(kBaseAdapterName));
      if (it == names.end()) {
        names.push_back(state ? name : std::string(kBaseAdapterName));
        groups.push_back({state, {}});
        it = names.end() - 1;
      }
      groups[static_cast<std::size_t>(it - names.begin())].rows.push_back(r);
    }
    row_groups_ = std::move(groups);
    return {this};
  }

  // The one product path of a projection site: the methods contribute, Projection computes.
  Var<T> project(Tape<T>& tape, const nn::Linear<T>& lin, const Var<T>& x) {
    if constexpr (HasProjectionHook<Adapter, T>) {
      std::mt19937_64* dropout = training_ ? &dropout_rng_ : nullptr;
      if (!row_groups_.empty())
        return grouped_projection(tape, lin, x, row_groups_, dropout,
                                  [](Adapter& a, Projection<T>& p) { a.adapt(p); });
      if (adapters_disabled_) return lin.forward_base(tape, x);
      Projection<T> p(tape, lin, x, dropout);
      adapter().adapt(p);
      return p.compute();
    } else {
      return lin.forward_base(tape, x);
    }
  }

  /// The after_block hook (policy.hpp, section 3), where the adapter has one.
  Var<T> after_block(Tape<T>& tape, int layer, const Var<T>& h, const TokenSpans& spans) {
    if constexpr (HasAfterBlock<Adapter, T>)
      if (Adapter* ad = hooked()) return ad->after_block(tape, layer, h, spans);
    return h;
  }
  std::int64_t virtual_token_count() {
    if constexpr (HasVirtualTokens<Adapter, T>)
      if (Adapter* a = hooked()) return a->num_virtual_tokens();
    return 0;
  }
  /// Where each row's tokens sit in the blocks' sequence: after `virtual_tokens`, from the
  /// attention mask's first 1 to its last (all of the row without a mask); `past` tokens before.
  TokenSpans token_spans(const Batch& batch, std::int64_t virtual_tokens, std::int64_t past) {
    TokenSpans s;
    if constexpr (!HasAfterBlock<Adapter, T>) return s;
    for (std::int64_t b = 0; b < batch.batch; ++b) {
      std::int64_t first = batch.seq, last = -1;
      for (std::int64_t t = 0; t < batch.seq; ++t)
        if (batch.attention_mask.empty() ||
            batch.attention_mask[static_cast<std::size_t>(b * batch.seq + t)] != 0) {
          first = std::min(first, t);
          last = t;
        }
      s.begin.push_back(virtual_tokens + (last < 0 ? 0 : first));
      s.end.push_back(virtual_tokens + last + 1);
    }
    s.past = past;
    s.dropout = training_ ? &dropout_rng_ : nullptr;
    return s;
  }

  // [B, prefix + Tn] key visibility: prefix and virtual tokens always visible, then the mask.
  std::vector<std::uint8_t> key_visibility(const Batch& batch, std::int64_t prefix,
                                           std::int64_t virtual_tokens) const {
    if (batch.attention_mask.empty()) return {};
    const std::int64_t S = prefix + virtual_tokens + batch.seq;
    std::vector<std::uint8_t> visible(static_cast<std::size_t>(batch.batch * S), 1);
    for (std::int64_t b = 0; b < batch.batch; ++b)
      for (std::int64_t t = 0; t < batch.seq; ++t)
        visible[static_cast<std::size_t>(b * S + prefix + virtual_tokens + t)] =
            batch.attention_mask[static_cast<std::size_t>(b * batch.seq + t)] != 0;
    return visible;
  }

  // The block run without keeping its activations; one closure runs it again on an inner tape
  // in backward and back-propagates through that. Gradients reach x and the trainable tensors
  // directly, since the re-run reads the same Vars.
  /// h [B, Tn, d] plus the learned positions first .. first + Tn − 1 (GPT-2), broadcast over
  /// the batch; a ShapeError past max_positions. Rotary architectures: h unchanged.
  Var<T> add_positions(Tape<T>& tape, const Var<T>& h, std::int64_t first, std::int64_t Tn) {
    if constexpr (!Arch::learned_positions) {
      return h;
    } else {
      if (first + Tn > config_.max_positions)
        throw ShapeError("sequence of " + std::to_string(first + Tn) + " positions exceeds " +
                         std::to_string(config_.max_positions));
      std::vector<std::int64_t> positions(static_cast<std::size_t>(Tn));
      for (std::int64_t t = 0; t < Tn; ++t) positions[static_cast<std::size_t>(t)] = first + t;
      Var<T> pos = ops::embedding(tape, position_embedding_, positions);
      return ops::add(tape, h, ops::reshape(tape, pos, Shape{1, Tn, config_.hidden_size}));
    }
  }

  /// Causal attention whose first query sits at key position `query_offset`.
  ops::AttentionSpec attention_spec(std::int64_t query_offset) const {
    ops::AttentionSpec spec;
    spec.heads = config_.num_heads;
    spec.kv_heads = config_.num_kv_heads;
    spec.head_dim = config_.head_dim;
    spec.causal = true;
    spec.query_offset = query_offset;
    return spec;
  }

  /// The token table a forward looks up and, tied, projects with: the base's, or the active
  /// method's derived from it (HasTokenEmbedding: trainable tokens), once per forward.
  Var<T> token_table([[maybe_unused]] Tape<T>& tape) {
    if constexpr (HasTokenEmbedding<Adapter, T>)
      if (Adapter* a = hooked()) {
        if (frozen_embedding_)
          throw ConfigError(std::string(method_title<Policy>()) +
                            " changes the token embedding, which needs base format fp32; this "
                            "model holds it in " +
                            std::string(base_format_name(base_format_)));
        return a->token_embedding(tape, token_embedding_);
      }
    return token_embedding_;
  }

  /// The layer's queries and own projections, for adapt_attention (HasAttentionHook).
  AttentionSite<T> attention_site(Tape<T>& tape, Block& b, int layer, const Var<T>& q) {
    AttentionSite<T> site{layer, q, {}, {}};
    site.key_values = [this, &tape, &b](const Var<T>& x) -> std::pair<Var<T>, Var<T>> {
      if constexpr (Arch::fused_qkv) {
        const std::int64_t d = config_.num_heads * config_.head_dim, kv = config_.kv_dim();
        std::vector<Var<T>> parts = ops::split(tape, project(tape, b.qkv, x), {d, kv, kv}, 2);
        return {parts[1], parts[2]};
      } else {
        return {project(tape, b.k, x), project(tape, b.v, x)};
      }
    };
    site.output = [this, &tape, &b](const Var<T>& x) { return project(tape, b.attention_out, x); };
    return site;
  }

  /// The output head: the tied embedding (frozen or not) or lm_head.
  Var<T> head_logits(Tape<T>& tape, const Var<T>& h, const Var<T>& table) {
    if (config_.tie_word_embeddings && frozen_embedding_)
      return ops::frozen_linear(tape, h, frozen_embedding_, Var<T>{});
    if (config_.tie_word_embeddings)
      return ops::linear(tape, h, table, Var<T>{}, ops::WeightLayout::OutIn);
    return project(tape, lm_head_, h);
  }

  Var<T> checkpointed_block_forward(Tape<T>& tape, Block& b, int layer, const Var<T>& x,
                                    const ops::AttentionSpec& spec, std::int64_t prefix,
                                    std::int64_t batch) {
    Var<T> out;
    {
      // Recording on a throwaway tape tells whether the output needs a gradient; its
      // activations are released at the end of this scope.
      Tape<T> probe;
      out = block_forward(probe, b, layer, x, spec, prefix, batch);
    }
    if (!out.requires_grad()) return out;
    Var<T> result(std::move(out.value()), true);
    // The re-run must see the adapters this forward saw, whatever the caller changed since
    // (the active adapter, DisableAdapterScope, a mixed batch's row groups).
    tape.record([this, &b, layer, x, result, spec, prefix, batch, seen = hook_selection()]() {
      struct Restore {
        Decoder* model;
        HookSelection saved;
        ~Restore() { model->set_hook_selection(std::move(saved)); }
      } restore{this, hook_selection()};
      set_hook_selection(seen);
      Tape<T> inner;
      Var<T> again = block_forward(inner, b, layer, x, spec, prefix, batch);
      inner.backward(again, std::as_const(result.grad()));
    });
    return result;
  }

  /// One layer of a forward_cached step: the keys and values of the positions before it, which
  /// the step extends (null: an ordinary forward).
  struct CacheStep {
    KvCache* cache = nullptr;
    std::int64_t rope_offset = 0;  ///< position of the step's first token (prefix + past)
  };

  Var<T> block_forward(Tape<T>& tape, Block& b, int layer, const Var<T>& x,
                       const ops::AttentionSpec& spec, std::int64_t prefix, std::int64_t batch,
                       CacheStep step = {}) {
    Var<T> a = b.attention_norm.forward(tape, x);
    if constexpr (HasBeforeAttention<Adapter, T>)
      if (Adapter* ad = hooked()) ad->before_attention(tape, layer, a);
    Var<T> q, k, v;
    if constexpr (Arch::fused_qkv) {
      Var<T> qkv = project(tape, b.qkv, a);
      const std::int64_t d = config_.num_heads * config_.head_dim, kv = config_.kv_dim();
      std::vector<Var<T>> parts = ops::split(tape, qkv, {d, kv, kv}, 2);
      q = parts[0];
      k = parts[1];
      v = parts[2];
    } else {
      q = project(tape, b.q, a);
      k = project(tape, b.k, a);
      v = project(tape, b.v, a);
    }
    const std::int64_t rope_offset = step.cache ? step.rope_offset : prefix;
    if constexpr (!Arch::learned_positions) {
      q = ops::rope(tape, q, rope_frequencies_, rope_offset);
      k = ops::rope(tape, k, rope_frequencies_, rope_offset);
    }
    const auto cached = static_cast<std::size_t>(layer);
    const bool has_past = step.cache && step.cache->keys.size() > cached;
    if constexpr (HasPrefix<Adapter, T>) {
      // The prefix is computed once, with the first step, and then read from the cache.
      if (prefix > 0 && !has_past) {
        auto [pk, pv] = hooked()->prefix_key_values(tape, layer, batch);
        k = ops::concat(tape, {pk, k}, 1);
        v = ops::concat(tape, {pv, v}, 1);
      }
    }
    if (step.cache) {
      KvCache& c = *step.cache;
      if (has_past) {
        k = ops::concat(tape, {Var<T>(c.keys[cached]), k}, 1);
        v = ops::concat(tape, {Var<T>(c.values[cached]), v}, 1);
        c.keys[cached] = k.value();
        c.values[cached] = v.value();
      } else {
        c.keys.push_back(k.value());
        c.values.push_back(v.value());
      }
    }
    Var<T> attn = ops::attention(tape, q, k, v, spec);
    Var<T> o = project(tape, b.attention_out, attn);
    if constexpr (HasAttentionHook<Adapter, T>)
      if (Adapter* ad = hooked())
        o = ad->adapt_attention(tape, attention_site(tape, b, layer, q), o);
    if constexpr (HasAfterAttention<Adapter, T>)
      if (Adapter* ad = hooked()) o = ad->after_attention(tape, layer, o);
    Var<T> h = ops::add(tape, x, o);
    Var<T> m = b.mlp_norm.forward(tape, h);
    Var<T> mlp;
    if constexpr (Arch::gated_mlp) {
      Var<T> gated =
          ops::mul(tape, ops::silu(tape, project(tape, b.gate, m)), project(tape, b.up, m));
      mlp = project(tape, b.down, gated);
    } else {
      mlp = project(tape, b.mlp_out, ops::gelu_tanh(tape, project(tape, b.mlp_in, m)));
    }
    if constexpr (HasAfterMlp<Adapter, T>)
      if (Adapter* ad = hooked()) mlp = ad->after_mlp(tape, layer, m, mlp);
    return ops::add(tape, h, mlp);
  }

  ModelConfig config_;
  std::vector<float> rope_frequencies_ = rope_inverse_frequencies(config_);  // LLaMA
  std::vector<std::unique_ptr<NamedAdapter>> adapters_;  ///< by name; stable addresses
  std::size_t active_ = 0;
  bool adapters_disabled_ = false;
  bool in_pre_pass_ = false;  ///< inside a HasPrePass adapter's pre-pass (its forward)
  std::vector<RowGroup<Adapter>> row_groups_;  ///< a mixed batch's rows, during its forward

  // What the hooks see, as one value (a checkpointed block's re-run restores it).
  struct HookSelection {
    std::size_t active = 0;
    bool disabled = false;
    std::vector<RowGroup<Adapter>> groups;
  };
  HookSelection hook_selection() const { return {active_, adapters_disabled_, row_groups_}; }
  void set_hook_selection(HookSelection s) {
    active_ = s.active;
    adapters_disabled_ = s.disabled;
    row_groups_ = std::move(s.groups);
  }
  std::mt19937_64 rng_;
  bool training_ = false;
  std::mt19937_64 dropout_rng_;  ///< the adapters' dropout masks (training mode only)
  BaseFormat base_format_ = BaseFormat::fp32;
  Var<T> token_embedding_, position_embedding_;  // token_embedding_ undefined: frozen_embedding_
  std::shared_ptr<const FrozenWeight> frozen_embedding_;  // bf16, for a base format not fp32
  std::vector<Block> blocks_;
  Norm final_norm_;
  nn::Linear<T> lm_head_;
  bool checkpoint_blocks_ = false;
};

}  // namespace peft
