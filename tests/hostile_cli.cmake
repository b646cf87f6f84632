# Hostile arguments and inputs against the `peft` commands (issue 18): each must end with the
# expected exit status (2: a usage error, 1: a bad input) and a one-line error naming the flag or
# the file and field, well within its TIMEOUT (a hang fails the test), never with a signal.
# tests/data/hostile/expect_exit.cmake runs each command and checks its status and output.
# Hostile inputs are written here at configure time, from the golden models and cases, into
# ${CMAKE_CURRENT_BINARY_DIR}/hostile_cli; the NaN adapter is a committed file.
# Included from tests/CMakeLists.txt.

if(NOT TARGET peft_cli OR NOT IS_DIRECTORY "${PEFT_GOLDEN_DIR}/gpt2_lora")
  message(STATUS "peft: hostile CLI tests skipped (they need peft_cli and the golden cases)")
  return()
endif()

set(_h "${CMAKE_CURRENT_BINARY_DIR}/hostile_cli")
set(_hsrc "${CMAKE_CURRENT_SOURCE_DIR}/data/hostile")
set(_gpt2 "${PEFT_GOLDEN_DIR}/models/gpt2-tiny")
set(_lora "${PEFT_GOLDEN_DIR}/gpt2_lora")
file(MAKE_DIRECTORY "${_h}")
file(READ "${_gpt2}/config.json" _gpt2_config)
file(READ "${_lora}/adapter/adapter_config.json" _lora_config)
file(READ "${_lora}/case.json" _lora_case)

# A model config with `field` set to `value`: <name>/config.json (+ the real weights).
function(_peft_hostile_model name field value)
  string(REGEX REPLACE "\"${field}\": [0-9]+" "\"${field}\": ${value}" _text "${_gpt2_config}")
  file(WRITE "${_h}/${name}/config.json" "${_text}")
  file(COPY "${_gpt2}/model.safetensors" DESTINATION "${_h}/${name}")
endfunction()
_peft_hostile_model(vocab_1e12 vocab_size 1000000000000)
_peft_hostile_model(layers_1e6 n_layer 1000000)
_peft_hostile_model(layers_1e9 n_layer 1000000000)
_peft_hostile_model(layers_2e4 n_layer 20000)

# An adapter with lora_alpha 1e308: every weight finite, the scaled update is not.
string(REPLACE "\"lora_alpha\": 8" "\"lora_alpha\": 1e308" _text "${_lora_config}")
file(WRITE "${_h}/alpha_1e308/adapter_config.json" "${_text}")
file(COPY "${_lora}/adapter/adapter_model.safetensors" DESTINATION "${_h}/alpha_1e308")
# A second LoRA adapter of the same shapes (lora_alpha 4): a folder of its own for
# --adapter-per-row.
string(REPLACE "\"lora_alpha\": 8" "\"lora_alpha\": 4" _text "${_lora_config}")
file(WRITE "${_h}/alpha_4/adapter_config.json" "${_text}")
file(COPY "${_lora}/adapter/adapter_model.safetensors" DESTINATION "${_h}/alpha_4")

# Golden cases made hostile: a copy of gpt2_lora with one thing changed.
function(_peft_hostile_case name case_text adapter_config adapter_dir)
  set(_dir "${_h}/cases/${name}")
  string(REPLACE "\"model_dir\": \"../models/gpt2-tiny\"" "\"model_dir\": \"${_gpt2}\""
    _case "${case_text}")
  file(WRITE "${_dir}/case.json" "${_case}")
  file(WRITE "${_dir}/adapter/adapter_config.json" "${adapter_config}")
  file(COPY "${adapter_dir}/adapter_model.safetensors" DESTINATION "${_dir}/adapter")
  file(COPY "${_lora}/expected.safetensors" DESTINATION "${_dir}")
endfunction()
string(REPLACE "\"steps\": 4" "\"steps\": 1000000000" _text "${_lora_case}")
_peft_hostile_case(steps_1e9 "${_text}" "${_lora_config}" "${_lora}/adapter")
string(REPLACE "\"lr\": 0.01" "\"lr\": \"fast\"" _text "${_lora_case}")
_peft_hostile_case(lr_string "${_text}" "${_lora_config}" "${_lora}/adapter")
_peft_hostile_case(nan_adapter "${_lora_case}" "${_lora_config}" "${_hsrc}/nan_adapter")
# 20,000 nested parentheses as target_modules: std::regex's recursive compiler overflowed the
# stack here (SIGSEGV); whatever the pattern engine does with it, the batch must reach its summary.
string(REPEAT "(" 20000 _open)
string(REPEAT ")" 20000 _close)
string(REGEX REPLACE "\"target_modules\": \\[[^]]*\\]" "\"target_modules\": \"${_open}c_attn${_close}\""
  _text "${_lora_config}")
