"""Who may talk to a worker: the job's secret and where workers listen.

Every connection between workers starts with a mutual HMAC-SHA256 handshake
(csrc/agent/handshake.h) keyed by a secret. The secret comes from
RpcOptions(secret=...), TORCHRPC_SECRET or TORCHRPC_SECRET_FILE, in that
order. With none, workers listen on loopback only and rank 0 draws a fresh
secret for the job and hands it to the others through the rendezvous store,
so single-host runs need nothing set. Listening on any other interface
without a configured secret needs RpcOptions(insecure=True): the store is
reachable by anyone who can reach rank 0, so a secret handed out through it
keeps out strangers that do not speak the rendezvous protocol, nothing more.
"""

import ipaddress
import os
import secrets
import warnings
from typing import Optional

from torchrpc.errors import AuthenticationError, RpcError

_SECRET_KEY = "torchrpc/secret"
_MODE_KEY = "torchrpc/secret_mode"
_JOB_KEY = "torchrpc/job"
_warned_insecure = False


def configured_secret(option) -> Optional[bytes]:
    """The secret the user configured, as bytes, or None."""
    if option is not None:
        value = option.encode() if isinstance(option, str) else bytes(option)
        source = "RpcOptions(secret=...)"
    elif os.environ.get("TORCHRPC_SECRET"):
        value, source = os.environ["TORCHRPC_SECRET"].encode(), "TORCHRPC_SECRET"
    elif os.environ.get("TORCHRPC_SECRET_FILE"):
        path = os.environ["TORCHRPC_SECRET_FILE"]
        try:
            with open(path, "rb") as f:
                value = f.read().strip()
        except OSError as e:
            raise RpcError(f"torchrpc: cannot read TORCHRPC_SECRET_FILE {path!r}: {e}") from e
        source = f"TORCHRPC_SECRET_FILE ({path})"
    else:
        return None
    if len(value) < 16:
        raise RpcError(f"torchrpc: the secret from {source} is too short: use at least 16 bytes")
    return value


def check_listen_host(host: str, secret: Optional[bytes], insecure: bool):
    """Refuses to listen beyond loopback without a configured secret, unless
    the user said insecure=True (then warns once per process)."""
    global _warned_insecure
    if secret is not None or ipaddress.ip_address(host).is_loopback:
        return
    if not insecure:
        raise RpcError(
            f"torchrpc: this worker would listen on {host}, which other hosts can reach, but no "
            "secret is configured: set TORCHRPC_SECRET, TORCHRPC_SECRET_FILE or "
            "RpcOptions(secret=...) to the same value on every worker (or pass "
            "RpcOptions(insecure=True) to accept a secret handed out through the rendezvous store)"
        )
    if not _warned_insecure:
        _warned_insecure = True
        warnings.warn(
            f"torchrpc: listening on {host} with insecure=True: anyone who can reach the "
            "rendezvous store can join this job",
            RuntimeWarning,
            stacklevel=4,
        )


def job_credentials(store, rank: int, secret: Optional[bytes]):
    """(job_id, secret) for this job. Rank 0 draws the job id, and the secret
    too when none is configured; the others read them from the store."""
    if rank == 0:
        job_id = secrets.token_hex(16)
        store.set(_MODE_KEY, "configured" if secret is not None else "store")
        if secret is None:
            secret = secrets.token_bytes(32)
            store.set(_SECRET_KEY, secret)
        store.set(_JOB_KEY, job_id)
        return job_id, secret
    job_id = store.get(_JOB_KEY).decode()
    mode = store.get(_MODE_KEY).decode()
    if mode == "store" and secret is None:
        return job_id, store.get(_SECRET_KEY)
    if mode == "configured" and secret is not None:
        return job_id, secret
    mine = "has one" if secret is not None else "has none"
    theirs = "configured one" if mode == "configured" else "none configured"
    raise AuthenticationError(
        f"torchrpc: rank 0 uses {theirs} for the job's secret but this worker {mine}: "
        "give every worker the same TORCHRPC_SECRET (or none on a single host)"
    )
