#!/usr/bin/env bash
# The issue-13 rows on a CUDA GPU, in one go (about 6 minutes on an H200):
#   bash benchmarks/cuda_rows.sh MODEL_FOLDER OUTPUT_FOLDER
# MODEL_FOLDER needs only config.json and the tokenizer files of the bundled model (weights are
# random: step time depends on the architecture and shapes, not on the weights' values).
# 1. the packed-vs-two-row equality test on the GPU (TRL's CUDA log-prob kernel against our packed rows);
# 2. every row at the CPU runs' shape, on the bundled model's architecture;
# 3. every row at a realistic shape: SmolLM2-1.7B's architecture, 8 pairs per step, chat-length responses.
set -euo pipefail
model=${1:?model folder}
out=${2:?output folder}
mkdir -p "$out"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| datasets', datasets.__version__, '|', torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_packing.py 2>&1 | tee "$out/packing_tests.log" | tail -4 || true
python3 benchmarks/step_time.py --model "$model" --random_init --steps 10 --warmup 2 \
    --output_json "$out/step_time_cuda_arithmetic.json" 2>"$out/step_time_cuda_arithmetic.log" || tail -20 "$out/step_time_cuda_arithmetic.log"
python3 benchmarks/step_time.py --model "$model" --random_init --shape chat --batch_size 8 --steps 10 --warmup 2 \
    --config_overrides hidden_size=2048,intermediate_size=8192,num_hidden_layers=24,num_attention_heads=32,num_key_value_heads=32 \
    --output_json "$out/step_time_cuda_chat_1.7b.json" 2>"$out/step_time_cuda_chat_1.7b.log" || tail -20 "$out/step_time_cuda_chat_1.7b.log"