_peft_hostile_case(nested_parens "${_lora_case}" "${_text}" "${_lora}/adapter")

set(_expect "${_hsrc}/expect_exit.cmake")
# _peft_hostile_test(NAME RC REGEX TIMEOUT COMMAND ARGS...): the command's first word `peft` is
# the built CLI.
function(_peft_hostile_test name rc regex timeout)
  add_test(NAME hostile_cli_${name}
    COMMAND "${CMAKE_COMMAND}" "-DEXPECT_RC=${rc}" "-DEXPECT=${regex}" "-DWORKDIR=${_h}"
      -P "${_expect}" -- $<TARGET_FILE:peft_cli> ${ARGN})
  set_tests_properties(hostile_cli_${name} PROPERTIES LABELS golden TIMEOUT ${timeout}
    PASS_REGULAR_EXPRESSION "hostile-cli ok: exit ${rc}: .*(${regex})")
endfunction()

# generate: strict flags (exit 2), checks before allocation, non-finite logits (exit 1)
_peft_hostile_test(generate_valid 0 "[0-9]+ [0-9]+ [0-9]+" 60
  generate "${_gpt2}" --ids 1,2,3 --max-new 3)
_peft_hostile_test(generate_base_bf16 0 "[0-9]+ [0-9]+ [0-9]+" 60
  generate "${_gpt2}" --ids 1,2,3 --max-new 3 --base-dtype bf16)
_peft_hostile_test(generate_base_nf4 0 "[0-9]+ [0-9]+ [0-9]+" 60
  generate "${_gpt2}" --ids 1,2,3 --max-new 3 --base-dtype nf4)
_peft_hostile_test(generate_base_dtype_unknown 2 "--base-dtype: expected fp32, bf16, fp16 or nf4, found 'int8'"
  30 generate "${_gpt2}" --ids 1,2,3 --base-dtype int8)
_peft_hostile_test(bench_step_base_dtype_unknown 2 "--base-dtype: expected fp32, bf16, fp16 or nf4, found 'fp8'"
  30 bench-step --base-dtype fp8)
_peft_hostile_test(generate_ids_not_a_number 2 "--ids item 2 of 3: expected an integer.*found 'x'"
  30 generate "${_gpt2}" --ids 1,x,3)
_peft_hostile_test(generate_ids_trailing_text 2 "--ids item 2 of 3: .*found '2abc'" 30
  generate "${_gpt2}" --ids 1,2abc,3)
_peft_hostile_test(generate_ids_empty_item 2 "--ids: expected a comma-separated list" 30
  generate "${_gpt2}" --ids 1,,3)
_peft_hostile_test(generate_ids_outside_vocab 2 "--ids item 2: .*vocab_size 384.*found 384" 30
  generate "${_gpt2}" --ids 1,384)
_peft_hostile_test(generate_negative_temperature 2 "--temperature: expected a finite number in \\[0,.*found '-1'" 30
  generate "${_gpt2}" --ids 1 --temperature -1)
_peft_hostile_test(generate_nan_temperature 2 "--temperature: expected a finite number.*found 'nan'" 30
  generate "${_gpt2}" --ids 1 --temperature nan)
_peft_hostile_test(generate_max_new_unbounded 2 "--max-new: expected an integer in \\[0, 65536\\], found '1000000000'" 30
  generate "${_gpt2}" --ids 1 --max-new 1000000000)
_peft_hostile_test(generate_max_new_trailing 2 "--max-new: .*found '5x'" 30
  generate "${_gpt2}" --ids 1 --max-new 5x)
_peft_hostile_test(generate_top_k_negative 2 "--top-k: expected an integer in \\[0, .*found '-3'" 30
  generate "${_gpt2}" --ids 1 --top-k -3)
_peft_hostile_test(generate_top_p_zero 2 "--top-p: expected a finite number in \\(0, 1\\], found '0'" 30
  generate "${_gpt2}" --ids 1 --top-p 0)
_peft_hostile_test(generate_stop_not_a_number 2 "--stop item 2 of 2: .*found 'x'" 30
  generate "${_gpt2}" --ids 1 --stop 3,x)
