"""Download by magnet link (or .torrent file) with libtorrent.

Two phases. (1) Without the torrent's metadata, add the magnet, wait for the metadata, save it
as `<dir>/grokctl.torrent` (verify --torrent uses its piece hashes) and drop the magnet.
(2) Add the torrent from its metadata with the selected files' priorities, the save path in
`<dir>/.grokctl-partial/bt-<info-hash>/`, and the resume data of an earlier run if any. libtorrent
checks every piece against the torrent's hashes; when all pieces of a file have passed, the file
is renamed by libtorrent to its final name under `<dir>` and recorded in the manifest (its sha256
computed locally). Resume data is saved periodically and on exit, so a restart continues where
it stopped; without it, files the manifest records as complete are re-checked, not fetched.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grokctl.atomic import atomic_write_bytes
from grokctl.config import default
from grokctl.errors import GrokctlError, UsageError
from grokctl.fetch.common import check_disk_space, partial_dir, prune_partial, select, sha256_file
from grokctl.fetch.manifest import FileRecord, Manifest
from grokctl.fetch.pieces import torrent_files
from grokctl.paths import check_relative_path, shown

OFFICIAL_MAGNET: str = default("magnet")  # stated once, in grokctl.config.SETTINGS
TORRENT_NAME = "grokctl.torrent"
DEFAULT_LISTEN: str = default("listen")


def _lt() -> Any:
    import libtorrent

    return libtorrent


@dataclasses.dataclass
class TorrentOptions:
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    listen: str = DEFAULT_LISTEN
    dht: bool = True  # DHT, local peer discovery, UPnP and NAT-PMP
    trackers: bool = True
    peers: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    seed: bool = False
    timeout: float = 0.0  # give up after this long without progress (0: never)
    resume_interval: float = 30.0
    dry_run: bool = False


@dataclasses.dataclass
class TorrentStatus:
    state: str
    done: int
    total: int
    rate: float  # bytes/s
    peers: int


@dataclasses.dataclass
class TorrentResult:
    info_hash: str
    name: str
    files: list[dict[str, Any]]
    bytes_total: int
    bytes_fetched: int
    seconds: float
    hash_failures: int
    torrent: str
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "info_hash": self.info_hash,
            "name": self.name,
            "files": len(self.files),  # `files` is a count in every command's json
            "bytes": self.bytes_total,
            "bytes_fetched": self.bytes_fetched,
            "seconds": round(self.seconds, 3),
            "hash_failures": self.hash_failures,
            "torrent": self.torrent,
            "dry_run": self.dry_run,
        }
        if self.dry_run:
            out["listing"] = [dict(f) for f in self.files]  # the per-file listing: --dry-run
        return out


def parse_peer(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--peer {text!r}: expected HOST:PORT")
    return host, int(port)


class _Run:
    """One session, one torrent: alert handling shared by every wait."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        opts: TorrentOptions,
        on_status: Callable[[TorrentStatus], None] | None,
    ):
        lt = _lt()
        self.root, self.manifest, self.opts = root.absolute(), manifest, opts
        self.on_status = on_status
        cat = lt.alert.category_t
        discovery = ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp")
        self.settings = {
            "listen_interfaces": opts.listen,
            "allow_multiple_connections_per_ip": True,
            "alert_mask": cat.error_notification | cat.status_notification
            | cat.storage_notification | cat.file_progress_notification,
            **{name: opts.dht for name in discovery},
        }  # fmt: skip
        self.session: Any = None  # started by the first add(): nothing listens before
        self.handle: Any = None
        self.metadata = False
        self.at_final: set[int] = set()
        self.renaming: set[int] = set()
        self.final: dict[int, Path] = {}
        self.hash_failures = 0
        self.resume_path: Path | None = None
        self.resume_saved = False
        self.errors: list[str] = []
        self.hasher = cf.ThreadPoolExecutor(max_workers=1)
        self.hashes: list[cf.Future[None]] = []

    def add(self, atp: Any) -> None:
        lt = _lt()
        if self.session is None:
            self.session = lt.session(self.settings)
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        if not self.opts.trackers:
            atp.trackers = []
        if not self.opts.dht:
            atp.flags |= lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd
        self.handle = self.session.add_torrent(atp)
        for peer in self.opts.peers:
            self.handle.connect_peer(peer)

    def pump(self, seconds: float) -> None:
        lt = _lt()
        self.session.wait_for_alert(int(seconds * 1000))
        for a in self.session.pop_alerts():
            if isinstance(a, lt.metadata_received_alert):
                self.metadata = True
            elif isinstance(a, lt.file_completed_alert) and a.index in self.final:
                self.rename_to_final(a.index)
            elif isinstance(a, lt.file_renamed_alert) and a.index in self.final:
                new = a.new_name() if callable(a.new_name) else a.new_name
                if Path(new) == self.final[a.index]:
                    self._completed(a.index)
            elif isinstance(a, lt.hash_failed_alert):
                self.hash_failures += 1
            elif isinstance(a, lt.save_resume_data_alert) and self.resume_path is not None:
                atomic_write_bytes(self.resume_path, lt.write_resume_data_buf(a.params))
                self.resume_saved = True
            elif isinstance(a, lt.save_resume_data_failed_alert):
                self.resume_saved = True
            elif isinstance(
                a,
                (
                    lt.torrent_error_alert,
                    lt.file_error_alert,
                    lt.file_rename_failed_alert,
                    lt.metadata_failed_alert,
                ),
            ):
                self.errors.append(a.message())

    def _completed(self, index: int) -> None:
        self.at_final.add(index)
        name = self.final[index].relative_to(self.root).as_posix()
        self.manifest.mark_downloaded(name)

        def hash_it() -> None:
            self.manifest.mark_downloaded(name, sha256_file(self.final[index]), "local")
            self.manifest.save(min_interval=2.0)

        self.hashes.append(self.hasher.submit(hash_it))

    def status(self) -> Any:
        st = self.handle.status()
        if self.on_status:
            done, total, rate = st.total_wanted_done, st.total_wanted, float(st.download_rate)
            self.on_status(TorrentStatus(str(st.state), done, total, rate, int(st.num_peers)))
        return st

    def check_errors(self) -> None:
        if self.errors:
            raise GrokctlError(f"libtorrent: {shown(self.errors[0], 300)}")

    def save_resume(self, wait: float = 10.0) -> None:
        if self.handle is None or self.resume_path is None or not self.metadata:
            return
        self.resume_saved = False
        self.handle.save_resume_data(_lt().save_resume_flags_t.save_info_dict)
        deadline = time.monotonic() + wait
        while not self.resume_saved and time.monotonic() < deadline:
            self.pump(0.2)

    def rename_to_final(self, index: int) -> None:
        if index not in self.at_final and index not in self.renaming:
            self.renaming.add(index)
            self.handle.rename_file(index, str(self.final[index]))

    def remove(self) -> None:
        if self.handle is not None:
            self.session.remove_torrent(self.handle)
            self.handle = None

    def close(self) -> None:
        self.hasher.shutdown(wait=True)
        self.remove()


