"""The accelerator inventory of a node: parse what node commands print, no I/O here.

A backend runs :func:`probe_command` on a node (one SSH round trip) and hands the text to
:func:`detect`; a Kubernetes backend hands a node's labels and allocatable to
:func:`from_node_labels`. Both return an :class:`AcceleratorReport`, stored through
:meth:`AcceleratorReport.to_dict` (keys ``vendor``, ``count``, ``models``, ``gpus``, ``stages``,
``devices``, ``gpu_memory_mib``, ``source``).

The report walks three stages, each ``ok`` True, False, or None (not applicable, or not
determinable), with a message for a person:

``device_present``
    Is an NVIDIA or AMD GPU on the PCI bus? ``lspci -nn`` shows vendor ``[10de:....]`` or
    ``[1002:....]`` even when no driver is loaded, so it tells "no GPU here" apart from "GPU here,
    driver broken".
``driver_ok``
    Does ``nvidia-smi`` list the GPUs, as many as ``lspci`` shows? Fewer means a GPU has fallen
    off the bus or is bound to another driver (vfio-pci, nouveau): False, naming both numbers.
    The probe checks only the NVIDIA driver: for AMD devices this stage is None.
``container_runtime_ok``
    Can containers get the GPUs: does ``docker info`` list an ``nvidia`` runtime? The message
    says whether the NVIDIA Container Toolkit is installed but not configured, or missing.

``count`` is the number of *usable* GPUs, the ones ``nvidia-smi`` lists, so it is 0 when the
driver is not working even if ``lspci`` shows eight devices. An empty ``nvidia-smi`` output, a
non-zero exit code, "No devices were found", "NVIDIA-SMI has failed because it couldn't
communicate with the NVIDIA driver" or a line that does not parse never counts as a GPU: a node
whose driver is broken must not be offered to a scheduler as a GPU node, and the text of the
failure goes into the ``driver_ok`` message instead.

On Kubernetes the count is what the scheduler can give (allocatable ``nvidia.com/gpu`` or
``amd.com/gpu``); only when the node has no such allocatable entry does it fall back to the GPU
feature discovery label ``nvidia.com/gpu.count``, and the ``driver_ok`` message says so.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

LSPCI_COMMAND = "lspci -nn"
NVIDIA_SMI_COMMAND = (
    "nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version "
    "--format=csv,noheader,nounits"
)
# A wedged driver makes nvidia-smi (and a docker daemon waiting on it) hang for minutes.
PROBE_TIMEOUT_S = 20
# Binaries the probe reports as present or not in its docker-gpu section.
RUNTIME_TOOLS = ("nvidia-container-runtime", "nvidia-ctk")

NVIDIA = "nvidia"
AMD = "amd"
MIXED = "mixed"
VENDOR_IDS = {"10de": NVIDIA, "1002": AMD}
_VENDOR_NAMES = {NVIDIA: "NVIDIA", AMD: "AMD"}
# PCI classes of a GPU: VGA, 3D and display controllers, and "processing accelerators" (1200,
# where AMD Instinct MI300 sits). NVIDIA audio (0403), USB (0c03), UCSI (0c80) functions of a
# card and NVSwitch bridges (0680) are left out.
GPU_CLASSES = frozenset({"0300", "0302", "0380", "1200"})

STAGE_DEVICE = "device_present"
STAGE_DRIVER = "driver_ok"
STAGE_RUNTIME = "container_runtime_ok"

SECTION_LSPCI = "lspci"
SECTION_NVIDIA_SMI = "nvidia-smi"
SECTION_DOCKER_GPU = "docker-gpu"
SECTION_DOCKER_INFO = "docker-info"
RC_NOT_FOUND = 127  # what sh (and timeout) return for a command that is not on PATH
RC_TIMED_OUT = 124  # what timeout returns when it had to stop the command

SOURCE_PROBE = "probe"
SOURCE_NODE_LABELS = "node-labels"


@dataclass(frozen=True)
class PciDevice:
    """One GPU function from ``lspci -nn``."""

    slot: str
    class_id: str
    class_name: str
    vendor_id: str
    device_id: str
    description: str
    revision: str | None = None

    @property
    def vendor(self) -> str:
        return VENDOR_IDS[self.vendor_id]

    @property
    def model(self) -> str:
        """The marketing name pci.ids gives in the last brackets ("H100 SXM5 80GB"), else the
        whole description (a device newer than the node's pci.ids shows as "Device 2330")."""
        names = re.findall(r"\[([^\[\]]+)\]", self.description)
        return names[-1] if names else self.description

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "vendor": self.vendor, "vendor_id": self.vendor_id,
                "device_id": self.device_id, "class_id": self.class_id, "model": self.model}


