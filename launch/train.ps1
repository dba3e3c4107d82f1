<#
.SYNOPSIS
    Single-node launcher for Windows PowerShell: the same as launch/train.sh.
.EXAMPLE
    launch\train.ps1 hardware=cpu dry_run=true
    launch\train.ps1 -NProc 1 model=tiny train.max_steps=5
.NOTES
    Processes per node: -NProc, else $env:NPROC, else the hardware profile's nproc_per_node
    (composed from the same overrides), capped by the GPUs nvidia-smi lists. Every other argument
    is a Hydra override, passed through untouched. Quote overrides that hold commas or brackets
    ('optim.betas=[0.9,0.95]'): unquoted, PowerShell splits them into an array.
    NCCL does not exist on Windows, so multi-GPU runs there are not a supported setup.
#>
# PositionalBinding off: otherwise the first override would be bound to -NProc by position and
# fail the [int] conversion. The overrides are this script's $args, collected into $Overrides.
[CmdletBinding(PositionalBinding = $false)]
param(
    [int]$NProc = 0,
    [Parameter(ValueFromRemainingArguments = $true)]
    [string[]]$Overrides = @()
)
$ErrorActionPreference = "Stop"

$Root = Split-Path -Parent $PSScriptRoot
$VenvPy = Join-Path $Root ".venv\Scripts\python.exe"
if (Test-Path $VenvPy) { $Py = $VenvPy } else { $Py = (Get-Command python).Source }
$VenvTorchrun = Join-Path $Root ".venv\Scripts\torchrun.exe"
if (Test-Path $VenvTorchrun) {
    $Exe = $VenvTorchrun; $Prefix = @()
} else {
    $Exe = $Py; $Prefix = @("-m", "torch.distributed.run")
}

if ($NProc -le 0 -and $env:NPROC) { $NProc = [int]$env:NPROC }
if ($NProc -le 0) {
    # A config mistake falls back to 1 on purpose: the trainer then reports it in one line.
    # "Continue" while it runs: Windows PowerShell 5.1 turns native stderr into errors under "Stop".
    $Code = "import sys; from grpo_fsdp.cli import compose; print(compose(sys.argv[1:]).hardware.nproc_per_node)"
    $Previous = $ErrorActionPreference
    $ErrorActionPreference = "Continue"
    try { $Out = & $Py -c $Code @Overrides 2>$null } finally { $ErrorActionPreference = $Previous }
    $NProc = if ($LASTEXITCODE -eq 0 -and $Out) { [int]($Out | Select-Object -Last 1) } else { 1 }
    if (Get-Command nvidia-smi -ErrorAction SilentlyContinue) {
        $Gpus = @(& nvidia-smi -L 2>$null | Where-Object { $_ -match '^GPU' }).Count
        if ($Gpus -gt 0 -and $NProc -gt $Gpus) {
            Write-Warning "profile asks for $NProc processes but $Gpus GPU(s) are present; using $Gpus"
            $NProc = $Gpus
        }
    }
}

& $Exe @Prefix --standalone "--nproc_per_node=$NProc" -m grpo_fsdp.train @Overrides
exit $LASTEXITCODE
