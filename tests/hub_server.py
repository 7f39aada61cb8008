"""Loopback servers for the download tests: `Seeder`, a real libtorrent seeder (at the end), and
`HubServer`, an HTTP server speaking the part of the Hugging Face hub API that huggingface_hub
and `grokctl download` use, serving the files of a local directory as one model repo.

- GET  /api/models/{repo}/revision/{rev}      model info (`sha` = the commit)
- GET  /api/models/{repo}/tree/{rev}[/{path}]  file listing: size, git oid, `lfs` {oid: sha256}
- HEAD/GET /{repo}/resolve/{rev}/{path}        ETag, X-Repo-Commit, X-Linked-Etag/-Size; LFS
                                               files redirect (302) to /_lfs/{sha256} like the
                                               hub's CDN; Range -> 206
- GET  /raw/{name}                             plain files (e.g. the tokenizer's source URL)

Test hooks: `cut[path] = offset` closes the connection once a response reaches byte `offset` of
the file (every time while set, or once with `cut_once`); `stall[path] = offset` stops sending there until the server
stops; `token` requires `Authorization: Bearer <token>`; `virtual[path] = size` lists a file
that is never served; `extra[name] = bytes` lists and serves a file under any name, however
hostile (`ckpt-0/../../x`, an absolute path, control characters), also at the URL a client
reaches after normalising the name's `..`; `requests` records (method, path, Range) of every
request.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self, root: Path, repo: str = "xai-org/grok-1", lfs_prefix: str = "ckpt-0/"):
        self.root, self.repo, self.lfs_prefix = Path(root), repo, lfs_prefix
        self.commit = COMMIT
        self.cut: dict[str, int] = {}
        self.cut_once = False
        self.stall: dict[str, int] = {}
        self.virtual: dict[str, int] = {}
        self.extra: dict[str, bytes] = {}
        self.raw: dict[str, bytes] = {}
        self.token: str | None = None
        self.requests: list[tuple[str, str, str | None]] = []
        self._stop = threading.Event()
        self._files: dict[str, dict[str, Any]] = {}
        self.rescan()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def rescan(self) -> None:
        """(Re)read the served directory: sizes, sha256 and git oids."""
        self._files = {}
        for f in sorted(self.root.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                rel = f.relative_to(self.root).as_posix()
                self._files[rel] = {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "oid": git_oid(data),
                    "lfs": rel.startswith(self.lfs_prefix),
                }

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- API payloads -----------------------------------------------------------------------
    def tree(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        dirs = sorted({p.rsplit("/", 1)[0] for p in [*self._files, *self.virtual] if "/" in p})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in dirs]
        for path, meta in self._files.items():
            entry: dict[str, Any] = {
                "type": "file",
                "oid": meta["oid"],
                "size": meta["size"],
                "path": path,
            }
            if meta["lfs"]:
                entry["lfs"] = {"oid": meta["sha256"], "size": meta["size"], "pointerSize": 134}
            entries.append(entry)
        for path, size in self.virtual.items():
            entries.append(
                {
                    "type": "file",
                    "oid": "f" * 40,
                    "size": size,
                    "path": path,
                    "lfs": {"oid": "e" * 64, "size": size, "pointerSize": 134},
                }
            )
        for path, data in self.extra.items():
            entries.append({"type": "file", "oid": git_oid(data), "size": len(data), "path": path})
        return entries

    def extra_for(self, url_path: str) -> str | None:
        """The `extra` name a resolve URL asks for (as sent, or with its `..` normalised)."""
        for name in self.extra:
            for rev in ("main", self.commit):
                url = f"/{self.repo}/resolve/{rev}/{name}"
                if url_path in (url, posixpath.normpath(url), url.replace("//", "/")):
                    return name
        return None


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str) -> None:
            self._json({"error": code}, status, {"X-Error-Code": code, "X-Error-Message": code})

        def _route(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                if not path.startswith("/raw/"):
                    return self._error(401, "RepoNotFound")
            repo = re.escape(hub.repo)
            if m := re.fullmatch(rf"/api/models/{repo}/revision/([^/]+)", path):
                if m.group(1) not in ("main", hub.commit):
                    return self._error(404, "RevisionNotFound")
                siblings = [{"rfilename": p} for p in [*hub._files, *hub.virtual]]
                return self._json(
                    {
                        "id": hub.repo,
                        "modelId": hub.repo,
                        "sha": hub.commit,
                        "private": False,
                        "siblings": siblings,
                    }
                )
            if m := re.fullmatch(rf"/api/models/{repo}/tree/([^/]+)(/.*)?", path):
                if m.group(1) not in ("main", hub.commit):
                    return self._error(404, "RevisionNotFound")
                sub = (m.group(2) or "").strip("/")
                entries = [e for e in hub.tree() if not sub or e["path"].startswith(sub + "/")]
                return self._json(entries)
            if (name := hub.extra_for(path)) is not None:
                headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{git_oid(hub.extra[name])}"'}
                return self._send_bytes(name, hub.extra[name], head, headers)
            if m := re.fullmatch(rf"/{repo}/resolve/([^/]+)/(.+)", path):
                meta = hub._files.get(m.group(2))
                if meta is None or m.group(1) not in ("main", hub.commit):
                    return self._error(404, "EntryNotFound")
                common = {"X-Repo-Commit": hub.commit, "ETag": f'"{meta["oid"]}"'}
                if meta["lfs"]:
                    common.update(
                        {
                            "X-Linked-Etag": f'"{meta["sha256"]}"',
                            "X-Linked-Size": str(meta["size"]),
                            "Location": f"/_lfs/{meta['sha256']}?name={m.group(2)}",
                        }
                    )
                    self.send_response(302)
                    for k, v in common.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._send_file(m.group(2), head, common)
            if m := re.fullmatch(r"/_lfs/([0-9a-f]{64})", path):
                name = urlparse(self.path).query.removeprefix("name=")
                if name not in hub._files or hub._files[name]["sha256"] != m.group(1):
                    return self._error(404, "EntryNotFound")
                return self._send_file(name, head, {"ETag": f'"{m.group(1)}"'})
            if path.startswith("/api/models/"):  # another repo: the hub answers 401
                return self._error(401, "RepoNotFound")
            if path.startswith("/raw/") and path[5:] in hub.raw:
                return self._send_bytes(path[5:], hub.raw[path[5:]], head, {})
            return self._error(404, "EntryNotFound")

        def _send_file(self, name: str, head: bool, headers: dict[str, str]) -> None:
            self._send_bytes(name, (hub.root / name).read_bytes(), head, headers)

        def _send_bytes(self, name: str, data: bytes, head: bool, headers: dict[str, str]) -> None:
            start, end = 0, len(data)
            rng = self.headers.get("Range")
            status = 200
            if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
                start = int(m.group(1))
                end = int(m.group(2)) + 1 if m.group(2) else len(data)
                if start >= len(data):
                    return self._error(416, "RangeNotSatisfiable")
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
            self.send_response(status)
            for k, v in {**headers, "Accept-Ranges": "bytes"}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if head:
                return
            stop_at = min(hub.cut.get(name, end), hub.stall.get(name, end))
            if stop_at < end:
                if start < stop_at:
                    self.wfile.write(data[start:stop_at])
                self.wfile.flush()
                if name in hub.stall:
                    hub._stop.wait(60)
                elif hub.cut_once:
                    hub.cut.pop(name, None)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data[start:end])

    return Handler


# --- BitTorrent ---------------------------------------------------------------------------------

LOOPBACK_SETTINGS = {
    "listen_interfaces": "127.0.0.1:0",
    "enable_dht": False,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "allow_multiple_connections_per_ip": True,
}


def make_torrent(directory: Path, piece_size: int = 16384) -> bytes:
    """A v1 .torrent of `directory` (named after it), as the official Grok-1 torrent is."""
    import libtorrent as lt

    files = sorted(lt.list_files(str(directory)), key=lambda e: e.filename)
    ct = lt.create_torrent(files, piece_size, lt.create_torrent.v1_only)
    lt.set_piece_hashes(ct, str(directory.parent))
    return bytes(lt.bencode(ct.generate()))


class Seeder:
    """A real libtorrent session seeding `directory` on 127.0.0.1 (no DHT, LSD, UPnP, NAT-PMP)."""

    def __init__(self, directory: Path):
        import libtorrent as lt

        self.torrent = make_torrent(directory)
        self.ti = lt.torrent_info(self.torrent)
        self.info_hash = str(self.ti.info_hashes().v1)
        self.session = lt.session(LOOPBACK_SETTINGS)
        atp = lt.add_torrent_params()
        atp.ti, atp.save_path = self.ti, str(directory.parent)
        atp.flags |= lt.torrent_flags.seed_mode
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        self.handle = self.session.add_torrent(atp)
        self.port = self.session.listen_port()

    def throttle(self, bytes_per_s: int) -> None:
        """Limit the upload rate (0: unlimited); loopback peers are otherwise exempt."""
        self.handle.set_upload_limit(bytes_per_s)
        self.session.apply_settings({"ignore_limits_on_local_network": bytes_per_s <= 0})

    @property
    def magnet(self) -> str:
        return f"magnet:?xt=urn:btih:{self.info_hash}"

    @property
    def peer(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.session.remove_torrent(self.handle)
