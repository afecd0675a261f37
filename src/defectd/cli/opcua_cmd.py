"""``defectd opcua``: the OPC UA server's certificate and users (docs/opcua.md)."""

from __future__ import annotations

import getpass
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from defectd.cli.app import sub_app
from defectd.errors import ConfigError
from defectd.extras import require_extra

if TYPE_CHECKING:
    from defectd.opcua.config import OpcUaConfig

opcua_app = sub_app("opcua", "Certificates and users of the station's OPC UA server.")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Station config: paths and URI from its opcua section."),
]


def _opcua_section(config: Path) -> tuple[str, OpcUaConfig]:
    from defectd.daemon.config import load_station_config

    cfg = load_station_config(config)
    if cfg.opcua is None:
        raise ConfigError(f"{config}: has no [opcua] section")
    return cfg.station, cfg.opcua


@opcua_app.command("cert")
def cert(
    *,
    config: ConfigOpt = None,
    certificate: Annotated[
        Path | None, typer.Option("--cert", help="Certificate file to write (DER).")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Key file to write (PEM).")] = None,
    uri: Annotated[
        str | None, typer.Option(help="Application URI (default: the station's).")
    ] = None,
    client: Annotated[
        str | None,
        typer.Option(help="Write a client certificate with this name instead (for trials)."),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="DNS name or IP the endpoint is reached by (repeat)."),
    ] = None,
    days: Annotated[int, typer.Option(min=1, max=36500, help="Validity in days.")] = 3650,
    force: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Create a self-signed certificate and key for the OPC UA server (or a trial client).

    With --config the files go where the opcua section (certificate, private_key) says, for the
    station's application URI; give the certificate (DER) to the PLC to trust.
    """
    require_extra("opcua", "defectd opcua cert")
    from defectd.opcua.certs import make_certificate

    common = "defectd"
    if config is not None:
        station, section = _opcua_section(config)
        if client is None:
            certificate = certificate or section.certificate
            key = key or section.private_key
            uri = uri or section.application_uri_for(station)
            common = f"defectd {station}"
    if client is not None:
        common = client
        uri = uri or f"urn:defectd:client:{client}"
    if certificate is None or key is None or uri is None:
        raise ConfigError(
            "opcua cert: give --config (with opcua.certificate and opcua.private_key) or "
            "--cert, --key and --uri"
        )
    hosts = tuple(host or ()) or ("localhost", socket.gethostname())
    pair = make_certificate(
        certificate,
        key,
        application_uri=uri,
        common_name=common,
        hosts=hosts,
        role="client" if client is not None else "server",
        days=days,
        overwrite=force,
    )
    typer.echo(f"certificate {pair.certificate}\nprivate key {pair.private_key}\nuri {uri}")


@opcua_app.command("user")
def user(
    name: Annotated[str, typer.Argument(help="User name the PLC logs in with.")],
    config: ConfigOpt = None,
    users_file: Annotated[
        Path | None, typer.Option("--users-file", help="Users file (default: the opcua section's).")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
) -> None:
    """Add (or replace) a user and its password, stored as an scrypt hash."""
    require_extra("opcua", "defectd opcua user")
    from defectd.opcua.certs import add_user

    if users_file is None and config is not None:
        users_file = _opcua_section(config)[1].users_file
    if users_file is None:
        raise ConfigError("opcua user: give --users-file or --config with opcua.users_file")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the passwords differ")
    add_user(users_file, name, password)
    typer.echo(f"user {name} written to {users_file}")
