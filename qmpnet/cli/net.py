"""``qmpnet net``: bring the NAT networks of the settings up and down, and list them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from qmpnet.cli.connect import run_on_host
from qmpnet.cli.options import ConfigOpt, JsonOpt, VerboseOpt
from qmpnet.cli.output import emit, format_rows

if TYPE_CHECKING:
    from collections.abc import Sequence

    from qmpnet.adapters.hostnet.nat import NatStatus
    from qmpnet.settings import Settings

app = typer.Typer(
    help="Bring the NAT networks of the settings up and down.", no_args_is_help=True, rich_markup_mode=None
)
NetNameArg = Annotated[str, typer.Argument(metavar="NAME", help="A NAT network from the settings (e.g. default).")]


@app.command("up")
def net_up_cmd(
    name: NetNameArg, as_json: JsonOpt = False, config: ConfigOpt = None, verbose: VerboseOpt = False
) -> None:
    """Bring a NAT network up: bridge with the gateway address, masquerade, DHCP/DNS (idempotent)."""
    from qmpnet.adapters.hostnet import net_up  # noqa: PLC0415 - host tooling only when asked for

    async def up(settings: Settings) -> NatStatus:
        hostnet = settings.hostnet
        return await net_up(hostnet.network(name, field="name"), netns=hostnet.netns, settings=hostnet)

    status = run_on_host(config, verbose, up)
    emit(status, as_json, lambda: nat_table([status]))


@app.command("down")
def net_down_cmd(name: NetNameArg, config: ConfigOpt = None, verbose: VerboseOpt = False) -> None:
    """Take a NAT network down: its dnsmasq, nftables table and bridge are removed."""
    from qmpnet.adapters.hostnet import net_down  # noqa: PLC0415 - host tooling only when asked for

    async def down(settings: Settings) -> bool:
        hostnet = settings.hostnet
        return await net_down(hostnet.network(name, field="name"), netns=hostnet.netns, settings=hostnet)

    removed = run_on_host(config, verbose, down)
    print(f"{name}: {'down' if removed else 'was not up'}")


@app.command("list")
def net_list_cmd(as_json: JsonOpt = False, config: ConfigOpt = None, verbose: VerboseOpt = False) -> None:
    """List the NAT networks of the settings and whether each is up."""
    from qmpnet.adapters.hostnet import net_list  # noqa: PLC0415 - host tooling only when asked for

    async def listing(settings: Settings) -> list[NatStatus]:
        return await net_list(netns=settings.hostnet.netns, settings=settings.hostnet)

    found = run_on_host(config, verbose, listing)
    emit({"networks": [s.model_dump(mode="json") for s in found]}, as_json, lambda: nat_table(found))


def nat_table(found: Sequence[NatStatus]) -> str:
    """Format NAT network states as a table."""
    rows = [("NAME", "BRIDGE", "SUBNET", "UP", "DNSMASQ", "LEASES")]
    rows += [
        (s.name, s.bridge, str(s.subnet), "yes" if s.up else "no", str(s.dnsmasq_pid or "-"), str(len(s.leases)))
        for s in found
    ]
    return format_rows(rows)