def _payload_fetched(run: _Run, done_at_start: int) -> int:
    """Payload bytes this run received: at least the wanted bytes it completed (each piece
    passed its hash, so it came over the wire), more where pieces came twice or failed. The
    count of received payload is libtorrent's, which adds its peers' statistics into the torrent
    on its one-second tick: a transfer that ends between two ticks is not all counted yet, so
    wait up to three seconds for it to cover what the run completed — and take the completed
    bytes where it does not: a peer that disconnects as the torrent finishes can take its last
    block's count with it (CI saw 16 KiB of 1.5 MB missing after 10 s)."""
    st = run.handle.status()
    completed = int(st.total_wanted_done) - done_at_start
    deadline = time.monotonic() + 3.0
    while st.total_payload_download < completed and time.monotonic() < deadline:
        time.sleep(0.05)
        st = run.handle.status()
    return max(int(st.total_payload_download), completed)


def _wait_for(run: _Run, done: Callable[[], bool], what: str) -> None:
    """Pump alerts until `done()`; give up after opts.timeout seconds without progress."""
    last, last_change = -1, time.monotonic()
    while not done():
        run.pump(0.25)
        run.check_errors()
        st = run.status()
        progress = st.total_wanted_done + (1 if run.metadata else 0)
        if progress != last:
            last, last_change = progress, time.monotonic()
        elif run.opts.timeout and time.monotonic() - last_change > run.opts.timeout:
            raise GrokctlError(
                f"no progress for {run.opts.timeout:g} s while {what} ({st.num_peers} peers); "
                "run the same command again to resume"
            )


