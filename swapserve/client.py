"""A small synchronous client for a swapserve node: the management API and OIP v2 inference.

Standard library HTTP (urllib): no dependency beyond swapserve's own. Management calls import nothing
heavy; ``infer`` uses the gateway's OIP codec, so client and server share one wire format. ``url`` and
``token`` default to ``SWAPSERVE_URL`` and ``SWAPSERVE_TOKEN`` (through :func:`swapserve.config.env`).

    client = Client()
    client.deploy(pack(bundle_dir))
    out = client.infer("minilm-embedding", {"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from swapserve.config import env
from swapserve.errors import SwapserveError

if TYPE_CHECKING:
    import torch

API = "/api/v1"


class ClientError(SwapserveError):
    """The server answered with an error (``status`` its HTTP status, ``message`` its JSON ``error`` text),
    or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.status = status
        self.http_status = status or 503
        self.message = message
        self.retry_after = retry_after
        """Seconds, from the server's Retry-After on overload (429/503)."""


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 120.0,
                 deploy_timeout: float = 1800.0):
        self.url = (url or env().url).rstrip("/")
        self.token = token if token is not None else env().token
        self.timeout = timeout
        self.deploy_timeout = deploy_timeout
        """Deploys upload a bundle and wait while the node checks and loads it: minutes for big models."""

    # --- management API --------------------------------------------------------------------------

    def deploy(self, bundle_tgz: str | os.PathLike[str]) -> dict[str, Any]:
        """Upload a bundle archive (see :func:`swapserve.functions.bundle.pack`); returns the function's info."""
        path = Path(bundle_tgz)
        with path.open("rb") as f:
            # Streamed from the file (Content-Length given), never read whole into memory.
            return self._json("POST", f"{API}/functions", body=f, timeout=self.deploy_timeout,
                              headers={"Content-Type": "application/gzip", "Content-Length": str(path.stat().st_size)})

    def list_functions(self) -> list[dict[str, Any]]:
        body = self._json("GET", f"{API}/functions")
        return body["functions"] if isinstance(body, dict) and "functions" in body else body

    def get_function(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"{API}/functions/{_q(name)}")

    def delete(self, name: str) -> None:
        self._request("DELETE", f"{API}/functions/{_q(name)}")

    def status(self) -> dict[str, Any]:
        return self._json("GET", f"{API}/status")

    # --- OIP v2 ----------------------------------------------------------------------------------

    def scheduling(self) -> dict[str, Any]:
        """The scheduler's settings (``GET /api/v1/scheduling``)."""
        return self._json("GET", "/api/v1/scheduling")

    def configure_scheduling(self, **changes: Any) -> dict[str, Any]:
        """Change ``side_fetch``, ``swap_piece_ms``, ``queue_ahead_within_ms``, ``peer_copies``, ``side_lanes``,
        ``place_ahead``, ``gateway_margin``, ``spin_ms`` and/or ``slo_values`` on the running node; the settings
        after."""
        return self._json("PATCH", "/api/v1/scheduling", body=json.dumps(changes).encode(),
                          headers={"Content-Type": "application/json"})

    def runs(self, since: float | None = None, limit: int | None = None) -> dict[str, Any]:
        """What the node's lanes ran lately (``GET /api/v1/runs``): ``now`` (the node's clock), ``fields`` and
        ``runs``, one list of those fields a run; with ``since``, the runs that ended then or later; the last
        ``limit`` of them (the node's default: 1000). Also ``stall_fields`` and ``stalls``: the controller's
        stalls (turns of its event loop, collections) that ended then or later."""
        query = urllib.parse.urlencode({k: v for k, v in (("since", since), ("limit", limit)) if v is not None})
        return self._json("GET", f"/api/v1/runs?{query}" if query else "/api/v1/runs")

    def model_metadata(self, name: str) -> dict[str, Any]:
        """``GET /v2/models/{name}``: name, platform, inputs and outputs (name, datatype, shape)."""
        return self._json("GET", f"/v2/models/{_q(name)}")

    def infer(self, name: str, inputs: Mapping[str, Any], binary: bool = True) -> dict[str, torch.Tensor]:
        """Run one request. ``inputs`` maps input names to numpy arrays or torch tensors (batch first).

        ``binary`` uses the OIP binary tensor extension both ways (raw bytes after a JSON header);
        otherwise plain OIP JSON. Outputs come back as CPU torch tensors in the declared order
        (``.numpy()`` for arrays). The wire format is the gateway's own codec (``swapserve.gateway.oip``).
        """
        from swapserve.gateway import oip

        tensors = {n: _as_tensor(n, x) for n, x in inputs.items()}
        enc = oip.encode_infer_request(tensors, binary_inputs=binary, binary_outputs=binary)
        headers = {"Content-Type": enc.content_type}
        if enc.header_length is not None:
            headers[oip.HEADER_LENGTH] = str(enc.header_length)
        data, resp_headers = self._request("POST", f"/v2/models/{_q(name)}/infer", body=enc.body, headers=headers)
        _, outputs = oip.decode_infer_response(data, resp_headers.get(oip.HEADER_LENGTH.lower()))
        return outputs

    def invoke_json(self, name: str, value: Any, parameters: Mapping[str, str] | None = None) -> Any:
        """The simple route of a function with a handler: any JSON value in, the handler's JSON value out
        (``parameters`` travel as the query string)."""
        query = ("?" + urllib.parse.urlencode(dict(parameters))) if parameters else ""
        return self._json("POST", f"/v1/functions/{_q(name)}/invoke{query}", body=json.dumps(value).encode(),
                          headers={"Content-Type": "application/json"})

    # --- transport -------------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        data, _ = self._request(method, path, **kw)
        try:
            return json.loads(data) if data else None
        except json.JSONDecodeError:
            raise ClientError(0, f"{method} {path}: the server's answer is not JSON: {data[:200]!r}") from None

    def _request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                 timeout: float | None = None) -> tuple[bytes, dict[str, str]]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=dict(headers or {}))
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.read(), {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as e:
            raise _http_error(e) from None
        except urllib.error.URLError as e:
            raise ClientError(0, f"cannot reach the swapserve node at {self.url}: {e.reason}") from None
        except TimeoutError:
            raise ClientError(0, f"{method} {path}: no answer from {self.url} "
                                 f"within {timeout or self.timeout:g} s") from None
        except (http.client.HTTPException, ConnectionError) as e:  # e.g. the node went away mid-request
            raise ClientError(0, f"{method} {path}: the connection to {self.url} failed: "
                                 f"{type(e).__name__}: {e}") from None


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _http_error(e: urllib.error.HTTPError) -> ClientError:
    raw = e.read() or b""
    message = ""
    try:
        body = json.loads(raw)
        message = str(body.get("error", "")) if isinstance(body, dict) else ""
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    message = message or raw.decode("utf-8", "replace").strip()[:500] or str(e.reason)
    retry = e.headers.get("Retry-After") if e.headers else None
    try:
        retry_after = float(retry) if retry is not None else None
    except ValueError:
        retry_after = None
    return ClientError(e.code, message, retry_after)


def _as_tensor(name: str, x: Any) -> torch.Tensor:
    import torch

    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.from_numpy(np.ascontiguousarray(x))
    except TypeError:
        raise TypeError(f"input {name!r}: expected a numpy array or a torch tensor, not {type(x).__name__}") from None


__all__ = ["API", "Client", "ClientError"]