_peft_hostile_test(generate_no_cache 0 "[0-9]+ [0-9]+ [0-9]+" 60
  generate "${_gpt2}" --ids 1,2,3 --max-new 3 --no-cache --temperature 0.7 --top-p 0.9 --seed 4)
_peft_hostile_test(generate_seed_negative 2 "--seed: expected an integer in \\[0, .*found '-1'" 30
  generate "${_gpt2}" --ids 1 --seed -1)
_peft_hostile_test(generate_unknown_option 2 "unknown option '--bogus'" 30
  generate "${_gpt2}" --ids 1 --bogus 1)
_peft_hostile_test(generate_prompt_and_ids 2 "--prompt and --ids: expected one of them, found both" 30
  generate "${_gpt2}" --ids 1 --prompt a)
# Several prompts in one batch, each row with its own adapter folder (or the base)
# (one line a row: the expectation sees newlines, the pass check the " | " it prints)
_peft_hostile_test(generate_adapter_per_row 0 "[0-9]+ [0-9]+ [0-9]+[^0-9]+[0-9]+ [0-9]+ [0-9]+[^0-9]+[0-9]+ [0-9]+ [0-9]+" 60
  generate "${_gpt2}" --adapter-per-row "${_lora}/adapter" --adapter-per-row base
  --adapter-per-row "${_h}/alpha_4" --ids 1,2,3 --ids 4,5,6 --ids 1,2,3 --max-new 3 --seed 1)
_peft_hostile_test(generate_adapter_per_row_count 2 "--adapter-per-row: expected one per prompt \\(2\\), found 1" 30
  generate "${_gpt2}" --adapter-per-row base --ids 1,2 --ids 3,4)
_peft_hostile_test(generate_rows_of_two_lengths 2 "--ids: the rows have 2 and 1 tokens.*rows generated together need one length" 30
  generate "${_gpt2}" --ids 1,2 --ids 3)
_peft_hostile_test(generate_adapter_and_per_row 2 "--adapter and --adapter-per-row: expected one of them, found both" 30
  generate "${_gpt2}" --adapter "${_lora}/adapter" --adapter-per-row base --ids 1)
_peft_hostile_test(generate_adapter_per_row_two_methods 1 "gpt2_ia3/adapter/adapter_config.json: not an adapter of this model's method \\(LoRA\\)" 60
  generate "${_gpt2}" --adapter-per-row "${_lora}/adapter" --adapter-per-row "${PEFT_GOLDEN_DIR}/gpt2_ia3/adapter"
  --ids 1,2 --ids 3,4)
_peft_hostile_test(generate_nan_adapter 1 "NaN|not finite|non-finite" 60
  generate "${_gpt2}" --adapter "${_hsrc}/nan_adapter" --ids 1,2,3 --max-new 3)
_peft_hostile_test(generate_alpha_1e308 1 "not finite|lora_alpha" 60
  generate "${_gpt2}" --adapter "${_h}/alpha_1e308" --ids 1,2,3 --max-new 3)
_peft_hostile_test(generate_vocab_1e12 1 "config.json: .*vocab_size" 30
  generate "${_h}/vocab_1e12" --ids 1,2,3)

# count: shapes only, bounded in the number of layers
_peft_hostile_test(count_valid 0 "trainable params: 8,192 \\|\\| all params: 136,960" 30
  count "${_gpt2}/config.json" "${_lora}/adapter/adapter_config.json")
_peft_hostile_test(count_layers_2e4 1 "config.json: num_layers: expected at most 10000.*found 20000" 30
  count "${_h}/layers_2e4/config.json" "${_lora}/adapter/adapter_config.json")
_peft_hostile_test(count_layers_1e6 1 "config.json: field 'n_layer': expected an integer in .1, 65536., found 1000000" 30
  count "${_h}/layers_1e6/config.json" "${_lora}/adapter/adapter_config.json")
_peft_hostile_test(count_layers_1e9 1 "config.json: field 'n_layer': expected an integer in .1, 65536., found 1000000000" 30
  count "${_h}/layers_1e9/config.json" "${_lora}/adapter/adapter_config.json")
_peft_hostile_test(count_usage 2 "usage: peft count" 30 count "${_gpt2}/config.json")