@dataclass(frozen=True)
class Gpu:
    """One GPU as ``nvidia-smi --query-gpu`` lists it; ``memory_mib`` is None when the driver
    reports it as ``[N/A]``."""

    index: int
    name: str
    uuid: str
    memory_mib: int | None
    driver_version: str


@dataclass(frozen=True)
class Stage:
    """One step of detection: ``ok`` is True, False, or None (not applicable / undeterminable)."""

    name: str
    ok: bool | None
    message: str


@dataclass(frozen=True)
class AcceleratorReport:
    vendor: str | None
    count: int
    stages: tuple[Stage, ...]
    gpus: tuple[Gpu, ...] = ()
    devices: tuple[PciDevice, ...] = ()
    models: Mapping[str, int] = field(default_factory=dict)
    gpu_memory_mib: int | None = None
    source: str = SOURCE_PROBE

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @property
    def ok(self) -> bool:
        """No stage failed (a stage that does not apply does not fail)."""
        return all(stage.ok is not False for stage in self.stages)

    @property
    def problems(self) -> list[str]:
        return [stage.message for stage in self.stages if stage.ok is False]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, for the store. Key names are stable."""
        return {
            "vendor": self.vendor,
            "count": self.count,
            "models": dict(self.models),
            "gpus": [asdict(gpu) for gpu in self.gpus],
            "stages": {s.name: {"ok": s.ok, "message": s.message} for s in self.stages},
            "devices": [device.to_dict() for device in self.devices],
            "gpu_memory_mib": self.gpu_memory_mib,
            "source": self.source,
        }


# ---- the probe ---------------------------------------------------------------------------------


def _captured(section: str, command: str) -> str:
    # `out=$(cmd)` keeps cmd's exit status (POSIX), so the header can carry it; stderr is
    # captured with stdout so the reason for a failure reaches the report.
    return (f'out=$({command} 2>&1); rc=$?; echo "### {section} rc=$rc"; '
            'printf "%s\\n" "$out"')


def probe_command() -> str:
    """One POSIX sh command for one SSH round trip: lspci, nvidia-smi and the container runtime.

    Each stage prints a ``### <section> rc=<exit code>`` line, then its output (stderr
    included). Every stage runs whatever the earlier ones did; a command that is not installed
    gives rc=127 and a timed-out one rc=124. It is wrapped in ``sh -c`` because SSH runs a
    command through the user's login shell, which may not be a POSIX shell, and extends PATH
    with the sbin directories a non-login SSH session lacks (lspci lives in /usr/sbin on RHEL).
    """
    script = "; ".join([
        'export PATH="$PATH:/usr/sbin:/sbin" LC_ALL=C',
        _captured(SECTION_LSPCI, LSPCI_COMMAND),
        _captured(SECTION_NVIDIA_SMI, f"timeout {PROBE_TIMEOUT_S} {NVIDIA_SMI_COMMAND}"),
        f'echo "### {SECTION_DOCKER_GPU}"',
        f'for c in {" ".join(RUNTIME_TOOLS)}; do echo "$c=$(command -v $c)"; done',
        _captured(SECTION_DOCKER_INFO,
                  f'timeout {PROBE_TIMEOUT_S} docker info --format "{{{{json .Runtimes}}}}"'),
    ])
    return f"sh -c {shlex.quote(script)}"


@dataclass(frozen=True)
class _Section:
    rc: int | None
    text: str


_HEADER = re.compile(r"^### (?P<name>[a-z][a-z0-9-]*)(?: rc=(?P<rc>\d+))?\s*$")


def _sections(probe_output: str) -> dict[str, _Section]:
    """Split the probe output at its ``###`` lines; text before the first (a login banner) is
    dropped, and a section printed twice keeps its first copy."""
    sections: dict[str, _Section] = {}
    name: str | None = None
    rc: int | None = None
    lines: list[str] = []

    def close() -> None:
        if name is not None and name not in sections:
            sections[name] = _Section(rc, "\n".join(lines))

    for line in probe_output.splitlines():
        match = _HEADER.match(line)
        if match:
            close()
            name, lines = match["name"], []
            rc = int(match["rc"]) if match["rc"] is not None else None
        elif name is not None:
            lines.append(line)
    close()
    return sections


# ---- parsers -----------------------------------------------------------------------------------

_LSPCI_LINE = re.compile(
    r"^(?P<slot>(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\s+"
    r"(?P<class_name>[^\[]*?)\s*\[(?P<class_id>[0-9a-f]{4})\]:\s+"
    r"(?P<description>.*?)\s*\[(?P<vendor_id>[0-9a-f]{4}):(?P<device_id>[0-9a-f]{4})\]"
    r"(?:\s+\(rev (?P<revision>[0-9a-f]+)\))?(?:\s+\(prog-if [^)]*\))?\s*$",
    re.IGNORECASE,
)


def parse_lspci(text: str) -> list[PciDevice]:
    """The NVIDIA and AMD GPUs in ``lspci -nn`` output; other vendors, other classes of an
    NVIDIA or AMD card (audio, USB) and lines that do not parse are left out."""
    devices = []
    for line in text.splitlines():
        match = _LSPCI_LINE.match(line.strip())
        if not match:
            continue
        vendor_id, class_id = match["vendor_id"].lower(), match["class_id"].lower()
        if vendor_id not in VENDOR_IDS or class_id not in GPU_CLASSES:
            continue
        devices.append(PciDevice(
            slot=match["slot"].lower(), class_id=class_id, class_name=match["class_name"],
            vendor_id=vendor_id, device_id=match["device_id"].lower(),
            description=match["description"],
            revision=match["revision"].lower() if match["revision"] else None))
    return devices


_NOT_AVAILABLE = frozenset({"[N/A]", "[Not Supported]"})
_DRIVER_VERSION = re.compile(r"^\d+(\.\d+)+$")


def _parse_gpu_line(line: str) -> Gpu | None:
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != 5:
        return None
    index, name, uuid, memory, driver_version = fields
    if not index.isdigit() or not name or not uuid.startswith("GPU-") or len(uuid) <= 4:
        return None
    if not _DRIVER_VERSION.match(driver_version):
        return None
    if memory in _NOT_AVAILABLE:
        memory_mib = None
    elif memory.isdigit():
        memory_mib = int(memory)
    else:
        return None
    return Gpu(index=int(index), name=name, uuid=uuid, memory_mib=memory_mib,
               driver_version=driver_version)


def parse_nvidia_smi(text: str, returncode: int) -> list[Gpu]:
    """The GPUs in ``nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version
    --format=csv,noheader,nounits`` output. A non-zero exit code gives [] whatever was printed
    (nvidia-smi exits non-zero when any GPU is lost); so do error text and malformed lines. A
    UUID listed twice counts once."""
    if returncode != 0:
        return []
    gpus: list[Gpu] = []
    seen: set[str] = set()
    for line in text.splitlines():
        gpu = _parse_gpu_line(line)
        if gpu is not None and gpu.uuid not in seen:
            seen.add(gpu.uuid)
            gpus.append(gpu)
    return gpus


# ---- the probe report --------------------------------------------------------------------------


def _first_line(text: str) -> str:
    # docker info prints "null" for the unset template before its error message.
    return next((line.strip() for line in text.splitlines()
                 if line.strip() and line.strip() != "null"), "")


def _failure(command: str, section: _Section | None) -> str:
    """Why a probed command gave nothing usable, for a stage message."""
    if section is None:
        return f"the probe printed no {command} section (output cut short?)"
    if section.rc == RC_NOT_FOUND:
        return f"{command} is not installed (rc={RC_NOT_FOUND})"
    if section.rc == RC_TIMED_OUT:
        return f"{command} timed out after {PROBE_TIMEOUT_S} s (rc={RC_TIMED_OUT})"
    first = _first_line(section.text)
    if section.rc != 0:
        return f"{command} failed (rc={section.rc})" + (f": {first}" if first else "")
    if not first:
        return f"{command} exited 0 but printed nothing"
    return f"{command} printed nothing that parses: {first!r}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _vendor(vendors: Iterable[str]) -> str | None:
    found = set(vendors)
    if not found:
        return None
    return found.pop() if len(found) == 1 else MIXED


def _summary(devices: Iterable[PciDevice]) -> str:
    return ", ".join(f"{n} x {model}" for model, n in Counter(d.model for d in devices).items())


def _device_stage(devices: list[PciDevice], gpus: list[Gpu],
                  lspci: _Section | None) -> Stage:
    lspci_ok = lspci is not None and lspci.rc == 0
    if devices:
        return Stage(STAGE_DEVICE, True,
                     f"lspci shows {_plural(len(devices), 'GPU')}: {_summary(devices)}")
    if gpus:
        seen = "no NVIDIA GPU" if lspci_ok else _failure("lspci", lspci)
        return Stage(STAGE_DEVICE, True,
                     f"nvidia-smi lists {_plural(len(gpus), 'GPU')} (lspci: {seen})")
    if lspci_ok:
        return Stage(STAGE_DEVICE, False, "no NVIDIA or AMD GPU: lspci shows none")
    return Stage(STAGE_DEVICE, None,
                 f"cannot tell whether a GPU is present: {_failure('lspci', lspci)} and "
                 "nvidia-smi lists no GPU (lspci comes with the pciutils package)")


def _driver_stage(nvidia_devices: list[PciDevice], amd_devices: list[PciDevice],
                  gpus: list[Gpu], smi: _Section | None, presence: bool | None) -> Stage:
    if gpus:
        drivers = ", ".join(sorted({gpu.driver_version for gpu in gpus}))
        listed = f"nvidia-smi lists {_plural(len(gpus), 'GPU')} (driver {drivers})"
        if len(gpus) < len(nvidia_devices):
            return Stage(STAGE_DRIVER, False,
                         f"lspci shows {_plural(len(nvidia_devices), 'NVIDIA GPU')} but {listed}: "
                         "the others have fallen off the bus or are bound to another driver")
        return Stage(STAGE_DRIVER, True, listed)
    if nvidia_devices:
        return Stage(STAGE_DRIVER, False,
                     f"{_plural(len(nvidia_devices), 'NVIDIA GPU')} present but the driver is not "
                     f"working, so none is usable: {_failure('nvidia-smi', smi)}")
    if amd_devices:
        return Stage(STAGE_DRIVER, None,
                     f"{_plural(len(amd_devices), 'AMD GPU')} present; the probe checks only the "
                     "NVIDIA driver, so none is counted as usable")
    if presence is None and smi is not None and smi.rc != RC_NOT_FOUND:
        # No lspci to tell, but nvidia-smi is installed and fails: a broken NVIDIA setup.
        return Stage(STAGE_DRIVER, False,
                     f"the NVIDIA driver is not working: {_failure('nvidia-smi', smi)}")
    return Stage(STAGE_DRIVER, None, "not applicable: no NVIDIA GPU")


def _nvidia_runtime(runtimes_json: str) -> str | None:
    """The path of docker's nvidia runtime in ``docker info --format '{{json .Runtimes}}'``."""
    try:
        runtimes = json.loads(runtimes_json)
    except ValueError:
        return None
    if not isinstance(runtimes, dict):
        return None
    for name, spec in runtimes.items():
        path = spec.get("path", "") if isinstance(spec, dict) else ""
        if name == NVIDIA or path.rsplit("/", 1)[-1].startswith("nvidia-container-runtime"):
            return path or name
    return None


