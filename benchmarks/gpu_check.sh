#!/usr/bin/env bash
# The GPU check in one call (issue 17 item 5): every GPU test and benchmark line, each under its own
# timeout so one failure or hang does not eat the rest, within 8.5 minutes on one H100/H200 with no network,
# no vLLM and no flash-attn. Every result and log goes under one folder:
#
#   GPU_CHECK_OUT        output folder (default benchmarks/results/gpu/): <line>.log, the benchmarks' own
#                        JSON/Markdown results, pytest-gpu.xml, env.txt, summary.tsv (line, status, seconds)
#   GPU_CHECK_TOKENIZER  the real Qwen2.5 tokenizer (default ../shared/tokenizers/qwen2.5 beside the repo,
#                        else shared/tokenizers/qwen2.5 inside it); the GRPO step line skips without it
#   PYTHON               interpreter (default: python)
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --dry-run   # print the commands; check that every script and flag exists
#   bash benchmarks/gpu_check.sh --only rollout,grpo-step   # rerun some lines (summary.tsv is appended to)
#
# --dry-run runs nowhere near a GPU (tests/test_gpu_check.py runs it in the CPU suite): it fails (exit 1)
# when a line names a script or a --flag that the script does not define, or when the timeouts add up to
# more than the 8.5-minute budget. A line marked optional whose script does not exist yet (the QLoRA
# memory line: LoRA/4-bit is issue 14) is printed as SKIP, passes the dry run, and is skipped in a real run.
# Exit code of a real run: the number of lines that failed or timed out (0: all passed or skipped).
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python}
BUDGET_S=510
DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:-}; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--only LINE,LINE...]" >&2; exit 2 ;;
  esac
  shift
done
TOK=${GPU_CHECK_TOKENIZER:-}
if [ -z "$TOK" ]; then
  for d in ../shared/tokenizers/qwen2.5 shared/tokenizers/qwen2.5; do [ -d "$d" ] && TOK=$d && break; done
fi
[ -n "$TOK" ] && [ -d "$TOK" ] && TOK=$(cd "$TOK" && pwd)

# name | timeout s | optional (script may not exist yet) | command (words; $OUT and $TOK expanded below)
LINES=(
  "pytest-gpu|140|no|$PY -m pytest -m gpu --ignore=tests/test_gpu_flex.py -q -p no:cacheprovider --timeout 100 --junitxml=$OUT/pytest-gpu.xml tests"
  "train-throughput-mfu|45|no|$PY benchmarks/train_throughput.py --model qwen2.5-1.5b --hardware h100x2 --seq-len 2048 --micro-batch 1 --steps 5 --warmup 2 --no-compile --out $OUT"
  "grpo-step|95|no|$PY benchmarks/grpo_step.py --model qwen2.5-1.5b --tokenizer $TOK --prompts 8 --group-size 8 --max-new-tokens 128 --micro-batch 8 --steps 2 --warmup 1 --no-compile --engine hf --out $OUT"
  "rollout|55|no|$PY benchmarks/rollout_engines.py --engines hf --model qwen2.5-1.5b --tokenizer $TOK --device cuda --batch 8 --group 8 --max-new-tokens 64 --iters 2 --eval-problems 10 --eval-max-new-tokens 32 --out $OUT"
  "prefix-attention|45|no|$PY benchmarks/prefix_attention.py --model qwen2.5-1.5b --device cuda --kernels sdpa,fa2_varlen --prompts 8 --group 8 --prompt-len 256 --completion-len 1024 --micro-batch 8 --steps 2 --warmup 1 --out $OUT"
  "qlora-memory|40|yes|$PY benchmarks/qlora_memory.py --model qwen2.5-1.5b --device cuda --out $OUT"
  "pytest-flex|45|no|$PY -m pytest -m gpu -v -p no:cacheprovider --timeout 40 --junitxml=$OUT/pytest-flex.xml tests/test_gpu_flex.py"
  "prefix-attention-flex|45|no|$PY benchmarks/prefix_attention.py --model qwen2.5-1.5b --device cuda --kernels flex --prompts 8 --group 8 --prompt-len 256 --completion-len 1024 --micro-batch 8 --steps 2 --warmup 1 --out $OUT"
)

script_of() {  # the .py file a command runs, or "" for pytest
  case " $1 " in *" -m pytest "*) return ;; esac
  for w in $1; do case "$w" in *.py) echo "$w"; return ;; esac; done
}

