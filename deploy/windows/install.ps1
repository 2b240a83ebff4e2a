<#
.SYNOPSIS
  Installs the campus-edge agent as a Windows service under WinSW (run as Administrator).

.DESCRIPTION
  Expects the agent already installed in a virtual environment (default C:\campus-edge:
  py -m venv C:\campus-edge; C:\campus-edge\Scripts\pip install campus-edge[agent]) and
  WinSW's exe downloaded by you from https://github.com/winsw/winsw/releases (compare the
  SHA-256 this script prints with the release's). It then:
    1. creates %ProgramData%\campus-edge (config, secrets, outbox, logs) and gives access to
       SYSTEM, Administrators and the service account only (inheritance removed);
    2. lets the service account read and run the virtual environment;
    3. copies WinSW as <venv>\service\campus-edge-agent.exe beside campus-edge-agent.xml and
       installs the service, then makes it run as NT AUTHORITY\LocalService;
    4. with -SmartCard, sets the Smart Card service (SCardSvr) to start automatically;
    5. starts the service if agent.toml is there (otherwise enrol first, then start it).
  Accounts are given by SID (*S-1-5-...) so the script works on localized Windows.

.EXAMPLE
  .\install.ps1 -WinSW C:\Users\admin\Downloads\WinSW-x64.exe -SmartCard
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][string]$WinSW,
    [string]$Venv = 'C:\campus-edge',
    [switch]$SmartCard
)
$ErrorActionPreference = 'Stop'

$principal = New-Object Security.Principal.WindowsPrincipal(
    [Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw 'Run this script as Administrator.'
}
$agent = Join-Path $Venv 'Scripts\edge-agent.exe'
if (-not (Test-Path $agent)) {
    throw "No $agent: install the agent first (py -m venv $Venv; $Venv\Scripts\pip install campus-edge[agent])."
}
if (-not (Test-Path $WinSW)) { throw "No WinSW exe at $WinSW." }
Write-Host ("WinSW SHA-256: " + (Get-FileHash -Algorithm SHA256 $WinSW).Hash +
    " (compare it with the release page before going on)")

$system = '*S-1-5-18'; $admins = '*S-1-5-32-544'; $localService = '*S-1-5-19'

# 1. The data directory: config, secrets (MQTT password, district key), outbox, logs.
$data = Join-Path $env:ProgramData 'campus-edge'
New-Item -ItemType Directory -Force -Path $data, (Join-Path $data 'logs') | Out-Null
& icacls $data /inheritance:r /grant:r "${system}:(OI)(CI)F" "${admins}:(OI)(CI)F" "${localService}:(OI)(CI)M" | Out-Null
if ($LASTEXITCODE -ne 0) { throw "icacls failed on $data" }

# 2. The service account runs Python from the virtual environment.
& icacls $Venv /grant "${localService}:(OI)(CI)RX" | Out-Null
if ($LASTEXITCODE -ne 0) { throw "icacls failed on $Venv" }

# 3. WinSW finds its XML by its own name: campus-edge-agent.exe + campus-edge-agent.xml.
$serviceDir = Join-Path $Venv 'service'
New-Item -ItemType Directory -Force -Path $serviceDir | Out-Null
$wrapper = Join-Path $serviceDir 'campus-edge-agent.exe'
Copy-Item -Force $WinSW $wrapper
Copy-Item -Force (Join-Path $PSScriptRoot 'campus-edge-agent.xml') (Join-Path $serviceDir 'campus-edge-agent.xml')
& $wrapper install
if ($LASTEXITCODE -ne 0) { throw 'WinSW install failed' }
& sc.exe config campus-edge-agent obj= 'NT AUTHORITY\LocalService' password= '' | Out-Null
if ($LASTEXITCODE -ne 0) { throw 'sc.exe config (service account) failed' }

# 4. PC/SC readers: Windows' Smart Card service, started at boot rather than on demand.
if ($SmartCard) {
    Set-Service -Name SCardSvr -StartupType Automatic
    Start-Service -Name SCardSvr
}

# 5. Start now only when the device is enrolled.
$config = Join-Path $data 'agent.toml'
if (Test-Path $config) {
    & $wrapper start
    Write-Host "campus-edge-agent started; logs in $data\logs"
} else {
    Write-Host "Installed. Enrol first: $agent enroll --server https://... --code ... --config $config"
    Write-Host "then: $wrapper start"
}