def _runtime_stage(nvidia_present: bool, sections: dict[str, _Section]) -> Stage:
    if not nvidia_present:
        return Stage(STAGE_RUNTIME, None, "not applicable: no NVIDIA GPU")
    tools_section = sections.get(SECTION_DOCKER_GPU)
    tools: dict[str, str] = {}
    for line in (tools_section.text if tools_section else "").splitlines():
        name, sep, path = line.partition("=")
        if sep and name.strip() in RUNTIME_TOOLS and path.strip():
            tools[name.strip()] = path.strip()
    if tools:
        toolkit = "the NVIDIA Container Toolkit is installed (" + ", ".join(
            f"{name} at {path}" for name, path in tools.items()) + ")"
    else:
        toolkit = ("the NVIDIA Container Toolkit is not installed (neither "
                   f"{' nor '.join(RUNTIME_TOOLS)} is on PATH)")
    info = sections.get(SECTION_DOCKER_INFO)
    if info is None or info.rc != 0:
        return Stage(STAGE_RUNTIME, False,
                     f"{_failure('docker info', info)}; {toolkit}")
    runtime = _nvidia_runtime(info.text.strip())
    if runtime:
        return Stage(STAGE_RUNTIME, True, f"docker has the nvidia runtime ({runtime})")
    if tools:
        return Stage(STAGE_RUNTIME, False,
                     f"docker has no nvidia runtime but {toolkit}: run `nvidia-ctk runtime "
                     "configure --runtime=docker` and restart docker")
    return Stage(STAGE_RUNTIME, False, f"docker has no nvidia runtime and {toolkit}")


