"""GenTL producers through harvesters: finding producers, devices and applying node settings.

One ``GenTLHub`` owns one ``harvesters.core.Harvester`` over a set of producers (``.cti``).
A process must share one hub between all cameras of the same producers: a second Harvester
on a producer that is already open sees no devices, and ``Harvester.update()`` destroys every
acquirer the Harvester created. So the hub serialises those calls under one lock and counts
refreshes (``generation``) so that cameras losing their device together refresh it once.

Facts about the bindings that shape this module (harvesters 1.4.3, genicam 1.6.0):
the GenTL waits inside ``fetch`` hold the GIL, so acquirers are created with a zero internal
wait and sources poll (see ``genicam.py``); viky's device info has no user-defined name
(reading it raises), and devices report their access status as a GenTL number.
"""

from __future__ import annotations

import difflib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import genicam
from genicam import genapi
from genicam.gentl import GenericException as GenTLError
from harvesters.core import DeviceInfo, Harvester, ImageAcquirer, ParameterKey, ParameterSet

from defectd.errors import CameraError
from defectd.log import get_logger
from defectd.pipeline.sources.base import DeviceSelector, NodeValue

log = get_logger(__name__)

ENV_PRODUCER_PATH = "GENICAM_GENTL64_PATH"

# Nodes ``defectd cameras`` shows when the device has them.
KEY_NODES = (
    "PixelFormat",
    "Width",
    "Height",
    "OffsetX",
    "OffsetY",
    "AcquisitionFrameRate",
    "ExposureTime",
    "Gain",
    "TriggerMode",
    "TriggerSource",
)

# GenTL DEVICE_ACCESS_STATUS values
_ACCESS_STATUS = {
    0: "unknown",
    1: "available",  # READWRITE
    2: "read-only",
    3: "no-access",
    4: "busy",  # opened by another program
    5: "open",  # opened read/write by this process
    6: "open-read-only",
}


def bundled_producer() -> Path:
    """The simulated ``viky.cti`` producer shipped inside the ``genicam`` package."""
    return Path(genicam.__file__).parent / "viky.cti"


def producers_from_env(env: Mapping[str, str]) -> tuple[Path, ...]:
    """``.cti`` files named by ``GENICAM_GENTL64_PATH`` (folders are searched, files taken)."""
    found: list[Path] = []
    for entry in env.get(ENV_PRODUCER_PATH, "").split(os.pathsep):
        if not entry:
            continue
        path = Path(entry)
        if path.is_dir():
            found.extend(sorted(path.glob("*.cti")))
        elif path.suffix == ".cti" and path.is_file():
            found.append(path)
    return tuple(found)


def resolve_producers(
    configured: Sequence[Path],
    *,
    env: Mapping[str, str] | None = None,
    camera: str | None = None,
    allow_bundled: bool = False,
) -> tuple[Path, ...]:
    """The producer files to load: ``configured``, else ``GENICAM_GENTL64_PATH``.

    With ``allow_bundled`` the simulated viky producer is the last resort (for listing and
    demos; a station never falls back to a simulator). Raises ``CameraError`` for a configured
    file that does not exist or when no producer is found.
    """
    who = f"camera {camera!r}: " if camera else ""
    if configured:
        for path in configured:
            if not path.is_file():
                raise CameraError(f"{who}GenTL producer {path} does not exist")
            if path.suffix != ".cti":
                raise CameraError(f"{who}GenTL producer {path} is not a .cti file")
        return tuple(path.resolve() for path in configured)
    found = producers_from_env(os.environ if env is None else env)
    if found:
        return found
    if allow_bundled:
        return (bundled_producer(),)
    raise CameraError(
        f"{who}no GenTL producer: list .cti files under 'producers' in the camera's config "
        f"or set {ENV_PRODUCER_PATH}"
    )


