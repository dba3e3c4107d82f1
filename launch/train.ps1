<#
.SYNOPSIS
    Single-node launcher for Windows PowerShell: the same as launch/train.sh.
.EXAMPLE
    launch\train.ps1 hardware=cpu dry_run=true
    launch\train.ps1 -NProc 1 model=tiny train.max_steps=5
.NOTES
    Processes per node: -NProc, else $env:NPROC, else the hardware profile's nproc_per_node
    (composed from the same overrides), capped by the GPUs torch sees. Every other argument
    is a Hydra override, passed through untouched. Quote overrides that hold commas or brackets
    ('optim.betas=[0.9,0.95]'): unquoted, PowerShell splits them into an array.
    NCCL does not exist on Windows, so multi-GPU runs there are not a supported setup.
    Exit code: the trainer's; a config mistake is one line and 2 before torchrun starts; 0 after a
    clean SIGTERM save (on Linux pwsh: torchrun itself exits 1 then), as in launch/train.sh.
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
# Compose and validate before torchrun (launch/check_overrides.py): a mistake is one line and exit code 2,
# not one per rank under torchrun's ChildFailedError. It prints the processes per node: -NProc when
# given, else the profile's nproc_per_node capped by the GPUs torch sees.
# "Continue" while it runs: Windows PowerShell 5.1 turns native stderr into errors under "Stop".
$Previous = $ErrorActionPreference
$ErrorActionPreference = "Continue"
try { $Out = & $Py (Join-Path $PSScriptRoot "check_overrides.py") "--nproc=$NProc" @Overrides } finally { $ErrorActionPreference = $Previous }
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
$NProc = [int]($Out | Select-Object -Last 1)

# After a SIGTERM every rank saves and exits 0, but torchrun exits 1 (it re-raises the signal); the
# trainer writes this marker after a clean save, and then this script exits 0 (see launch/train.sh).
$Marker = Join-Path ([System.IO.Path]::GetTempPath()) ("grpo-fsdp-preempted-" + [guid]::NewGuid().ToString() + ".txt")
$Saved = @{ Marker = $env:GRPO_FSDP_PREEMPT_MARKER; Launcher = $env:GRPO_FSDP_LAUNCHER }
$env:GRPO_FSDP_PREEMPT_MARKER = $Marker
$env:GRPO_FSDP_LAUNCHER = "& '$PSCommandPath' -NProc $NProc"  # how the resume command in the SIGTERM message starts
try {
    & $Exe @Prefix --standalone "--nproc_per_node=$NProc" -m grpo_fsdp.train @Overrides
    $Code = $LASTEXITCODE
    if ($Code -ne 0 -and (Test-Path $Marker)) {
        $Step, $Ckpt, $Command = (Get-Content $Marker -TotalCount 1) -split "`t"
        Write-Host "train.ps1: preempted; every rank saved step $Step in $Ckpt (torchrun exited $Code because it was signalled); exit 0. Resume with: $Command"
        $Code = 0
    }
} finally {
    Remove-Item $Marker -ErrorAction SilentlyContinue
    $env:GRPO_FSDP_PREEMPT_MARKER = $Saved.Marker  # $env: changes would outlive the script in this session
    $env:GRPO_FSDP_LAUNCHER = $Saved.Launcher
}
exit $Code