def _models(gpus: Iterable[Gpu]) -> dict[str, int]:
    return dict(Counter(gpu.name for gpu in gpus))


def detect(probe_output: str) -> AcceleratorReport:
    """The report for one node from the output of :func:`probe_command`."""
    sections = _sections(probe_output)
    lspci = sections.get(SECTION_LSPCI)
    smi = sections.get(SECTION_NVIDIA_SMI)
    devices = parse_lspci(lspci.text) if lspci is not None and lspci.rc == 0 else []
    gpus = parse_nvidia_smi(smi.text, smi.rc if smi.rc is not None else -1) if smi else []
    nvidia_devices = [d for d in devices if d.vendor == NVIDIA]
    amd_devices = [d for d in devices if d.vendor == AMD]

    device = _device_stage(devices, gpus, lspci)
    driver = _driver_stage(nvidia_devices, amd_devices, gpus, smi, device.ok)
    runtime = _runtime_stage(bool(nvidia_devices or gpus), sections)
    vendors = [d.vendor for d in devices] + ([NVIDIA] if gpus else [])
    memories = [gpu.memory_mib for gpu in gpus if gpu.memory_mib is not None]
    return AcceleratorReport(
        vendor=_vendor(vendors), count=len(gpus), stages=(device, driver, runtime),
        gpus=tuple(gpus), devices=tuple(devices), models=_models(gpus),
        gpu_memory_mib=min(memories) if memories else None, source=SOURCE_PROBE)