def download_magnet(
    source: str,
    root: Path,
    manifest: Manifest,
    opts: TorrentOptions,
    on_status: Callable[[TorrentStatus], None] | None = None,
    on_complete: Callable[[TorrentResult], None] | None = None,
) -> TorrentResult:
    """Fetch the selected files of the torrent `source` (magnet URI or .torrent path) into `root`."""
    lt = _lt()
    start = time.perf_counter()
    root = root.absolute()
    saved = root / TORRENT_NAME
    if source.startswith("magnet:"):
        try:
            magnet = lt.parse_magnet_uri(source)
        except RuntimeError as exc:
            raise UsageError(f"not a valid magnet link: {source!r} ({exc})") from None
        if not magnet.info_hashes.has_v1():
            raise UsageError(f"{source!r}: only torrents with a v1 info-hash are supported")
        info_hash = str(magnet.info_hashes.v1)
        ti = _load_ti(saved, info_hash)
    elif Path(source).is_file():
        magnet, ti = None, _load_ti(Path(source), "")
        info_hash = str(ti.info_hashes().v1)
    else:
        raise UsageError(f"{source}: not a magnet link or a .torrent file")
    root.mkdir(parents=True, exist_ok=True)
    run = _Run(root, manifest, opts, on_status)
    try:
        if ti is None:  # phase 1: metadata from the swarm
            magnet.save_path = str(partial_dir(root) / f"bt-{info_hash}")
            run.add(magnet)
            _wait_for(run, lambda: run.metadata, "fetching the torrent's metadata")
            ti = run.handle.torrent_file()
            run.remove()
        _check_names(ti, root)  # before the torrent is saved or any file is written
        if not saved.is_file() or _load_ti(saved, info_hash) is None:
            atomic_write_bytes(saved, b"d4:info" + bytes(ti.info_section()) + b"e")
        return _phase2(run, ti, info_hash, source, opts, start, on_complete)
    finally:
        run.close()


def _check_names(ti: Any, root: Path) -> None:
    """Every file name of the torrent, selected or not, must be a safe path under `root`."""
    for _, p, _ in torrent_files(ti):
        check_relative_path(p, root, "torrent file")


def _load_ti(path: Path, info_hash: str) -> Any:
    if not path.is_file():
        return None
    lt = _lt()
    try:
        ti = lt.torrent_info(path.read_bytes())
    except RuntimeError as exc:
        raise UsageError(f"{path}: not a readable .torrent file ({exc})") from None
    return ti if not info_hash or str(ti.info_hashes().v1) == info_hash else None


