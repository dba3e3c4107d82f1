from grpo_fsdp.cli import run_main
from grpo_fsdp.curriculum.tool import main

run_main(main)