# ---- Kubernetes node labels --------------------------------------------------------------------

LABEL_GPU_PRESENT = "nvidia.com/gpu.present"  # GPU operator
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"  # GPU feature discovery, e.g. NVIDIA-H100-80GB-HBM3
LABEL_GPU_COUNT = "nvidia.com/gpu.count"
LABEL_GPU_MEMORY = "nvidia.com/gpu.memory"  # MiB per GPU
RESOURCE_NVIDIA = "nvidia.com/gpu"
RESOURCE_AMD = "amd.com/gpu"
# NFD: pci-<vendor>.present with deviceLabelFields [vendor], pci-<class>_<vendor>.present stock.
_NFD_PCI_LABEL = re.compile(
    r"^feature\.node\.kubernetes\.io/pci-(?:(?P<class_id>[0-9a-f]{4})_)?"
    r"(?P<vendor_id>[0-9a-f]{4})\.present$")


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


def _nfd_vendors(labels: Mapping[str, str]) -> dict[str, list[str]]:
    """vendor -> the NFD labels that show one of its GPUs on the node."""
    found: dict[str, list[str]] = {}
    for key, value in sorted(labels.items()):
        match = _NFD_PCI_LABEL.match(key)
        if not match or str(value).strip().lower() != "true":
            continue
        if match["class_id"] is not None and match["class_id"] not in GPU_CLASSES:
            continue
        vendor = VENDOR_IDS.get(match["vendor_id"])
        if vendor is not None:
            found.setdefault(vendor, []).append(key)
    return found


