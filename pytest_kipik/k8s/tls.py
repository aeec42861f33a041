"""What a TLS server's certificate says it is: its subject alternative names.

Used to finish the debugging of a verification failure ("the certificate names X, Y; you
connected to Z"). The certificate is read without verifying it (it is only shown, never trusted).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl

_SAN_OID = bytes.fromhex("0603551d11")  # OBJECT IDENTIFIER 2.5.29.17 (subjectAltName)


def _read(der: bytes, at: int) -> tuple[int, int, int]:
    """One DER element at ``at``: (tag, start of its content, end of its content)."""
    tag, length, at = der[at], der[at + 1], at + 2
    if length & 0x80:
        count = length & 0x7F
        length, at = int.from_bytes(der[at : at + count], "big"), at + count
    return tag, at, at + length


def subject_alt_names(der: bytes) -> list[str]:
    """DNS names and IP addresses of a DER certificate's subjectAltName extension."""
    found = der.find(_SAN_OID)
    if found < 0:
        return []
    _, _, at = _read(der, found)  # past the OID
    tag, start, end = _read(der, at)
    if tag == 0x01:  # BOOLEAN critical
        tag, start, end = _read(der, end)
    _, at, end = _read(der, start)  # OCTET STRING holds a SEQUENCE of GeneralName
    names = []
    while at < end:
        tag, start, at = _read(der, at)
        value = der[start:at]
        if tag == 0x82:  # [2] dNSName
            names.append(value.decode("ascii", "replace"))
        elif tag == 0x87:  # [7] iPAddress
            names.append(str(ipaddress.ip_address(value)))
    return names


def certificate_names(host: str, port: int, timeout: float = 5) -> list[str] | None:
    """The names in the certificate served at ``host:port`` (None when it cannot be read)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    return subject_alt_names(der) if der else None
