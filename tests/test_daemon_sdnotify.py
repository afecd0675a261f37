"""The sd_notify client talks to a real unix datagram socket, path or abstract namespace."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from defectd.daemon.sdnotify import SdNotifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def test_ready_and_status_arrive_in_one_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("12 fps")
    assert sock.recv(4096) == b"READY=1\nSTATUS=12 fps"


def test_abstract_namespace_socket_is_reached() -> None:
    name = f"defectd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert SdNotifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_status_is_flattened_to_one_line(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    SdNotifier({"NOTIFY_SOCKET": path}).status("a\nb  c")
    assert sock.recv(4096) == b"STATUS=a b c"


def test_without_socket_every_call_is_a_no_op() -> None:
    notifier = SdNotifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert notifier.watchdog_interval_s is None


def test_watchdog_interval_comes_from_watchdog_usec() -> None:
    env = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert SdNotifier(env).watchdog_interval_s == 3.0


def test_watchdog_meant_for_another_pid_is_ignored() -> None:
    env = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert SdNotifier(env).watchdog_interval_s is None


def test_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    assert not SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).stopping()
