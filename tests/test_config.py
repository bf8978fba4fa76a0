"""Configurations are checked when made: plain strings become enum members, bad values fail."""

from __future__ import annotations

import pytest

from aecho.config import (
    BenchConfig,
    ClientConfig,
    ConfigError,
    Framing,
    LoopKind,
    Offload,
    ProxyMode,
    ServerConfig,
)


def test_server_config_from_plain_strings() -> None:
    cfg = ServerConfig(
        loop="asyncio",  # type: ignore[arg-type]
        offload="process",  # type: ignore[arg-type]
        framing="line",  # type: ignore[arg-type]
        proxy_protocol="off",  # type: ignore[arg-type]
        log_level="debug",
    )
    assert cfg.loop is LoopKind.asyncio
    assert cfg.offload is Offload.process
    assert cfg.framing is Framing.line
    # "off" as a string once wrapped every connection in the PROXY prelude.
    assert cfg.proxy_protocol is ProxyMode.off
    assert cfg.log_level == "DEBUG"


def test_bench_config_from_plain_strings() -> None:
    cfg = BenchConfig(framing="line", offload="process", loop="uvloop")  # type: ignore[arg-type]
    assert (cfg.framing, cfg.offload, cfg.loop) == (Framing.line, Offload.process, LoopKind.uvloop)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"framing": "lines"}, "unknown --framing 'lines': use one of raw, line"),
        ({"proxy_protocol": "v3"}, "unknown --proxy-protocol 'v3'"),
        ({"port": 70000}, "port 70000 is out of range"),
        ({"max_connections": 0}, "--max-connections must be at least 1"),
        ({"tls_cert": "c.pem"}, "--tls-cert and --tls-key go together"),
        ({"write_low": 10, "write_high": 5}, "watermarks"),
    ],
)
def test_an_invalid_server_config_cannot_exist(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**kwargs)  # type: ignore[arg-type]


def test_an_invalid_client_config_cannot_exist() -> None:
    with pytest.raises(ConfigError, match="only apply with --tls"):
        ClientConfig(cafile="ca.pem")