# parity: every case gets its line, the batch its summary, whatever a case does
_peft_hostile_test(parity_steps_bound 1
  "FAIL steps_1e9  error: .*case.json: train.steps: expected an integer in \\[0, 1000\\], found 1000000000"
  60 parity "${_h}/cases/steps_1e9")
_peft_hostile_test(parity_field_type 1 "FAIL lr_string  error: .*case.json: train.lr: expected a finite number" 60
  parity "${_h}/cases/lr_string")
_peft_hostile_test(parity_nan_adapter 1 "FAIL nan_adapter  error: .*(NaN|not finite|non-finite)" 60
  parity "${_h}/cases/nan_adapter")
_peft_hostile_test(parity_batch_continues 1
  "FAIL nested_parens .*FAIL steps_1e9 .*PASS gpt2_lora .*1 passed, 2 failed" 300
  parity "${_h}/cases/nested_parens" "${_h}/cases/steps_1e9" "${_lora}")
_peft_hostile_test(parity_unknown_option 2 "unknown option '--bogus'" 30 parity --bogus "${_lora}")
_peft_hostile_test(parity_timeout_not_a_number 2 "--timeout: expected a finite number.*found 'soon'" 30
  parity --timeout soon "${_lora}")
_peft_hostile_test(parity_base_dtype_unknown 2 "--base-dtype: expected fp32, bf16, fp16 or nf4, found 'int4'" 30
  parity --base-dtype int4 "${_lora}")
_peft_hostile_test(parity_base_dtype_cuda 2 "--base-dtype bf16 runs on the CPU only|this build has no CUDA" 30
  parity --device cuda --base-dtype bf16 "${_lora}")

_peft_hostile_test(train_stop_at_zero 2 "--stop-at: expected an integer in \\[1, 1000000000\\], found '0'" 30
  train "${_gpt2}" --adapter-config "${_lora}/adapter/adapter_config.json" --data "${_gpt2}/config.json"
  --out "${_h}/train_stop" --stop-at 0)

# study and search: arguments and output folders checked before any training
_peft_hostile_test(study_out_proc 1 "--out /proc: cannot write in the output folder" 30
  study --quick --no-progress --out /proc)
_peft_hostile_test(search_out_proc_nope 1 "--out /proc/nope: cannot create the output folder" 30
  search --quick --out /proc/nope)
_peft_hostile_test(study_methods_bogus 2 "--methods: expected method names.*found 'bogus'" 30
  study --quick --no-progress --out "${_h}/study" --methods bogus)
_peft_hostile_test(study_lr_unknown_method 2 "--lr: expected method=rate with a method.*found 'bogus'" 30
  study --quick --no-progress --out "${_h}/study" --lr bogus=0.1)
_peft_hostile_test(study_lr_negative 2 "--lr lora: expected a finite number in \\(0, 10\\], found '-1'" 30
  study --quick --no-progress --out "${_h}/study" --lr lora=-1)
_peft_hostile_test(study_steps_trailing 2 "--steps: expected an integer in \\[1, 1000000\\], found '10x'" 30
  study --quick --no-progress --out "${_h}/study" --steps 10x)
_peft_hostile_test(search_steps_bound 2 "--steps: expected an integer in \\[1, 1000000\\], found '1000000000'" 30
  search --quick --out "${_h}/search" --steps 1000000000)
_peft_hostile_test(search_task_unknown 2 "--task: unknown task 'bogus'" 30
  search --quick --out "${_h}/search" --task bogus)

# bench-step: strict flags, and the step's memory checked before the model is built
_peft_hostile_test(bench_step_layers_trailing 2 "--layers: expected an integer in \\[1, 10000\\], found '1x'" 30
  bench-step --layers 1x)
_peft_hostile_test(bench_step_alpha_inf 2 "--alpha: expected a finite number.*found 'inf'" 30
  bench-step --alpha inf)
_peft_hostile_test(bench_step_too_large 2 "the step needs about .* GB, more than this machine's" 30
  bench-step --vocab 10000000 --batch 65536 --seq 65536)
_peft_hostile_test(bench_step_heads 2 "--heads: expected a divisor of --d 768, found 7" 30
  bench-step --heads 7)
_peft_hostile_test(bench_step_targets_unknown 2 "--targets: bench-step: unknown target 'bogus'" 30
  bench-step --targets qkv,bogus)

# demo
_peft_hostile_test(demo_usage 2 "usage: peft demo" 30 demo a b)