@dataclass(frozen=True, slots=True)
class DeviceDescription:
    """One device as a producer reports it, with the current value of its key nodes."""

    index: int
    vendor: str | None
    model: str | None
    serial: str | None
    user_defined_name: str | None
    device_id: str | None
    tl_type: str | None
    access: str
    nodes: dict[str, NodeValue] = field(default_factory=dict)
    detail: str = ""  # why nodes could not be read, when they could not

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "vendor": self.vendor,
            "model": self.model,
            "serial": self.serial,
            "user_defined_name": self.user_defined_name,
            "id": self.device_id,
            "tl_type": self.tl_type,
            "access": self.access,
            "nodes": dict(self.nodes),
            "detail": self.detail,
        }


def _info(info: DeviceInfo, name: str) -> Any:
    # Producers raise for information they do not provide (viky: user_defined_name).
    try:
        return getattr(info, name)
    except (GenTLError, AttributeError):
        return None


def _matches(info: DeviceInfo, index: int, selector: DeviceSelector) -> bool:
    if selector.serial is not None:
        return bool(_info(info, "serial_number") == selector.serial)
    if selector.user_defined_name is not None:
        return bool(_info(info, "user_defined_name") == selector.user_defined_name)
    return index == selector.index


class GenTLHub:
    """One Harvester over ``producers``, shared by the GenICam sources of one process.

    Thread-safe: every Harvester call runs under the hub's lock. Sources ``attach`` when they
    open and ``detach`` when they close; a hub made with ``close_when_unused`` loads its
    producers at the first ``attach`` and unloads them when the last source detaches (what
    ``make_sources`` uses). Otherwise the producers load at once and ``close`` unloads them.
    """

    def __init__(self, producers: Sequence[Path], *, close_when_unused: bool = False) -> None:
        self.producers = tuple(producers)
        self._lock = threading.RLock()
        self._generation = 0
        self._users = 0
        self._close_when_unused = close_when_unused
        self._loaded: Harvester | None = None if close_when_unused else self._build()

    @property
    def _harvester(self) -> Harvester:
        if self._loaded is None:
            raise CameraError(f"GenTL producers {self._names()} are not loaded (hub closed)")
        return self._loaded

    def _names(self) -> str:
        return ", ".join(p.name for p in self.producers)

    def attach(self) -> None:
        """Count one more source using the hub (loading the producers if they are not)."""
        with self._lock:
            if self._loaded is None:
                self._loaded = self._build()
            self._users += 1

    def detach(self) -> None:
        """Count one source less; the last one out closes a ``close_when_unused`` hub."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0 and self._close_when_unused:
                self.close()

    @property
    def generation(self) -> int:
        """Counts refreshes of the device list; acquirers from older generations are void."""
        return self._generation

    def _build(self) -> Harvester:
        harvester = Harvester()
        for path in self.producers:
            try:
                harvester.add_file(str(path), check_existence=True, check_validity=True)
            except (OSError, ValueError, GenTLError) as exc:
                harvester.reset()
                raise CameraError(f"GenTL producer {path} cannot be loaded: {exc}") from exc
        harvester.update()
        log.info(
            "gentl_producers_loaded",
            producers=[str(p) for p in self.producers],
            devices=len(harvester.device_info_list),
        )
        return harvester

    def device_count(self) -> int:
        with self._lock:
            return len(self._harvester.device_info_list)

    def _describe_all(self) -> str:
        infos = self._harvester.device_info_list
        if not infos:
            # A producer loaded by another Harvester of this process shows no device here.
            return (
                f"the producers ({self._names()}) see no device (cameras of one station must "
                f"share one GenTLHub: build them with make_sources)"
            )
        seen = [
            f"#{i} serial {_info(d, 'serial_number')!r} name {_info(d, 'user_defined_name')!r}"
            for i, d in enumerate(infos)
        ]
        return "devices seen: " + "; ".join(seen)

    def open(self, selector: DeviceSelector, camera: str) -> ImageAcquirer:
        """Open the one device ``selector`` names, exclusively.

        Raises ``CameraError`` when no device or several match, or the device is in use.
        The acquirer belongs to the caller, who hands it back with ``release``.
        """
        with self._lock:
            infos = self._harvester.device_info_list
            matches = [d for i, d in enumerate(infos) if _matches(d, i, selector)]
            if not matches:
                raise CameraError(
                    f"camera {camera!r}: no device with {selector.describe()}; "
                    f"{self._describe_all()}"
                )
            if len(matches) > 1:
                raise CameraError(
                    f"camera {camera!r}: {len(matches)} devices match {selector.describe()}; "
                    f"select by serial"
                )
            info = matches[0]
            # A zero internal wait: the GenTL wait holds the GIL, so the source polls instead.
            config = ParameterSet(
                {
                    ParameterKey.TIMEOUT_PERIOD_ON_UPDATE_EVENT_DATA_CALL: 0,
                    ParameterKey.ENABLE_AUTO_CHUNK_DATA_UPDATE: False,
                }
            )
            try:
                return self._harvester.create(info, config=config)
            except (GenTLError, ValueError) as exc:
                status = _ACCESS_STATUS.get(_info(info, "access_status") or 0, "unknown")
                raise CameraError(
                    f"camera {camera!r}: device with {selector.describe()} cannot be opened "
                    f"(access status {status}): {_first_line(exc)}"
                ) from exc

    def release(self, acquirer: ImageAcquirer) -> None:
        """Stop and destroy ``acquirer``; errors of a device already gone are logged only."""
        with self._lock:
            try:
                acquirer.destroy()
            except Exception as exc:  # the device may be half gone; releasing must not raise
                log.warning("acquirer_destroy_failed", error=_first_line(exc))

    def refresh(self, seen_generation: int) -> None:
        """Re-enumerate devices, unless another camera did since ``seen_generation``.

        ``update()`` destroys every acquirer of this Harvester (the other cameras reconnect on
        their own); when it finds no device the Harvester itself is rebuilt, which clears the
        soft-locked state a disconnect can leave behind.
        """
        with self._lock:
            if self._generation != seen_generation:
                return
            self._generation += 1
            try:
                self._harvester.update()
            except Exception as exc:  # a producer in a bad state: rebuild below
                log.warning("gentl_update_failed", error=_first_line(exc))
            if not self._harvester.device_info_list:
                log.warning("gentl_rebuild", producers=[str(p) for p in self.producers])
                self._harvester.reset()
                self._loaded = None
                self._loaded = self._build()

    def describe(self, *, read_nodes: bool = True) -> list[DeviceDescription]:
        """Every device the producers see; key node values for those that can be opened."""
        with self._lock:
            out: list[DeviceDescription] = []
            for index, info in enumerate(self._harvester.device_info_list):
                nodes: dict[str, NodeValue] = {}
                detail = ""
                if read_nodes:
                    try:
                        acquirer = self._harvester.create(info)
                    except (GenTLError, ValueError) as exc:
                        detail = f"cannot open: {_first_line(exc)}"
                    else:
                        try:
                            nodes = read_nodes_of(acquirer.remote_device.node_map, KEY_NODES)
                        finally:
                            self.release(acquirer)
                out.append(
                    DeviceDescription(
                        index=index,
                        vendor=_info(info, "vendor"),
                        model=_info(info, "model"),
                        serial=_info(info, "serial_number"),
                        user_defined_name=_info(info, "user_defined_name"),
                        device_id=_info(info, "id_"),
                        tl_type=_info(info, "tl_type"),
                        access=_ACCESS_STATUS.get(_info(info, "access_status") or 0, "unknown"),
                        nodes=nodes,
                        detail=detail,
                    )
                )
            return out

    def close(self) -> None:
        """Destroy open acquirers and unload the producers; idempotent."""
        with self._lock:
            if self._loaded is not None:
                self._loaded.reset()
                self._loaded = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --- node maps --------------------------------------------------------------------------------

_READABLE = (genapi.EAccessMode.RO, genapi.EAccessMode.RW)
_WRITABLE = (genapi.EAccessMode.WO, genapi.EAccessMode.RW)


def read_nodes_of(node_map: Any, names: Sequence[str]) -> dict[str, NodeValue]:
    """Current values of the readable nodes among ``names`` (others are left out)."""
    values: dict[str, NodeValue] = {}
    for name in names:
        if not node_map.has_node(name):
            continue
        node = getattr(node_map, name)
        if node.node.get_access_mode() not in _READABLE:
            continue
        try:
            value = node.value
        except (genapi.GenericException, AttributeError):
            continue
        if isinstance(value, bool | int | float | str):
            values[name] = value
    return values


def _access_name(mode: int) -> str:
    try:
        return str(genapi.EAccessMode(mode).name)
    except ValueError:
        return str(mode)


def _node_names(node_map: Any) -> list[str]:
    return [n.node.name for n in node_map.nodes]


def apply_nodes(node_map: Any, nodes: Mapping[str, NodeValue], camera: str) -> None:
    """Write ``nodes`` in order; the first that cannot be written raises ``CameraError``.

    The error names the camera, the node and the value, and says why: the node does not
    exist (with close names), is not writable now, has another type, or the value lies outside
    the node's range / is not one of its symbolics. Commands run when given ``true``.
    """
    for name, value in nodes.items():
        apply_node(node_map, name, value, camera)


def apply_node(node_map: Any, name: str, value: NodeValue, camera: str) -> None:
    """Write one node; see ``apply_nodes`` for the errors."""
    at = f"camera {camera!r}: node {name} = {value!r}"
    if not node_map.has_node(name):
        close = difflib.get_close_matches(name, _node_names(node_map), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CameraError(f"{at}: the device has no node {name!r}{hint}")
    node = getattr(node_map, name)
    mode = node.node.get_access_mode()
    if mode not in _WRITABLE:
        raise CameraError(f"{at}: the node is not writable now (access {_access_name(mode)})")
    try:
        _write(node, value, at)
    except genapi.GenericException as exc:
        raise CameraError(f"{at}: the device refused it: {_first_line(exc)}") from exc
    log.debug("node_set", camera=camera, node=name, value=value)


def _write(node: Any, value: NodeValue, at: str) -> None:
    if isinstance(node, genapi.IEnumeration):
        allowed = tuple(node.symbolics)
        if not isinstance(value, str) or value not in allowed:
            raise CameraError(f"{at}: not one of {', '.join(allowed)}")
        node.value = value
    elif isinstance(node, genapi.IBoolean):
        if not isinstance(value, bool):
            raise CameraError(f"{at}: the node takes true or false")
        node.value = value
    elif isinstance(node, genapi.IInteger):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CameraError(f"{at}: the node takes an integer in {node.min}..{node.max}")
        lo, hi, inc = int(node.min), int(node.max), int(node.inc)
        if not lo <= value <= hi:
            raise CameraError(f"{at}: out of range {lo}..{hi}")
        if inc > 1 and (value - lo) % inc:
            raise CameraError(f"{at}: must be {lo} plus a multiple of {inc} (range {lo}..{hi})")
        node.value = value
    elif isinstance(node, genapi.IFloat):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CameraError(f"{at}: the node takes a number in {node.min}..{node.max}")
        lo_f, hi_f = float(node.min), float(node.max)
        unit = f" {node.unit}" if node.unit else ""
        if not lo_f <= float(value) <= hi_f:
            raise CameraError(f"{at}: out of range {lo_f:g}..{hi_f:g}{unit}")
        node.value = float(value)
    elif isinstance(node, genapi.IString):
        if not isinstance(value, str):
            raise CameraError(f"{at}: the node takes a string")
        node.value = value
    elif isinstance(node, genapi.ICommand):
        if value is not True:
            raise CameraError(f"{at}: a command node runs only with the value true")
        node.execute()
    else:
        raise CameraError(f"{at}: a {type(node).__name__} node cannot be set from config")