def _phase2(
    run: _Run,
    ti: Any,
    info_hash: str,
    source: str,
    opts: TorrentOptions,
    start: float,
    on_complete: Callable[[TorrentResult], None] | None,
) -> TorrentResult:
    lt = _lt()
    root, manifest = run.root, run.manifest
    files = torrent_files(ti)
    chosen = set(select([p for _, p, _ in files], opts.include, opts.exclude))
    if not chosen:
        raise UsageError("no file of the torrent matches --include/--exclude")
    sel = [(i, p, s) for i, p, s in files if p in chosen]
    present = {i for i, p, s in sel if (root / p).is_file() and (root / p).stat().st_size == s}
    listing = [{"path": p, "size": s, "present": i in present} for i, p, s in sel]
    total = sum(s for _, _, s in sel)
    torrent = str(root / TORRENT_NAME)
    result = TorrentResult(info_hash, ti.name(), listing, total, 0, 0.0, 0, torrent, opts.dry_run)
    check_disk_space(root, sum(s for i, _, s in sel if i not in present))
    if opts.dry_run:
        return result
    uri = source if source.startswith("magnet:") else None
    src = manifest.add_source(
        f"magnet:{info_hash}",
        kind="magnet",
        info_hash=info_hash,
        name=ti.name(),
        torrent=TORRENT_NAME,
        uri=uri,
    )
    trusted = set()  # complete under the final name by the manifest: libtorrent re-checks them
    for i, p, s in sel:
        rec = manifest.files.get(p)
        if i in present and rec is not None and rec.size == s and rec.downloaded:
            trusted.add(i)
        else:
            manifest.record(p, FileRecord(s, None, None, src))
    manifest.save()
    run.final = {i: root / p for i, p, _ in sel}
    save_path = partial_dir(root) / f"bt-{info_hash}"
    save_path.mkdir(parents=True, exist_ok=True)
    run.resume_path = partial_dir(root) / f"bt-{info_hash}.resume"
    atp = None
    if run.resume_path.is_file():
        try:
            atp = lt.read_resume_data(run.resume_path.read_bytes())
        except RuntimeError:
            atp = None  # unreadable: libtorrent re-checks the files instead
    if atp is None or atp.ti is None:
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.renamed_files = {i: str(run.final[i]) for i in trusted}
    atp.save_path = str(save_path)
    atp.file_priorities = [4 if i in run.final else 0 for i in range(ti.layout().num_files())]
    renamed = dict(atp.renamed_files).items()
    run.at_final = {i for i, f in renamed if i in run.final and Path(f) == run.final[i]}
    run.metadata = True
    # Wanted bytes already on disk when the transfer starts: none for a fresh download, else
    # read once checking has ended (a best effort: pieces may arrive before the first look).
    done_at_start: int | None = None if (run.resume_path.is_file() or trusted) else 0
    run.add(atp)
    last_resume = time.monotonic()

    def finished() -> bool:
        nonlocal last_resume, done_at_start
        st = run.handle.status()
        if st.state in (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data):
            return False
        if done_at_start is None:
            done_at_start = int(st.total_wanted_done)
        if time.monotonic() - last_resume > opts.resume_interval:
            run.handle.save_resume_data(lt.save_resume_flags_t.save_info_dict)
            last_resume = time.monotonic()
        if not st.is_finished:
            return False
        for i in set(run.final) - run.at_final:  # complete before this run, not yet renamed
            run.rename_to_final(i)
        return run.at_final >= set(run.final)

    try:
        _wait_for(run, finished, "downloading")
    finally:
        run.save_resume()
        cf.wait(run.hashes)
        manifest.save()
    result.bytes_fetched = _payload_fetched(run, done_at_start or 0)
    result.hash_failures = run.hash_failures
    result.seconds = time.perf_counter() - start
    if on_complete:
        on_complete(result)
    if opts.seed:
        _seed(run)
    run.remove()
    run.resume_path.unlink(missing_ok=True)
    shutil.rmtree(save_path, ignore_errors=True)
    prune_partial(root)
    return result


def _seed(run: _Run) -> None:
    """Keep seeding until Ctrl-C (or SIGINT)."""
    try:
        while True:
            run.pump(1.0)
            run.check_errors()
            run.status()
    except KeyboardInterrupt:
        return