# tokenize: GPT-2's files (PEFT_GPT2_TOKENIZER_DIR, tests/CMakeLists.txt): the ids of a text, the
# text of ids, and bad input (ill-formed UTF-8, an id outside the vocabulary, not a list of ids)
if(EXISTS "${PEFT_GPT2_TOKENIZER_DIR}/vocab.json")
  file(WRITE "${_h}/tokenize_hello.txt" "Hello world, it's 2026!")
  file(WRITE "${_h}/tokenize_ids.json" "[15496, 995, 11, 340, 338, 1160, 2075, 0]")
  file(WRITE "${_h}/tokenize_bad_id.json" "[15496, 50257]")
  file(WRITE "${_h}/tokenize_not_list.json" "{\"ids\": [1]}")
  string(ASCII 255 _byte_ff)
  file(WRITE "${_h}/tokenize_latin1.txt" "caf${_byte_ff}")
  _peft_hostile_test(tokenize_gpt2 0 "\\[15496, 995, 11, 340, 338, 1160, 2075, 0\\]" 30
    tokenize "${PEFT_GPT2_TOKENIZER_DIR}" "${_h}/tokenize_hello.txt")
  _peft_hostile_test(tokenize_decode 0 "Hello world, it's 2026!" 30
    tokenize "${PEFT_GPT2_TOKENIZER_DIR}" "${_h}/tokenize_ids.json" --decode)
  _peft_hostile_test(tokenize_not_utf8 1 "tokenize_latin1.txt: not UTF-8 at byte 3 \\(found byte 0xff\\)" 30
    tokenize "${PEFT_GPT2_TOKENIZER_DIR}" "${_h}/tokenize_latin1.txt")
  _peft_hostile_test(tokenize_id_range 1 "tokenize_bad_id.json: element 1: expected a token id in \\[0, 50257\\), found number 50257" 30
    tokenize "${PEFT_GPT2_TOKENIZER_DIR}" "${_h}/tokenize_bad_id.json" --decode)
  _peft_hostile_test(tokenize_not_list 1 "tokenize_not_list.json: expected a JSON array of token ids, found object" 30
    tokenize "${PEFT_GPT2_TOKENIZER_DIR}" "${_h}/tokenize_not_list.json" --decode)
  _peft_hostile_test(tokenize_no_tokenizer 1 "no tokenizer here \\(expected tokenizer.json, or vocab.json and merges.txt\\)" 30
    tokenize "${_h}" "${_h}/tokenize_hello.txt")
  _peft_hostile_test(tokenize_usage 2 "usage: peft tokenize TOKENIZER TEXT_FILE" 30
    tokenize "${PEFT_GPT2_TOKENIZER_DIR}")
  _peft_hostile_test(tokenize_flag 2 "unknown flag --bogus" 30
    tokenize "${PEFT_GPT2_TOKENIZER_DIR}" "${_h}/tokenize_hello.txt" --bogus)
endif()

# merge: bad combinations and adapters are errors before the output folder exists
set(_merge "${CMAKE_CURRENT_SOURCE_DIR}/data/weighted_merge/adapters")
_peft_hostile_test(merge_valid 0 "merged 2 adapters \\(ties\\)" 60
  merge --adapters "${_merge}/a,${_merge}/b" --weights 0.7,-0.3 --combination ties --density 0.5
  --out "${_h}/merged")
_peft_hostile_test(merge_unknown_combination 2 "--combination: combination type: expected one of linear, cat, svd" 30
  merge --adapters "${_merge}/a,${_merge}/b" --weights 1,1 --combination mean --out "${_h}/never")
_peft_hostile_test(merge_rank_mismatch 1 "needs adapters of one rank" 30
  merge --adapters "${_merge}/a,${_merge}/c" --weights 1,1 --combination linear --out "${_h}/never")
_peft_hostile_test(merge_svd_rank_too_high 1 "svd rank 99 is above the rank 16" 30
  merge --adapters "${_merge}/a,${_merge}/c" --weights 1,1 --rank 99 --out "${_h}/never")
_peft_hostile_test(merge_weights_count 2 "--weights: 1 weights for 2 adapters" 30
  merge --adapters "${_merge}/a,${_merge}/b" --weights 1 --out "${_h}/never")
_peft_hostile_test(merge_not_lora 1 "peft_type 'PREFIX_TUNING', expected 'LORA'" 30
  merge --adapters "${_merge}/a,${PEFT_GOLDEN_DIR}/gpt2_prefix/adapter" --weights 1,1
  --out "${_h}/never")