check_line() {  # name optional cmd -> prints problems, returns 1 on a missing required script/flag
  local name=$1 optional=$2 cmd=$3 script bad=0
  script=$(script_of "$cmd")
  if [ -z "$script" ]; then  # pytest: the marker and the GPU test files
    grep -q '"gpu:' pyproject.toml || { echo "  $name: the gpu marker is not declared in pyproject.toml"; bad=1; }
    ls tests/test_gpu*.py >/dev/null 2>&1 || { echo "  $name: no tests/test_gpu*.py"; bad=1; }
    return $bad
  fi
  if [ ! -f "$script" ]; then
    [ "$optional" = yes ] && return 0
    echo "  $name: $script does not exist"; return 1
  fi
  for w in $cmd; do
    case "$w" in
      --*=*) w=${w%%=*} ;;
    esac
    case "$w" in --*) ;; *) continue ;; esac
    # --no-x is defined as "--no-x", or as "--x" with argparse.BooleanOptionalAction
    grep -q -- "\"$w\"" "$script" || grep -q -- "\"--${w#--no-}\".*BooleanOptionalAction" "$script" \
      || { echo "  $name: $script defines no $w"; bad=1; }
  done
  return $bad
}

total=0; problems=0
for line in "${LINES[@]}"; do
  IFS='|' read -r _ t _ _ <<<"$line"; total=$((total + t))
done
if [ "$DRY" = 1 ]; then
  echo "gpu_check dry run: output folder $OUT, tokenizer ${TOK:-<none found>}, python $PY"
  for line in "${LINES[@]}"; do
    IFS='|' read -r name t optional cmd <<<"$line"
    script=$(script_of "$cmd")
    if [ "$optional" = yes ] && [ -n "$script" ] && [ ! -f "$script" ]; then
      echo "SKIP $name: $script is not built yet (optional line; a real run skips it)"
    else
      echo "RUN  $name (timeout ${t}s): $cmd"
    fi
    check_line "$name" "$optional" "$cmd" || problems=$((problems + 1))
  done
  echo "timeouts add up to ${total}s of a ${BUDGET_S}s budget"
  [ "$total" -le "$BUDGET_S" ] || { echo "  the timeouts exceed the budget"; problems=$((problems + 1)); }
  if [ "$problems" -gt 0 ]; then echo "dry run: $problems problem(s)"; exit 1; fi
  echo "dry run: every script and flag exists"
  exit 0
fi

mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
{
  date -u; nvidia-smi 2>&1 | head -15
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" 2>&1
  $PY -c "import flash_attn" >/dev/null 2>&1 && echo "flash-attn: present" || echo "flash-attn: absent"
  $PY -c "import vllm" >/dev/null 2>&1 && echo "vllm: present" || echo "vllm: absent"
} >"$OUT/env.txt" 2>&1
[ -n "$ONLY" ] && [ -f "$OUT/summary.tsv" ] || printf 'line\tstatus\tseconds\n' >"$OUT/summary.tsv"
failed=0
for line in "${LINES[@]}"; do
  IFS='|' read -r name t optional cmd <<<"$line"
  case ",$ONLY," in ",,"|*",$name,"*) ;; *) continue ;; esac
  script=$(script_of "$cmd")
  status=""
  if [ -n "$script" ] && [ ! -f "$script" ] && [ "$optional" = yes ]; then
    status="skipped: $script not built yet"
  elif { [ "$name" = grpo-step ] || [ "$name" = rollout ]; } && [ -z "$TOK" ]; then
    status="skipped: no Qwen2.5 tokenizer (set GPU_CHECK_TOKENIZER)"
  fi
  if [ -n "$status" ]; then
    echo "$name: $status"; printf '%s\t%s\t0\n' "$name" "$status" >>"$OUT/summary.tsv"; continue
  fi
  echo "$name (timeout ${t}s): $cmd"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the command is a list of words on purpose
  timeout --kill-after=10 "$t" $cmd >"$OUT/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after ${t}s"; failed=$((failed + 1)) ;;
    *) status="failed (exit $rc)"; failed=$((failed + 1)) ;;
  esac
  echo "  -> $status in ${secs}s (log: $OUT/$name.log)"
  [ "$rc" = 0 ] || tail -n 5 "$OUT/$name.log" | sed 's/^/     /'
  printf '%s\t%s\t%s\n' "$name" "$status" "$secs" >>"$OUT/summary.tsv"
done
echo "summary: $OUT/summary.tsv ($failed line(s) failed)"
exit "$failed"
