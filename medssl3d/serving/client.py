"""A small client of the MONAI Label REST API (standard library only): info, datastore, infer, labels, train."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

#: Inference and training on a CPU take minutes; a request waits that long before giving up.
REQUEST_TIMEOUT_S = 1800.0


class LabelClient:
    """Talks to one MONAI Label server.

    Args:
        url: the server's base address, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds a request may take.
    """

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, query: dict | None = None, body: bytes | None = None,
                 content_type: str | None = None) -> bytes:
        address = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        request = urllib.request.Request(address, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    @staticmethod
    def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
        boundary = uuid.uuid4().hex
        chunks: list[bytes] = []
        for name, value in fields.items():
            chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, path in files.items():
            chunks.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode()
            )
            chunks.append(path.read_bytes() + b"\r\n")
        chunks.append(f"--{boundary}--\r\n".encode())
        return b"".join(chunks), f"multipart/form-data; boundary={boundary}"

    def info(self) -> dict[str, Any]:
        """``GET /info/``: the app, its models (labels, type) and trainers."""
        return json.loads(self._request("GET", "/info/"))

    def datastore(self) -> dict[str, Any]:
        """``GET /datastore/?output=all``: the studies and their labels."""
        return json.loads(self._request("GET", "/datastore/", {"output": "all"}))

    def infer(self, model: str, image: str, output: str | os.PathLike) -> Path:
        """``POST /infer/<model>?image=<id>&output=image``; writes the returned label volume to ``output``."""
        body, content_type = self._multipart({"params": "{}"}, {})
        data = self._request("POST", f"/infer/{model}", {"image": image, "output": "image"}, body, content_type)
        output = Path(output)
        output.write_bytes(data)
        return output

    def save_label(self, image: str, label: str | os.PathLike, tag: str = "final") -> dict[str, Any]:
        """``PUT /datastore/label?image=<id>``: store a finished label for a study."""
        body, content_type = self._multipart({"params": "{}"}, {"label": Path(label)})
        return json.loads(self._request("PUT", "/datastore/label", {"image": image, "tag": tag}, body, content_type))

    def train(self, model: str, **params: Any) -> Any:
        """``POST /train/<model>?run_sync=true`` with ``params`` (e.g. ``max_epochs=1``); waits for the end."""
        body = json.dumps(params).encode()
        return json.loads(self._request("POST", f"/train/{model}", {"run_sync": "true"}, body, "application/json"))
