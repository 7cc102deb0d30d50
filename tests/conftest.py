"""Session-wide guards: nothing in the tests may reach the network."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

# albumentations (pulled in by img2dataset) checks PyPI for updates on import; wandb and the
# Hugging Face hub must stay offline too.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def loopback_only():
    """Fail any connection to a non-loopback address and any real name lookup. Modules that
    talk to servers opt in: `pytestmark = pytest.mark.usefixtures("loopback_only")`."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            assert ipaddress.ip_address(address[0]).is_loopback, f"test tried to dial {address[0]}"
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise AssertionError(f"test tried to resolve {host!r}") from None
        return real_getaddrinfo(host, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("test tried a name lookup")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        for name in ("gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getfqdn"):
            mp.setattr(socket, name, refuse)
        yield