def from_node_labels(labels: Mapping[str, str],
                     allocatable: Mapping[str, str] | None = None) -> AcceleratorReport:
    """The report for one Kubernetes node from its labels and ``status.allocatable``.

    ``count`` is what the scheduler can give: allocatable ``nvidia.com/gpu`` plus
    ``amd.com/gpu``. Only when the node has no allocatable ``nvidia.com/gpu`` entry does the
    count fall back to the ``nvidia.com/gpu.count`` label, and the ``driver_ok`` message says so.
    A device plugin that advertises GPUs implies a working driver and container runtime (it
    reads the GPUs through them), so both stages pass; an allocatable of 0 fails ``driver_ok``.
    """
    allocatable = allocatable or {}
    nfd = _nfd_vendors(labels)
    gpu_present = str(labels.get(LABEL_GPU_PRESENT, "")).strip().lower() == "true"
    label_count = _int_or_none(labels.get(LABEL_GPU_COUNT))
    product = str(labels.get(LABEL_GPU_PRODUCT, "")).strip() or None
    memory = _int_or_none(labels.get(LABEL_GPU_MEMORY))
    nvidia_alloc = _int_or_none(allocatable.get(RESOURCE_NVIDIA))
    amd_alloc = _int_or_none(allocatable.get(RESOURCE_AMD))

    nvidia_evidence = list(nfd.get(NVIDIA, []))
    if gpu_present:
        nvidia_evidence.append(f"{LABEL_GPU_PRESENT}=true")
    if label_count:
        nvidia_evidence.append(f"{LABEL_GPU_COUNT}={label_count}")
    if nvidia_alloc:
        nvidia_evidence.append(f"allocatable {RESOURCE_NVIDIA}={nvidia_alloc}")
    amd_evidence = list(nfd.get(AMD, []))
    if amd_alloc:
        amd_evidence.append(f"allocatable {RESOURCE_AMD}={amd_alloc}")

    vendors = [v for v, evidence in ((NVIDIA, nvidia_evidence), (AMD, amd_evidence)) if evidence]
    if not vendors:
        none = "not applicable: no GPU"
        return AcceleratorReport(
            vendor=None, count=0, source=SOURCE_NODE_LABELS,
            stages=(Stage(STAGE_DEVICE, False,
                          "no GPU: no NFD pci-10de/pci-1002 label, no "
                          f"{LABEL_GPU_PRESENT}=true and no allocatable GPU"),
                    Stage(STAGE_DRIVER, None, none), Stage(STAGE_RUNTIME, None, none)))

    device = Stage(STAGE_DEVICE, True, "; ".join(
        f"{_VENDOR_NAMES[vendor]} GPU labelled: {', '.join(evidence)}"
        for vendor, evidence in ((NVIDIA, nvidia_evidence), (AMD, amd_evidence)) if evidence))

    driver_parts: list[tuple[bool | None, str]] = []
    runtime: Stage = Stage(STAGE_RUNTIME, None, "not applicable: no NVIDIA GPU")
    nvidia_count = 0
    if nvidia_evidence:
        if nvidia_alloc is not None:
            nvidia_count = nvidia_alloc
            if nvidia_alloc > 0:
                note = (f" ({LABEL_GPU_COUNT} says {label_count}: shared or partitioned GPUs?)"
                        if label_count is not None and label_count != nvidia_alloc else "")
                driver_parts.append((True, f"the device plugin advertises {nvidia_alloc} "
                                           f"allocatable {RESOURCE_NVIDIA}{note}"))
                runtime = Stage(STAGE_RUNTIME, True,
                                f"the device plugin advertises {RESOURCE_NVIDIA}, so the NVIDIA "
                                "container runtime works")
            else:
                driver_parts.append((False, f"an NVIDIA GPU is present but allocatable "
                                            f"{RESOURCE_NVIDIA} is 0: the driver or the device "
                                            "plugin is not working"))
                runtime = Stage(STAGE_RUNTIME, None,
                                f"not determined: allocatable {RESOURCE_NVIDIA} is 0")
        elif label_count is not None:
            nvidia_count = label_count
            driver_parts.append((True, f"no allocatable {RESOURCE_NVIDIA} (device plugin not "
                                       f"registered?); count {label_count} taken from the "
                                       f"{LABEL_GPU_COUNT} label (GPU feature discovery read "
                                       "it through the driver)"))
            runtime = Stage(STAGE_RUNTIME, None,
                            f"not determined: no allocatable {RESOURCE_NVIDIA}")
        else:
            driver_parts.append((False, f"an NVIDIA GPU is present but there is no allocatable "
                                        f"{RESOURCE_NVIDIA} and no {LABEL_GPU_COUNT} label: the "
                                        "driver, GPU operator or device plugin is not working"))
            runtime = Stage(STAGE_RUNTIME, None,
                            f"not determined: no allocatable {RESOURCE_NVIDIA}")
    amd_count = 0
    if amd_evidence:
        amd_count = amd_alloc or 0
        if amd_count:
            driver_parts.append((True, f"the device plugin advertises {amd_count} "
                                       f"allocatable {RESOURCE_AMD}"))
        else:
            driver_parts.append((False, f"an AMD GPU is present but there is no allocatable "
                                        f"{RESOURCE_AMD}: the amdgpu driver or the device plugin "
                                        "is not working"))
    oks = [ok for ok, _ in driver_parts]
    driver = Stage(STAGE_DRIVER, False if False in oks else True,
                   "; ".join(message for _, message in driver_parts))

    models = {product: nvidia_count} if product and nvidia_count else {}
    return AcceleratorReport(
        vendor=_vendor(vendors), count=nvidia_count + amd_count,
        stages=(device, driver, runtime), models=models,
        gpu_memory_mib=memory if nvidia_count else None, source=SOURCE_NODE_LABELS)


def cluster_totals(per_node: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A cluster's accelerators from its nodes' reports (``AcceleratorReport.to_dict()``, or
    ``{"count": 0, "error": ...}`` for a node that could not be probed): the total count, the
    count per model, and the per-node reports."""
    models: dict[str, int] = {}
    for report in per_node.values():
        for model, n in (report.get("models") or {}).items():
            models[model] = models.get(model, 0) + n
    return {"count": sum(r.get("count", 0) for r in per_node.values()), "models": models,
            "nodes": dict(per_node)}
