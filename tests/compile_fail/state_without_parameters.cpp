// Must NOT compile: a method whose State<T> lacks `parameters()` breaks the contract
// (methods/policy.hpp, section 2). The compiler's answer must be the contract's one message
// naming the missing member — and nothing else: the decoder replaces a failing method by NoPeft,
// so no pages of template noise follow (run_compile_fail.cmake counts the errors). With
// PEFT_COMPILE_FAIL_CONTROL defined the member is there and the program must compile.
#include <peft/nn/decoder.hpp>

struct Incomplete {
  using family = peft::family::Additive;
  static constexpr std::string_view name = "incomplete";
  struct Config {};
  template <class T>
  struct State {
    explicit State(const Config& c) : config_(c) {}
    const Config& config() const { return config_; }
    void attach(peft::AttachContext<T>&) {}
#ifdef PEFT_COMPILE_FAIL_CONTROL
    std::vector<peft::NamedParameter<T>> parameters() { return {}; }
#endif
    Config config_;
  };
};

int main() {
  peft::ModelConfig model;
  peft::Decoder<peft::arch::Llama, Incomplete, float> net(model);
  return 0;
}
