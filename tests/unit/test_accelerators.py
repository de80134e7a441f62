"""Accelerator detection (airfleet.accelerators): real command output in, a typed report out.

The fixtures follow the formats in /work/shared/FACTS.md ("GPU output formats"): ``lspci -nn``
lines as an HGX H100 board, an AMD Instinct MI210 host and a desktop print them, and
``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` as driver 550 prints it. The probe
command itself is pinned to its exact string and also run under /bin/sh against stub commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from airfleet.accelerators import (
    LSPCI_COMMAND,
    NVIDIA_SMI_COMMAND,
    STAGE_DEVICE,
    STAGE_DRIVER,
    STAGE_RUNTIME,
    AcceleratorReport,
    Gpu,
    PciDevice,
    Stage,
    detect,
    from_node_labels,
    parse_lspci,
    parse_nvidia_smi,
    probe_command,
)

# ---- fixtures: real formats --------------------------------------------------------------------

H100_SLOTS = ["18:00.0", "2a:00.0", "3a:00.0", "5d:00.0", "9a:00.0", "ab:00.0", "ba:00.0", "db:00.0"]
# An HGX H100 8-GPU server: BMC VGA, NVSwitches (bridges), ConnectX-7 NICs, eight GPUs.
LSPCI_HGX_H100 = "\n".join([
    "00:00.0 Host bridge [0600]: Intel Corporation Sapphire Rapids Ubox [8086:3250] (rev 04)",
    "03:00.0 VGA compatible controller [0300]: ASPEED Technology, Inc. ASPEED Graphics Family "
    "[1a03:2000] (rev 52)",
    "05:00.0 Bridge [0680]: NVIDIA Corporation Device [10de:22a3] (rev a1)",
    "06:00.0 Bridge [0680]: NVIDIA Corporation Device [10de:22a3] (rev a1)",
    "1a:00.0 Infiniband controller [0207]: Mellanox Technologies MT2910 Family [ConnectX-7] "
    "[15b3:1021]",
    *(f"{slot} 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] "
      "(rev a1)" for slot in H100_SLOTS),
]) + "\n"

H100_UUIDS = [
    "GPU-5b9a4c1e-8c2e-4f3b-9a1d-2e3f4a5b6c70", "GPU-1f0e2d3c-4b5a-6978-8a9b-0c1d2e3f4a51",
    "GPU-7c6b5a49-3827-1605-f4e3-d2c1b0a9f8e2", "GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c53",
    "GPU-9f8e7d6c-5b4a-3928-1706-f5e4d3c2b1a4", "GPU-2b3c4d5e-6f7a-8b9c-0d1e-2f3a4b5c6d75",
    "GPU-8e7d6c5b-4a39-2817-06f5-e4d3c2b1a0f6", "GPU-3c4d5e6f-7a8b-9c0d-1e2f-3a4b5c6d7e87",
]
SMI_8X_H100 = "".join(f"{i}, NVIDIA H100 80GB HBM3, {uuid}, 81559, 550.54.15\n"
                      for i, uuid in enumerate(H100_UUIDS))

LSPCI_MI210 = "\n".join([
    "02:00.0 VGA compatible controller [0300]: ASPEED Technology, Inc. ASPEED Graphics Family "
    "[1a03:2000] (rev 41)",
    "c1:00.0 Display controller [0380]: Advanced Micro Devices, Inc. [AMD/ATI] Aldebaran/MI200 "
    "[Instinct MI210] [1002:740f] (rev 02)",
    # An AMD CPU's own functions use vendor 1022, not 1002.
    "c0:00.2 IOMMU [0806]: Advanced Micro Devices, Inc. [AMD] Starship/Matisse IOMMU "
    "[1022:1481]",
]) + "\n"

# A workstation: Intel iGPU plus a GeForce card with its audio, USB and UCSI functions.
LSPCI_DESKTOP = "\n".join([
    "00:02.0 VGA compatible controller [0300]: Intel Corporation CometLake-S GT2 "
    "[UHD Graphics 630] [8086:9bc5] (rev 05)",
    "01:00.0 VGA compatible controller [0300]: NVIDIA Corporation TU102 "
    "[GeForce RTX 2080 Ti Rev. A] [10de:1e07] (rev a1)",
    "01:00.1 Audio device [0403]: NVIDIA Corporation TU102 High Definition Audio Controller "
    "[10de:10f7] (rev a1)",
    "01:00.2 USB controller [0c03]: NVIDIA Corporation TU102 USB 3.1 Host Controller "
    "[10de:1ad6] (rev a1)",
    "01:00.3 Serial bus controller [0c80]: NVIDIA Corporation TU102 USB Type-C UCSI Controller "
    "[10de:1ad7] (rev a1)",
]) + "\n"

LSPCI_NO_GPU = "\n".join([
    "00:00.0 Host bridge [0600]: Intel Corporation 440FX - 82441FX PMC [Natoma] [8086:1237] "
    "(rev 02)",
    "00:02.0 VGA compatible controller [0300]: Cirrus Logic GD 5446 [1013:00b8]",
    "00:03.0 Ethernet controller [0200]: Amazon.com, Inc. Elastic Network Adapter (ENA) "
    "[1d0f:ec20]",
]) + "\n"

SMI_NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                 "Make sure that the latest NVIDIA driver is installed and running.\n")
SMI_NO_DEVICES = "No devices were found\n"

RUNTIMES_WITH_NVIDIA = json.dumps({
    "io.containerd.runc.v2": {"path": "runc"},
    "nvidia": {"path": "nvidia-container-runtime"},
    "runc": {"path": "runc"},
})
RUNTIMES_PLAIN = json.dumps({"io.containerd.runc.v2": {"path": "runc"}, "runc": {"path": "runc"}})


def probe_output(*, lspci: tuple[int, str] | None = (0, LSPCI_HGX_H100),
                 smi: tuple[int, str] | None = (0, SMI_8X_H100),
                 tools: dict[str, str] | None = None,
                 docker: tuple[int, str] | None = (0, RUNTIMES_WITH_NVIDIA),
                 banner: str = "") -> str:
    """What probe_command() prints on a node, section by section (None: section missing)."""
    tools = {"nvidia-container-runtime": "/usr/bin/nvidia-container-runtime",
             "nvidia-ctk": "/usr/bin/nvidia-ctk"} if tools is None else tools
    out = [banner] if banner else []
    if lspci is not None:
        out += [f"### lspci rc={lspci[0]}", lspci[1].rstrip("\n")]
    if smi is not None:
        out += [f"### nvidia-smi rc={smi[0]}", smi[1].rstrip("\n")]
    out.append("### docker-gpu")
    out += [f"{name}={tools.get(name, '')}" for name in ("nvidia-container-runtime", "nvidia-ctk")]
    if docker is not None:
        out += [f"### docker-info rc={docker[0]}", docker[1].rstrip("\n")]
    return "\n".join(out) + "\n"


def oks(report: AcceleratorReport) -> dict[str, bool | None]:
    return {stage.name: stage.ok for stage in report.stages}


# ---- the commands ------------------------------------------------------------------------------

EXPECTED_PROBE = (
    "sh -c '"
    'export PATH="$PATH:/usr/sbin:/sbin" LC_ALL=C; '
    'out=$(lspci -nn 2>&1); rc=$?; echo "### lspci rc=$rc"; printf "%s\\n" "$out"; '
    "out=$(timeout 20 nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version "
    '--format=csv,noheader,nounits 2>&1); rc=$?; echo "### nvidia-smi rc=$rc"; '
    'printf "%s\\n" "$out"; '
    'echo "### docker-gpu"; '
    'for c in nvidia-container-runtime nvidia-ctk; do echo "$c=$(command -v $c)"; done; '
    'out=$(timeout 20 docker info --format "{{json .Runtimes}}" 2>&1); rc=$?; '
    'echo "### docker-info rc=$rc"; printf "%s\\n" "$out"'
    "'"
)


def test_command_constants():
    assert LSPCI_COMMAND == "lspci -nn"
    assert NVIDIA_SMI_COMMAND == ("nvidia-smi --query-gpu=index,name,uuid,memory.total,"
                                  "driver_version --format=csv,noheader,nounits")


def test_probe_command_exact_string():
    assert probe_command() == EXPECTED_PROBE


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _printf_lines(text: str) -> str:
    return "\n".join(f"printf '%s\\n' '{line}'" for line in text.splitlines())


def _run_probe(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run the probe as SSH would (a shell given the command string) with only bin_dir on PATH
    plus sh and timeout; /usr/sbin and /sbin, which the probe appends, hold none of the tools."""
    for tool in ("sh", "timeout"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return subprocess.run(probe_command(), shell=True, capture_output=True, text=True,
                          env={"PATH": str(bin_dir)}, timeout=60, check=False)


@pytest.fixture
def bin_dir(tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    return path


def test_probe_runs_under_sh_on_a_healthy_node(bin_dir):
    _stub(bin_dir, "lspci", f'[ "$*" = "-nn" ] || exit 3\n{_printf_lines(LSPCI_HGX_H100)}')
    _stub(bin_dir, "nvidia-smi",
          f'[ "$*" = "{NVIDIA_SMI_COMMAND.removeprefix("nvidia-smi ")}" ] || exit 3\n'
          f"{_printf_lines(SMI_8X_H100)}")
    _stub(bin_dir, "nvidia-ctk", "exit 0")
    _stub(bin_dir, "docker", '[ "$*" = "info --format {{json .Runtimes}}" ] || exit 3\n'
                             f"printf '%s\\n' '{RUNTIMES_WITH_NVIDIA}'")

    result = _run_probe(bin_dir)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = detect(result.stdout)
    assert oks(report) == {STAGE_DEVICE: True, STAGE_DRIVER: True, STAGE_RUNTIME: True}
    assert report.count == 8
    assert f"nvidia-ctk={bin_dir}/nvidia-ctk" in result.stdout.splitlines()
    assert "nvidia-container-runtime=" in result.stdout.splitlines()


def test_probe_runs_every_stage_after_failures_and_captures_stderr(bin_dir):
    _stub(bin_dir, "lspci", _printf_lines(LSPCI_HGX_H100))
    _stub(bin_dir, "nvidia-smi", f"printf '%s\\n' \"{SMI_NO_DRIVER.strip()}\" >&2\nexit 9")
    # no nvidia-ctk, no nvidia-container-runtime, no docker

    result = _run_probe(bin_dir)

    lines = result.stdout.splitlines()
    headers = [line for line in lines if line.startswith("### ")]
    assert headers == ["### lspci rc=0", "### nvidia-smi rc=9", "### docker-gpu",
                       "### docker-info rc=127"]
    assert SMI_NO_DRIVER.strip() in lines  # stderr of nvidia-smi, captured
    assert "nvidia-container-runtime=" in lines and "nvidia-ctk=" in lines
    report = detect(result.stdout)
    assert report.count == 0
    assert oks(report) == {STAGE_DEVICE: True, STAGE_DRIVER: False, STAGE_RUNTIME: False}
    assert "couldn't communicate with the NVIDIA driver" in report.stage(STAGE_DRIVER).message
    assert "docker info is not installed (rc=127)" in report.stage(STAGE_RUNTIME).message


def test_probe_on_a_node_without_any_of_the_tools(bin_dir):
    result = _run_probe(bin_dir)

    headers = [line for line in result.stdout.splitlines() if line.startswith("### ")]
    assert headers == ["### lspci rc=127", "### nvidia-smi rc=127", "### docker-gpu",
                       "### docker-info rc=127"]
    report = detect(result.stdout)
    assert report.count == 0 and report.vendor is None
    assert oks(report) == {STAGE_DEVICE: None, STAGE_DRIVER: None, STAGE_RUNTIME: None}
    assert "lspci is not installed" in report.stage(STAGE_DEVICE).message


# ---- parse_lspci -------------------------------------------------------------------------------


def test_parse_lspci_hgx_h100_keeps_the_eight_gpus_only():
    devices = parse_lspci(LSPCI_HGX_H100)

    assert [d.slot for d in devices] == H100_SLOTS
    assert devices[0] == PciDevice(
        slot="18:00.0", class_id="0302", class_name="3D controller", vendor_id="10de",
        device_id="2330", description="NVIDIA Corporation GH100 [H100 SXM5 80GB]", revision="a1")
    assert {d.vendor for d in devices} == {"nvidia"}
    assert {d.model for d in devices} == {"H100 SXM5 80GB"}


def test_parse_lspci_amd_mi210():
    (device,) = parse_lspci(LSPCI_MI210)

    assert (device.slot, device.class_id, device.vendor_id, device.device_id) == (
        "c1:00.0", "0380", "1002", "740f")
    assert device.vendor == "amd"
    assert device.model == "Instinct MI210"
    assert device.revision == "02"


def test_parse_lspci_skips_other_vendors_and_non_gpu_functions_of_nvidia_cards():
    (device,) = parse_lspci(LSPCI_DESKTOP)

    assert (device.slot, device.class_id, device.model) == (
        "01:00.0", "0300", "GeForce RTX 2080 Ti Rev. A")
    assert parse_lspci(LSPCI_NO_GPU) == []


def test_parse_lspci_processing_accelerator_domain_slot_and_unknown_name():
    text = (
        "0000:05:00.0 Processing accelerators [1200]: Advanced Micro Devices, Inc. [AMD/ATI] "
        "Aqua Vanjaram [Instinct MI300X] [1002:74a1]\n"
        "0001:01:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:2901] (rev a1)\n"
    )
    mi300, unknown = parse_lspci(text)

    assert (mi300.slot, mi300.class_id, mi300.model, mi300.revision) == (
        "0000:05:00.0", "1200", "Instinct MI300X", None)
    # A device newer than the node's pci.ids has no name: the description stands in.
    assert unknown.model == "NVIDIA Corporation Device"
    assert unknown.device_id == "2901"


@pytest.mark.parametrize("text", [
    "",
    "pcilib: Cannot open /proc/bus/pci\nlspci: Cannot find any working access method.\n",
    "18:00.0 3D controller: NVIDIA Corporation GH100 [H100 SXM5 80GB] (rev a1)\n",  # no -nn
    "3D controller [0302]: NVIDIA Corporation GH100 [10de:2330]\n",  # no slot
    "18:00.0 3D controller [0302]: NVIDIA Corporation GH100 [10de:zz30] (rev a1)\n",
], ids=["empty", "error", "without -nn", "no slot", "bad id"])
def test_parse_lspci_garbage_gives_nothing(text):
    assert parse_lspci(text) == []


# ---- parse_nvidia_smi --------------------------------------------------------------------------


def test_parse_nvidia_smi_8x_h100():
    gpus = parse_nvidia_smi(SMI_8X_H100, 0)

    assert len(gpus) == 8
    assert gpus[0] == Gpu(index=0, name="NVIDIA H100 80GB HBM3", uuid=H100_UUIDS[0],
                          memory_mib=81559, driver_version="550.54.15")
    assert [g.index for g in gpus] == list(range(8))
    assert [g.uuid for g in gpus] == H100_UUIDS


@pytest.mark.parametrize(("text", "returncode"), [
    ("", 0),
    ("\n\n", 0),
    (SMI_NO_DEVICES, 6),
    (SMI_NO_DEVICES, 0),
    (SMI_NO_DRIVER, 9),
    (SMI_NO_DRIVER, 0),
    ("timeout: failed to run command 'nvidia-smi': No such file or directory\n", 127),
    ("", 124),
    # A non-zero exit code voids the listing, however well formed (a lost GPU does this).
    (SMI_8X_H100, 15),
], ids=["empty", "blank lines", "no devices rc=6", "no devices rc=0", "no driver rc=9",
        "no driver rc=0", "not installed", "timed out", "valid lines rc=15"])
def test_parse_nvidia_smi_failures_never_count(text, returncode):
    assert parse_nvidia_smi(text, returncode) == []


def test_parse_nvidia_smi_keeps_only_lines_that_parse():
    first, second = SMI_8X_H100.splitlines()[:2]
    text = "\n".join([
        "index, name, uuid, memory.total [MiB], driver_version",  # a header (noheader forgotten)
        first,
        "Unable to determine the device handle for GPU0000:2A:00.0: Unknown Error",
        "1, NVIDIA H100 80GB HBM3, GPU-1f0e2d3c, 81559",  # 4 fields
        "1, NVIDIA H100 80GB HBM3, GPU-1f0e2d3c, 81559, 550.54.15, extra",  # 6 fields
        "x, NVIDIA H100 80GB HBM3, GPU-1f0e2d3c, 81559, 550.54.15",  # index not a number
        "1, NVIDIA H100 80GB HBM3, 1f0e2d3c, 81559, 550.54.15",  # uuid without GPU-
        "1, NVIDIA H100 80GB HBM3, GPU-, 81559, 550.54.15",  # empty uuid
        "1, , GPU-1f0e2d3c, 81559, 550.54.15",  # no name
        "1, NVIDIA H100 80GB HBM3, GPU-1f0e2d3c, 80 GiB, 550.54.15",  # memory with units
        "1, NVIDIA H100 80GB HBM3, GPU-1f0e2d3c, 81559, [N/A]",  # no driver version
        first,  # the same GPU twice
        second,
        "ÿþ\x00garbage",
    ])
    gpus = parse_nvidia_smi(text, 0)

    assert [g.uuid for g in gpus] == H100_UUIDS[:2]


def test_parse_nvidia_smi_memory_not_available():
    (gpu,) = parse_nvidia_smi("0, NVIDIA GH200 480GB, GPU-abc, [N/A], 560.35.03\n", 0)
    assert gpu.memory_mib is None


# ---- detect: the combined probe ----------------------------------------------------------------


def test_detect_8x_h100_healthy():
    report = detect(probe_output())

    assert report.vendor == "nvidia"
    assert report.count == 8
    assert report.models == {"NVIDIA H100 80GB HBM3": 8}
    assert report.gpu_memory_mib == 81559
    assert len(report.devices) == 8
    assert oks(report) == {STAGE_DEVICE: True, STAGE_DRIVER: True, STAGE_RUNTIME: True}
    assert report.ok and report.problems == []
    assert "8 GPUs: 8 x H100 SXM5 80GB" in report.stage(STAGE_DEVICE).message
    assert "driver 550.54.15" in report.stage(STAGE_DRIVER).message
    assert "nvidia-container-runtime" in report.stage(STAGE_RUNTIME).message


def test_to_dict_is_json_friendly_with_stable_keys():
    data = detect(probe_output()).to_dict()

    assert json.loads(json.dumps(data)) == data
    assert {"vendor", "count", "models", "gpus", "stages"} <= set(data)
    assert data["vendor"] == "nvidia" and data["count"] == 8
    assert data["models"] == {"NVIDIA H100 80GB HBM3": 8}
    assert data["gpus"][3] == {"index": 3, "name": "NVIDIA H100 80GB HBM3",
                               "uuid": H100_UUIDS[3], "memory_mib": 81559,
                               "driver_version": "550.54.15"}
    assert set(data["stages"]) == {STAGE_DEVICE, STAGE_DRIVER, STAGE_RUNTIME}
    assert data["stages"][STAGE_DRIVER]["ok"] is True
    assert isinstance(data["stages"][STAGE_DRIVER]["message"], str)
    assert data["devices"][0]["model"] == "H100 SXM5 80GB"


def test_detect_amd_mi210():
    report = detect(probe_output(lspci=(0, LSPCI_MI210), smi=(127, "timeout: failed to run "
                                 "command 'nvidia-smi': No such file or directory"), tools={},
                                 docker=(127, "sh: 1: docker: not found")))

    assert report.vendor == "amd"
    assert report.count == 0
    assert report.models == {}
    assert [d.model for d in report.devices] == ["Instinct MI210"]
    assert oks(report) == {STAGE_DEVICE: True, STAGE_DRIVER: None, STAGE_RUNTIME: None}
    assert "1 AMD GPU present" in report.stage(STAGE_DRIVER).message
    assert report.ok


def test_detect_no_gpu():
    report = detect(probe_output(lspci=(0, LSPCI_NO_GPU), smi=(127, ""), tools={},
                                 docker=(0, RUNTIMES_PLAIN)))

    assert report.vendor is None
    assert report.count == 0
    assert report.gpus == () and report.devices == () and report.models == {}
    assert oks(report) == {STAGE_DEVICE: False, STAGE_DRIVER: None, STAGE_RUNTIME: None}
    assert report.stage(STAGE_DEVICE).message == "no NVIDIA or AMD GPU: lspci shows none"


def test_detect_driver_missing_counts_zero_and_says_why():
    report = detect(probe_output(smi=(9, SMI_NO_DRIVER)))

    assert report.vendor == "nvidia"
    assert report.count == 0
    assert report.models == {} and report.gpus == ()
    assert len(report.devices) == 8  # what lspci saw is kept
    assert oks(report)[STAGE_DEVICE] is True
    driver = report.stage(STAGE_DRIVER)
    assert driver.ok is False
    assert driver.message.startswith(
        "8 NVIDIA GPUs present but the driver is not working, so none is usable: "
        "nvidia-smi failed (rc=9): NVIDIA-SMI has failed because it couldn't communicate")
    assert not report.ok and driver.message in report.problems


@pytest.mark.parametrize(("smi", "reason"), [
    ((0, ""), "nvidia-smi exited 0 but printed nothing"),
    ((0, "\n"), "nvidia-smi exited 0 but printed nothing"),
    ((0, "garbage\n0, NVIDIA H100, GPU-x\n"), "nvidia-smi printed nothing that parses: 'garbage'"),
    ((6, SMI_NO_DEVICES), "nvidia-smi failed (rc=6): No devices were found"),
    ((127, "sh: 1: nvidia-smi: not found"), "nvidia-smi is not installed (rc=127)"),
    ((124, ""), "nvidia-smi timed out after 20 s (rc=124)"),
    ((15, SMI_8X_H100), "nvidia-smi failed (rc=15): 0, NVIDIA H100 80GB HBM3"),
    (None, "the probe printed no nvidia-smi section"),
], ids=["rc0 empty", "rc0 blank", "rc0 garbage", "no devices", "not installed", "timed out",
        "rc15 with lines", "section missing"])
def test_detect_driver_stage_failures(smi, reason):
    report = detect(probe_output(smi=smi))

    assert report.count == 0
    assert report.stage(STAGE_DRIVER).ok is False
    assert reason in report.stage(STAGE_DRIVER).message


def test_detect_fewer_gpus_than_lspci_fails_the_driver_stage_but_counts_the_usable():
    seven = "".join(SMI_8X_H100.splitlines(keepends=True)[:7])
    report = detect(probe_output(smi=(0, seven)))

    assert report.count == 7
    assert report.models == {"NVIDIA H100 80GB HBM3": 7}
    driver = report.stage(STAGE_DRIVER)
    assert driver.ok is False
    assert "lspci shows 8 NVIDIA GPUs but nvidia-smi lists 7 GPUs" in driver.message


def test_detect_without_lspci_trusts_nvidia_smi():
    report = detect(probe_output(lspci=(127, "sh: 1: lspci: not found")))

    assert report.count == 8 and report.vendor == "nvidia"
    assert oks(report) == {STAGE_DEVICE: True, STAGE_DRIVER: True, STAGE_RUNTIME: True}
    assert "lspci is not installed" in report.stage(STAGE_DEVICE).message


def test_detect_without_lspci_and_a_failing_driver():
    report = detect(probe_output(lspci=(127, "sh: 1: lspci: not found"), smi=(9, SMI_NO_DRIVER)))

    assert report.count == 0
    assert oks(report)[STAGE_DEVICE] is None
    assert oks(report)[STAGE_DRIVER] is False
    assert "couldn't communicate" in report.stage(STAGE_DRIVER).message


@pytest.mark.parametrize(("tools", "docker", "reason"), [
    ({"nvidia-ctk": "/usr/bin/nvidia-ctk"}, (0, RUNTIMES_PLAIN),
     "docker has no nvidia runtime but the NVIDIA Container Toolkit is installed (nvidia-ctk at "
     "/usr/bin/nvidia-ctk): run `nvidia-ctk runtime configure --runtime=docker` and restart"),
    ({}, (0, RUNTIMES_PLAIN),
     "docker has no nvidia runtime and the NVIDIA Container Toolkit is not installed"),
    ({}, (127, "sh: 1: docker: not found"), "docker info is not installed (rc=127)"),
    ({}, (1, "null\nCannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the "
             "docker daemon running?"),
     "docker info failed (rc=1): Cannot connect to the Docker daemon"),
    ({}, (124, ""), "docker info timed out after 20 s"),
    ({}, (0, "not json"), "docker has no nvidia runtime"),
    ({}, None, "the probe printed no docker info section"),
], ids=["toolkit not configured", "no toolkit", "no docker", "daemon down", "timed out",
        "bad json", "section missing"])
def test_detect_container_runtime_failures(tools, docker, reason):
    report = detect(probe_output(tools=tools, docker=docker))

    assert report.count == 8  # the runtime does not change what the driver sees
    runtime = report.stage(STAGE_RUNTIME)
    assert runtime.ok is False
    assert reason in runtime.message


def test_detect_runtime_found_by_path_under_another_name():
    runtimes = json.dumps({"runc": {"path": "runc"},
                           "nv": {"path": "/usr/local/bin/nvidia-container-runtime"}})
    report = detect(probe_output(docker=(0, runtimes)))

    assert report.stage(STAGE_RUNTIME).ok is True
    assert "/usr/local/bin/nvidia-container-runtime" in report.stage(STAGE_RUNTIME).message


def test_detect_ignores_a_login_banner_and_tolerates_empty_or_foreign_text():
    banner = "Welcome to Ubuntu 22.04.4 LTS\n0, NVIDIA H100 80GB HBM3, GPU-fake, 81559, 550.54.15"
    report = detect(probe_output(banner=banner))
    assert report.count == 8
    assert "GPU-fake" not in {gpu.uuid for gpu in report.gpus}

    for text in ("", "Permission denied (publickey).\n", SMI_8X_H100):
        report = detect(text)
        assert report.count == 0 and report.vendor is None
        assert oks(report) == {STAGE_DEVICE: None, STAGE_DRIVER: None, STAGE_RUNTIME: None}
        assert "no lspci section" in report.stage(STAGE_DEVICE).message


def test_dataclasses_are_frozen():
    report = detect(probe_output())
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.count = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.gpus[0].name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.stages[0].ok = False  # type: ignore[misc]
    assert isinstance(report.stages[0], Stage)
    with pytest.raises(KeyError):
        report.stage("nope")


# ---- Kubernetes node labels --------------------------------------------------------------------

GFD_H100_LABELS = {
    "kubernetes.io/hostname": "gpu-node-1",
    "feature.node.kubernetes.io/pci-10de.present": "true",
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.count": "8",
    "nvidia.com/gpu.memory": "81559",
}
NODE_ALLOCATABLE = {"cpu": "191", "memory": "2113477180Ki", "pods": "110"}


def test_labels_gpu_operator_node_with_allocatable():
    report = from_node_labels(GFD_H100_LABELS, {**NODE_ALLOCATABLE, "nvidia.com/gpu": "8"})

    assert report.vendor == "nvidia"
    assert report.count == 8
    assert report.models == {"NVIDIA-H100-80GB-HBM3": 8}
    assert report.gpu_memory_mib == 81559
    assert report.source == "node-labels"
    assert oks(report) == {STAGE_DEVICE: True, STAGE_DRIVER: True, STAGE_RUNTIME: True}
    assert "advertises 8 allocatable nvidia.com/gpu" in report.stage(STAGE_DRIVER).message
    assert json.loads(json.dumps(report.to_dict()))["count"] == 8


def test_labels_count_is_what_the_scheduler_can_give_not_the_label():
    report = from_node_labels(GFD_H100_LABELS, {**NODE_ALLOCATABLE, "nvidia.com/gpu": "6"})

    assert report.count == 6
    assert report.models == {"NVIDIA-H100-80GB-HBM3": 6}
    assert "nvidia.com/gpu.count says 8" in report.stage(STAGE_DRIVER).message


def test_labels_allocatable_zero_fails_the_driver_stage():
    report = from_node_labels(GFD_H100_LABELS, {**NODE_ALLOCATABLE, "nvidia.com/gpu": "0"})

    assert report.count == 0
    assert report.models == {}
    assert oks(report) == {STAGE_DEVICE: True, STAGE_DRIVER: False, STAGE_RUNTIME: None}
    assert "allocatable nvidia.com/gpu is 0" in report.stage(STAGE_DRIVER).message


@pytest.mark.parametrize("allocatable", [None, {}, NODE_ALLOCATABLE],
                         ids=["none", "empty", "no gpu entry"])
def test_labels_fall_back_to_gpu_count_when_allocatable_is_absent(allocatable):
    report = from_node_labels(GFD_H100_LABELS, allocatable)

    assert report.count == 8
    driver = report.stage(STAGE_DRIVER)
    assert driver.ok is True
    assert "no allocatable nvidia.com/gpu" in driver.message
    assert "count 8 taken from the nvidia.com/gpu.count label" in driver.message
    assert report.stage(STAGE_RUNTIME).ok is None


@pytest.mark.parametrize("label", [
    "feature.node.kubernetes.io/pci-10de.present",
    "feature.node.kubernetes.io/pci-0302_10de.present",
    "feature.node.kubernetes.io/pci-0300_10de.present",
    "nvidia.com/gpu.present",
])
def test_labels_device_present_without_driver(label):
    report = from_node_labels({label: "true"}, NODE_ALLOCATABLE)

    assert report.vendor == "nvidia"
    assert report.count == 0
    assert oks(report) == {STAGE_DEVICE: True, STAGE_DRIVER: False, STAGE_RUNTIME: None}
    assert label in report.stage(STAGE_DEVICE).message
    assert "no allocatable nvidia.com/gpu and no nvidia.com/gpu.count label" in (
        report.stage(STAGE_DRIVER).message)


@pytest.mark.parametrize("labels", [
    {},
    {"kubernetes.io/arch": "amd64"},
    {"feature.node.kubernetes.io/pci-10de.present": "false"},
    {"nvidia.com/gpu.present": "false"},
    # NVIDIA audio function, a Mellanox NIC, an Intel iGPU: not NVIDIA/AMD GPUs.
    {"feature.node.kubernetes.io/pci-0403_10de.present": "true",
     "feature.node.kubernetes.io/pci-0207_15b3.present": "true",
     "feature.node.kubernetes.io/pci-0300_8086.present": "true"},
], ids=["none", "unrelated", "nfd false", "operator false", "other classes and vendors"])
def test_labels_no_gpu(labels):
    report = from_node_labels(labels, NODE_ALLOCATABLE)

    assert report.vendor is None and report.count == 0 and report.models == {}
    assert oks(report) == {STAGE_DEVICE: False, STAGE_DRIVER: None, STAGE_RUNTIME: None}


def test_labels_amd_node():
    labels = {"feature.node.kubernetes.io/pci-0380_1002.present": "true"}

    report = from_node_labels(labels, {**NODE_ALLOCATABLE, "amd.com/gpu": "4"})
    assert report.vendor == "amd" and report.count == 4
    assert oks(report) == {STAGE_DEVICE: True, STAGE_DRIVER: True, STAGE_RUNTIME: None}

    broken = from_node_labels(labels, NODE_ALLOCATABLE)
    assert broken.vendor == "amd" and broken.count == 0
    assert broken.stage(STAGE_DRIVER).ok is False
    assert "no allocatable amd.com/gpu" in broken.stage(STAGE_DRIVER).message


def test_labels_garbage_numbers_are_ignored():
    labels = {**GFD_H100_LABELS, "nvidia.com/gpu.count": "eight", "nvidia.com/gpu.memory": "80G"}
    report = from_node_labels(labels, {"nvidia.com/gpu": "many"})

    assert report.count == 0
    assert report.gpu_memory_mib is None
    assert report.stage(STAGE_DRIVER).ok is False
