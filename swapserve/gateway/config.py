"""The gateway's typed configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from swapserve.config import MAX_BODY_BYTES


@dataclass(frozen=True)
class GatewayConfig:
    token: str | None = None
    """Management token, sent as ``Authorization: Bearer <token>``. It guards the management API
    (``/api/v1/...``) and OIP repository load/unload. None disables those routes (403): a node started
    without a token can serve, but nobody can change what it serves over HTTP."""
    max_body_bytes: int = MAX_BODY_BYTES
    """Largest request body (infer requests included); larger ones get 413 before they are read."""
    request_timeout_s: float = 60.0
    """Wall-clock limit of one request (reading the body, queueing, running); past it: 504."""
    uploads_dir: Path | None = None
    """Where deploy bundles are streamed and extracted, each in its own temporary directory that is removed
    afterwards. None: the system's temporary directory. Put it on the same filesystem as the registry's
    artifact directory so the node can move a bundle instead of copying it."""
    max_upload_bytes: int | None = None
    """Largest deploy bundle (compressed). None: ``max_body_bytes``. Model weights hardly compress, so a
    bundle is about its model's size: raise this for models larger than 64 MiB."""
    max_bundle_bytes: int | None = None
    """Largest total size of a bundle's extracted files (against gzip bombs). None: 4 × the upload limit."""
    max_bundle_files: int = 10_000
    """Most members in one bundle (against archives of millions of empty entries)."""
    deploy_timeout_s: float = 1800.0
    """Limit of a deploy request (upload, extraction, ``node.deploy``: minutes for big models; the same as
    ``swapserve.client.Client``'s). On expiry the client gets 504 and the
    deploy itself is not cancelled (a half-cancelled deploy would be worse); its files are removed when it
    ends."""

    def __post_init__(self) -> None:
        if self.token is not None and (not self.token or self.token != self.token.strip()):
            raise ValueError("token must be a non-empty string without surrounding whitespace, or None")
        for name in ("max_body_bytes", "max_upload_bytes", "max_bundle_bytes", "max_bundle_files"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        for name in ("request_timeout_s", "deploy_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")

    @property
    def upload_limit(self) -> int:
        return self.max_upload_bytes if self.max_upload_bytes is not None else self.max_body_bytes

    @property
    def bundle_limit(self) -> int:
        return self.max_bundle_bytes if self.max_bundle_bytes is not None else 4 * self.upload_limit
