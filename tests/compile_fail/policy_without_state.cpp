// Must NOT compile: a method without `template <class T> class State` (methods/policy.hpp,
// section 1). One message names the missing member; no further errors follow (the count is
// checked). With PEFT_COMPILE_FAIL_CONTROL defined it is a complete method and must compile.
#include <peft/nn/decoder.hpp>

struct NoState {
  using family = peft::family::Selective;
  static constexpr std::string_view name = "no_state";
  struct Config {};
#ifdef PEFT_COMPILE_FAIL_CONTROL
  template <class T>
  struct State {
    explicit State(const Config& c) : config_(c) {}
    const Config& config() const { return config_; }
    void attach(peft::AttachContext<T>&) {}
    std::vector<peft::NamedParameter<T>> parameters() { return {}; }
    Config config_;
  };
#endif
};

int main() {
  peft::ModelConfig model;
  peft::Decoder<peft::arch::Gpt2, NoState, float> net(model);
  return 0;
}
