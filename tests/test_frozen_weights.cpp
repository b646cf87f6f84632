// Frozen base weights in bf16, fp16 and NF4 (core/frozen_weight.hpp, core/ops/frozen_linear.hpp)
// and the Decoder built or loaded in them: the ops' gradients in double, the float kernels against
// the exact double products, a bf16 model equal to the fp32 model with its weights rounded, a
// QLoRA-style training step on NF4, loading with conversion, and the clear errors for what a
// bf16/NF4 base cannot do (dense-weight methods, merging, full fine-tuning, saving).
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>
#include <peft/io/model_file.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/methods/reparameterized/dora.hpp>
#include <peft/methods/reparameterized/lora.hpp>
#include <peft/methods/reparameterized/vera.hpp>
#include <peft/nn/decoder.hpp>
#include <peft/nn/summary.hpp>
#include <peft/testing/gradcheck.hpp>
#include <peft/train/optimizer.hpp>
#include <random>
#include <string>
#include <vector>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_frozen_weights {

namespace {

using peft::BaseFormat;
using peft::FrozenWeight;
using peft::Tensor;
using peft::Var;

std::vector<float> random_floats(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

std::shared_ptr<const FrozenWeight> frozen(BaseFormat format, std::int64_t out, std::int64_t in,
                                           std::uint64_t seed) {
  return std::make_shared<const FrozenWeight>(FrozenWeight::from_values(
      format, random_floats(static_cast<std::size_t>(out * in), seed), out, in, "w"));
}

peft::ModelConfig tiny(const std::string& type) {
  peft::ModelConfig c = type == "gpt2" ? peft::ModelConfig::gpt2() : peft::ModelConfig::llama();
  c.vocab_size = 96;
  c.hidden_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = type == "gpt2" ? 4 : 2;
  c.head_dim = 8;
  c.intermediate_size = 64;
  c.max_positions = 16;
  c.tie_word_embeddings = type == "gpt2";
  return c;
}

peft::Batch tiny_batch(std::int64_t vocab) {
  peft::Batch b;
  b.batch = 2;
  b.seq = 6;
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::int64_t> token(0, vocab - 1);
  for (int i = 0; i < 12; ++i) b.input_ids.push_back(token(rng));
  return b;
}

peft::LoraConfig lora_all_linear() {
  peft::LoraConfig c;
  c.r = 4;
  c.lora_alpha = 8;
  c.targets.target_modules.all_linear = true;
  return c;
}

double max_abs_diff(const Tensor<double>& a, const Tensor<double>& b) {
  REQUIRE(a.numel() == b.numel());
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace

TEST_CASE("frozen_linear: gradients of x and the bias in double, for bf16, fp16 and NF4 weights") {
  for (const BaseFormat format : {BaseFormat::bf16, BaseFormat::fp16, BaseFormat::nf4}) {
    CAPTURE(peft::base_format_name(format));
    const auto w = frozen(format, 5, 70, 11);  // 70: more than one NF4 block, a partial one
    const peft::testing::DoubleFunction f = [&](peft::Tape<double>& tape,
                                                std::vector<Var<double>>& in) {
      return peft::ops::frozen_linear(tape, in[0], w, in[1]);
    };
    const auto result = peft::testing::check_gradients(
        f, {Var<double>(peft::testing::random_tensor({2, 3, 70}, 1), true),
            Var<double>(peft::testing::random_tensor({5}, 2), true)});
    CHECK_MESSAGE(result.ok, result.message);
  }
}

TEST_CASE("frozen_lora_linear: gradients in double, and the value of the unfused sum") {
  for (const BaseFormat format : {BaseFormat::bf16, BaseFormat::fp16, BaseFormat::nf4}) {
    CAPTURE(peft::base_format_name(format));
    const auto w = frozen(format, 6, 70, 12);
    const double s = 1.75;
    const peft::testing::DoubleFunction f = [&](peft::Tape<double>& tape,
                                                std::vector<Var<double>>& in) {
      return peft::ops::frozen_lora_linear(tape, in[0], w, in[1], in[2], in[3], s);
    };
    const std::vector<Var<double>> inputs = {
        Var<double>(peft::testing::random_tensor({2, 3, 70}, 1), true),
        Var<double>(peft::testing::random_tensor({6}, 2), true),
        Var<double>(peft::testing::random_tensor({3, 70}, 3), true),
        Var<double>(peft::testing::random_tensor({6, 3}, 4), true)};
    const auto result = peft::testing::check_gradients(f, inputs);
    CHECK_MESSAGE(result.ok, result.message);
    peft::Tape<double> tape(false);
    const Var<double> fused = f(tape, const_cast<std::vector<Var<double>>&>(inputs));
    const Var<double> h = peft::ops::linear(tape, inputs[0], inputs[2], Var<double>{},
                                            peft::ops::WeightLayout::OutIn);
    const Var<double> unfused = peft::ops::add(
        tape, peft::ops::frozen_linear(tape, inputs[0], w, inputs[1]),
        peft::ops::scale(
            tape,
            peft::ops::linear(tape, h, inputs[3], Var<double>{}, peft::ops::WeightLayout::OutIn),
            s));
    CHECK(max_abs_diff(fused.value(), unfused.value()) < 1e-12);
  }
}

TEST_CASE("frozen_linear_cross_entropy: the gradient of x in double, and the loss of the parts") {
  const auto w = frozen(BaseFormat::bf16, 9, 6, 3);
  const std::vector<std::int64_t> targets = {1, -100, 8, 0};
  const peft::testing::DoubleFunction f = [&](peft::Tape<double>& tape,
                                              std::vector<Var<double>>& in) {
    return peft::ops::frozen_linear_cross_entropy(tape, in[0], w, targets).loss;
  };
  const Var<double> x(peft::testing::random_tensor({4, 6}, 5), true);
  const auto result = peft::testing::check_gradients(f, {x});
  CHECK_MESSAGE(result.ok, result.message);
  peft::Tape<double> tape(false);
  const Var<double> unfused =
      peft::ops::cross_entropy(tape, peft::ops::frozen_linear(tape, x, w, Var<double>{}), targets);
  CHECK(peft::ops::frozen_linear_cross_entropy(tape, x, w, targets).loss.value()[0] ==
        doctest::Approx(unfused.value()[0]).epsilon(1e-14));
}

TEST_CASE("FrozenWeight: the float products match the exact double products of their operands") {
  for (const BaseFormat format : {BaseFormat::bf16, BaseFormat::fp16, BaseFormat::nf4}) {
    CAPTURE(peft::base_format_name(format));
    const std::int64_t n = 7, out = 40, in = 130;
    const auto w = frozen(format, out, in, 21);
    const std::vector<float> x = random_floats(static_cast<std::size_t>(n * in), 22);
    std::vector<float> y(static_cast<std::size_t>(n * out));
    w->forward(x.data(), in, n, y.data(), out, false);
    // bf16: the float path rounds x to bf16 first (as autocast does); fp16 and NF4 keep x fp32.
    std::vector<double> xd(x.size()), yd(y.size());
    for (std::size_t i = 0; i < x.size(); ++i)
      xd[i] = format == BaseFormat::bf16 ? peft::ops::bf16::to_float(peft::ops::bf16::round(x[i]))
                                         : x[i];
    w->forward(xd.data(), in, n, yd.data(), out, false);
    std::vector<double> wd(static_cast<std::size_t>(out * in));
    w->rows_as(0, out, wd.data());
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t o = 0; o < out; ++o) {
        double magnitude = 0;
        for (std::int64_t i = 0; i < in; ++i)
          magnitude += std::abs(xd[static_cast<std::size_t>(r * in + i)] *
                                wd[static_cast<std::size_t>(o * in + i)]);
        // fp32 accumulation of `in` exact (bf16) or once-rounded (fp16, NF4) products.
        const double bound = 2.0 * double(in + 2) * std::ldexp(1.0, -24) * magnitude + 1e-30;
        const std::size_t k = static_cast<std::size_t>(r * out + o);
        CHECK(std::abs(double(y[k]) - yd[k]) <= bound);
      }
  }
}

TEST_CASE("Decoder in bf16 / fp16: the fp32 model of the same seed with its weights rounded") {
  for (const BaseFormat format : {BaseFormat::bf16, BaseFormat::fp16}) {
    CAPTURE(peft::base_format_name(format));
    using Model = peft::Decoder<peft::arch::Gpt2, peft::LoRA, double>;
    Model rounded(tiny("gpt2"), lora_all_linear(), 3);
    const auto round = [format](double v) {
      const float f = static_cast<float>(v);
      return format == BaseFormat::bf16
                 ? double(peft::ops::bf16::to_float(peft::ops::bf16::round(f)))
                 : double(peft::float16::f16_bits_to_float(peft::float16::f16_bits_from(f)));
    };
    for (peft::NamedParameter<double>& p : rounded.base_parameters()) {
      const bool weight =
          p.name.find("wte") != std::string::npos ||
          (p.name.find(".weight") != std::string::npos && p.name.find("ln_") == std::string::npos &&
           p.name.find("wpe") == std::string::npos);
      if (!weight) continue;
      for (std::int64_t i = 0; i < p.var.value().numel(); ++i)
        p.var.value()[i] = round(p.var.value()[i]);
    }
    Model half(tiny("gpt2"), lora_all_linear(), 3, format);
    CHECK(half.base_format() == format);
    const peft::Batch batch = tiny_batch(96);
    CHECK(max_abs_diff(half.logits(batch), rounded.logits(batch)) < 1e-12);
    // Same trainable tensors, same parameter counts; frozen weights a quarter of the bytes (two
    // bytes against a double's eight), the norms and position embedding dense.
    CHECK(peft::parameter_summary(half).all == peft::parameter_summary(rounded).all);
    CHECK(peft::parameter_summary(half).trainable == peft::parameter_summary(rounded).trainable);
    CHECK(half.base_weight_bytes() < rounded.base_weight_bytes() / 3);
  }
}

TEST_CASE("FrozenWeight from fp16 bits: kept as stored, converted on demand, range errors") {
  using peft::float16::f16_bits_from;
  using peft::float16::f16_bits_to_float;
  const std::vector<float> values = {1.0f, -2.5f, 65504.0f, 6.0e-8f, 0.1f, -0.0f};
  std::vector<std::uint16_t> bits;
  for (const float v : values) bits.push_back(f16_bits_from(v));
  const FrozenWeight kept = FrozenWeight::from_fp16(BaseFormat::fp16, bits, 2, 3, "w16");
  CHECK(std::vector<std::uint16_t>(kept.half_bits().begin(), kept.half_bits().end()) == bits);
  CHECK(kept.bytes() == 12);
  std::vector<float> widened(6);
  kept.rows_as(0, 2, widened.data());
  for (std::size_t i = 0; i < 6; ++i) CHECK(widened[i] == f16_bits_to_float(bits[i]));
  // To bf16: each fp16 value (exact in fp32) rounded once.
  const FrozenWeight to_bf16 = FrozenWeight::from_fp16(BaseFormat::bf16, bits, 2, 3, "w16");
  for (std::size_t i = 0; i < 6; ++i)
    CHECK(to_bf16.half_bits()[i] == peft::ops::bf16::round(f16_bits_to_float(bits[i])));
  // From fp32: rounded to nearest even; beyond fp16's range or not finite: an error naming it.
  const FrozenWeight from_floats = FrozenWeight::from_values(BaseFormat::fp16, values, 2, 3, "w");
  CHECK(std::vector<std::uint16_t>(from_floats.half_bits().begin(),
                                   from_floats.half_bits().end()) == bits);
  const std::vector<float> too_big = {1.0f, 70000.0f};
  CHECK_THROWS_WITH_AS(FrozenWeight::from_values(BaseFormat::fp16, too_big, 1, 2, "big"),
                       doctest::Contains("fp16 weight 'big': element 1 = 70000.000000 is outside "
                                         "fp16's range (|x| <= 65504)"),
                       peft::ConfigError);
  std::vector<std::uint16_t> with_inf = bits;
  with_inf[4] = 0x7C00;
  CHECK_THROWS_WITH_AS(FrozenWeight::from_fp16(BaseFormat::fp16, with_inf, 2, 3, "inf"),
                       "fp16 weight 'inf': element 4 is not finite", peft::ConfigError);
  const std::vector<std::uint16_t> bf16_big = {peft::ops::bf16::round(1.0e6f)};
  CHECK_THROWS_AS(FrozenWeight::from_bf16(BaseFormat::fp16, bf16_big, 1, 1, "b"),
                  peft::ConfigError);
}

TEST_CASE("Decoder in NF4 (float): a LoRA training step lowers the loss; only LoRA trains") {
  using Model = peft::Decoder<peft::arch::Llama, peft::LoRA, float>;
  Model model(tiny("llama"), lora_all_linear(), 5, BaseFormat::nf4);
  for (peft::nn::Linear<float>* lin : model.linear_modules())
    CHECK(lin->format() == (lin->name == "lm_head" ? BaseFormat::bf16 : BaseFormat::nf4));
  for (const peft::NamedParameter<float>& p : model.trainable_parameters())
    CHECK(p.name.find("lora_") != std::string::npos);
  peft::AdamW<float> optimizer(model.trainable_parameters(), peft::AdamWOptions{.lr = 1e-2});
  const peft::Batch batch = tiny_batch(96);
  std::vector<float> losses;
  for (int step = 0; step < 4; ++step) {
    peft::Tape<float> tape;
    peft::ForwardResult<float> r = model.forward(tape, batch);
    losses.push_back(r.loss.value()[0]);
    tape.backward(r.loss);
    optimizer.step();
    optimizer.zero_grad();
  }
  CHECK(std::isfinite(losses.back()));
  CHECK(losses.back() < losses.front());
}

TEST_CASE("Decoder::load converts as it reads: bf16, fp16 and NF4 equal the model built in them") {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("peft_frozen_load_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  for (const std::string type : {"gpt2", "llama"}) {
    CAPTURE(type);
    const peft::Batch batch = tiny_batch(96);
    const auto check_format = [&]<class Arch>(BaseFormat format) {
      using Model = peft::Decoder<Arch, peft::LoRA, float>;
      Model dense(tiny(type), lora_all_linear(), 9);
      peft::io::save_model(dense, dir);
      Model loaded = Model::load(dir, lora_all_linear(), 9, format);
      Model built(tiny(type), lora_all_linear(), 9, format);
      const Tensor<float> a = loaded.logits(batch), b = built.logits(batch);
      REQUIRE(a.numel() == b.numel());
      for (std::int64_t i = 0; i < a.numel(); ++i) REQUIRE(a[i] == b[i]);
      std::filesystem::remove_all(dir);
    };
    for (const BaseFormat format : {BaseFormat::bf16, BaseFormat::fp16, BaseFormat::nf4}) {
      if (type == "gpt2")
        check_format.template operator()<peft::arch::Gpt2>(format);
      else
        check_format.template operator()<peft::arch::Llama>(format);
    }
  }
}

TEST_CASE("an F16 checkpoint loaded as fp16 keeps its bytes; its logits are the fp32 model's") {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("peft_frozen_f16_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  using Model = peft::Decoder<peft::arch::Llama, peft::LoRA, float>;
  Model dense(tiny("llama"), lora_all_linear(), 4);
  peft::io::save_model(dense, dir, peft::io::Dtype::F16);
  Model half = Model::load(dir, lora_all_linear(), 4, BaseFormat::fp16);
  Model wide = Model::load(dir, lora_all_linear(), 4);  // the same F16 values, widened to fp32
  const auto file = peft::io::SafetensorsFile::open(dir / "model.safetensors");
  for (peft::nn::Linear<float>* lin : half.linear_modules()) {
    CAPTURE(lin->name);
    REQUIRE(lin->format() == BaseFormat::fp16);
    const std::span<const std::uint8_t> bytes = file.raw_bytes(lin->name + ".weight");
    const std::span<const std::uint16_t> bits = lin->frozen->half_bits();
    REQUIRE(bytes.size() == 2 * bits.size());
    CHECK(std::memcmp(bytes.data(), bits.data(), bytes.size()) == 0);
  }
  const peft::Batch batch = tiny_batch(96);
  const Tensor<float> a = half.logits(batch), b = wide.logits(batch);
  REQUIRE(a.numel() == b.numel());
  for (std::int64_t i = 0; i < a.numel(); ++i) CHECK(a[i] == doctest::Approx(b[i]).epsilon(1e-4));
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "DoRA on a bf16 / fp16 base: the dense DoRA model of the same weights, values and grads") {
  for (const BaseFormat format : {BaseFormat::bf16, BaseFormat::fp16}) {
    CAPTURE(peft::base_format_name(format));
    using Model = peft::Decoder<peft::arch::Gpt2, peft::DoRA, double>;
    peft::DoraConfig dora;
    dora.r = 4;
    dora.lora_alpha = 8;
    dora.targets.target_modules.all_linear = true;
    Model half(tiny("gpt2"), dora, 3, format);
    Model dense(tiny("gpt2"), dora, 3);
    // The dense model's base weights rounded as the half model stores them.
    for (peft::NamedParameter<double>& p : dense.base_parameters()) {
      const bool weight =
          p.name.find("wte") != std::string::npos ||
          (p.name.find(".weight") != std::string::npos && p.name.find("ln_") == std::string::npos &&
           p.name.find("wpe") == std::string::npos);
      if (!weight) continue;
      for (std::int64_t i = 0; i < p.var.value().numel(); ++i) {
        const float f = static_cast<float>(p.var.value()[i]);
        p.var.value()[i] =
            format == BaseFormat::bf16
                ? double(peft::ops::bf16::to_float(peft::ops::bf16::round(f)))
                : double(peft::float16::f16_bits_to_float(peft::float16::f16_bits_from(f)));
      }
    }
    dense.base_weights_changed();
    // A non-trivial adapter (B != 0, m != ‖W‖), the same in both.
    std::vector<peft::NamedParameter<double>> ph = half.trainable_parameters(),
                                              pd = dense.trainable_parameters();
    REQUIRE(ph.size() == pd.size());
    for (std::size_t k = 0; k < ph.size(); ++k) {
      REQUIRE(ph[k].name == pd[k].name);
      const Tensor<double> r = peft::testing::random_tensor(ph[k].var.shape(), 40 + k);
      for (std::int64_t i = 0; i < r.numel(); ++i) {
        const double v = ph[k].name.find("magnitude") != std::string::npos
                             ? ph[k].var.value()[i] * (1.0 + 0.1 * r[i])
                             : 0.3 * r[i];
        ph[k].var.value()[i] = v;
        pd[k].var.value()[i] = v;
      }
    }
    const peft::Batch batch = tiny_batch(96);
    peft::Tape<double> th, td;
    peft::ForwardResult<double> rh = half.forward(th, batch), rd = dense.forward(td, batch);
    CHECK(max_abs_diff(rh.logits.value(), rd.logits.value()) < 1e-12);
    th.backward(rh.loss);
    td.backward(rd.loss);
    for (std::size_t k = 0; k < ph.size(); ++k) {
      CAPTURE(ph[k].name);
      CHECK(max_abs_diff(ph[k].var.grad(), pd[k].var.grad()) < 1e-12);
    }
  }
}

TEST_CASE("a bf16/NF4 base refuses what needs dense weights, with the module and the format") {
  using Model = peft::Decoder<peft::arch::Llama, peft::LoRA, float>;
  Model model(tiny("llama"), lora_all_linear(), 1, BaseFormat::nf4);
  CHECK_THROWS_WITH_AS(model.merge(),
                       doctest::Contains("cannot merge into a base weight held in nf4"),
                       peft::ConfigError);
  CHECK_THROWS_WITH_AS(model.set_base_trainable(true), doctest::Contains("needs base format fp32"),
                       peft::ConfigError);
  CHECK_THROWS_WITH_AS(peft::io::save_model(model, "/tmp/peft_never_written"),
                       doctest::Contains("saving a base held in nf4"), peft::ConfigError);
  CHECK_FALSE(std::filesystem::exists("/tmp/peft_never_written"));
  peft::VeraConfig vera;
  vera.targets.target_modules.names = {"q_proj"};
  peft::Decoder<peft::arch::Llama, peft::VeRA, float> vera_model(tiny("llama"), vera, 1,
                                                                 BaseFormat::bf16);
  CHECK_THROWS_WITH_AS(
      vera_model.logits(tiny_batch(96)),
      doctest::Contains("VeRA needs a dense base weight, but this model holds it in bf16"),
      peft::BaseFormatError);
  peft::DoraConfig dora;
  dora.targets.target_modules.names = {"q_proj"};
  peft::Decoder<peft::arch::Llama, peft::DoRA, float> dora_model(tiny("llama"), dora, 1,
                                                                 BaseFormat::bf16);
  CHECK_THROWS_WITH_AS(dora_model.merge(),
                       doctest::Contains("DoRA needs a dense base weight, but this model holds "
                                         "it in bf16"),
                       peft::BaseFormatError);
  CHECK_THROWS_WITH_AS(
      peft::parse_base_format("int8", "--base-dtype"),
      doctest::Contains("--base-dtype: expected fp32, bf16, fp16 or nf4, found 'int8'"),
      peft::ConfigError);
}

}  // namespace test_frozen_weights
