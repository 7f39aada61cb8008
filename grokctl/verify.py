"""Prove a checkpoint directory complete and intact before GPU time is spent on it.

Checks, cheapest first:
- sizes: every expected file is there with its exact size. Expected = always the files of the
  model's layout (`checkpoint.xai.sizes`: 770 files with their exact sizes for grok-1, computed from
  the model config for other checkpoints), plus the other files `grokctl-manifest.json` lists.
  The manifest says how files look, not which files matter: a manifest that is malformed or
  names a path outside the checkpoint is refused (a finding), and one whose size for a layout
  file disagrees with the layout is reported;
- structure: every tensor file parses with the safe reader and holds the shape and dtype the
  model config says (`checkpoint.xai.reader.check_entry`); a native checkpoint's safetensors
  headers are validated and every tensor checked against config.json
  (`checkpoint.native.check_entry`); `deep` also scans floats for NaN/Inf;
- sha256 of every file the manifest gives one for, in parallel over the cores; with a manifest,
  a file of the layout it gives no sha256 for is `unverified` (not ok);
- `torrent`: every piece re-hashed against the torrent's piece hashes.
The result is a `VerifyReport` (missing / corrupt / unverified / unexpected files); nothing
raises for a bad file, so one run reports them all.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from grokctl.checkpoint import native
from grokctl.checkpoint.layout import param_specs
from grokctl.checkpoint.refs import ArrayRef, QuantRef
from grokctl.checkpoint.xai.files import CKPT_SUBDIR
from grokctl.checkpoint.xai.reader import check_entry
from grokctl.checkpoint.xai.safe_pickle import parse_tensor_file
from grokctl.checkpoint.xai.sizes import expected_files, expected_specs
from grokctl.config import CONFIG_FILENAME, load_model_config
from grokctl.errors import IntegrityError, MissingResourceError, UsageError
from grokctl.fetch.common import PARTIAL_DIR, sha256_file
from grokctl.fetch.manifest import MANIFEST_NAME, Manifest
from grokctl.tokenizer import GROK1_TOKENIZER_BYTES, GROK1_TOKENIZER_SHA256, TOKENIZER_FILENAME
from grokctl.units import human_bytes

# on_phase(description, total_bytes) -> callback receiving bytes done (progress bars).
PhaseCallback = Callable[[str, int], Callable[[int], None]]


@dataclasses.dataclass(frozen=True)
class Finding:
    path: str
    kind: str  # missing | size | sha256 | structure | nonfinite | pieces | unexpected
    detail: str


@dataclasses.dataclass
class VerifyReport:
    root: str
    mode: str  # "manifest" | "layout"
    model: str
    files: int = 0
    bytes: int = 0
    missing: list[Finding] = dataclasses.field(default_factory=list)
    corrupt: list[Finding] = dataclasses.field(default_factory=list)
    unverified: list[Finding] = dataclasses.field(default_factory=list)
    unexpected: list[Finding] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    checks: dict[str, str] = dataclasses.field(default_factory=dict)
    bytes_hashed: int = 0
    hash_seconds: float = 0.0
    pieces_checked: int = 0
    pieces_failed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt and not self.unverified

    @property
    def hash_gb_per_s(self) -> float:
        return self.bytes_hashed / self.hash_seconds / 1e9 if self.hash_seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        out = {"checkpoint": self.root, **dataclasses.asdict(self)}
        del out["root"]  # `checkpoint`, as in every command's json
        out.update(ok=self.ok, hash_gb_per_s=round(self.hash_gb_per_s, 3))
        out["hash_seconds"], out["seconds"] = round(self.hash_seconds, 3), round(self.seconds, 3)
        return out


def _noop(desc: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def verify_checkpoint(
    root: str | os.PathLike[str],
    *,
    preset: str | None = None,
    deep: bool = False,
    quick: bool = False,
    torrent: bool = False,
    torrent_file: Path | None = None,
    workers: int | None = None,
    on_phase: PhaseCallback | None = None,
) -> VerifyReport:
    """Check `root` (the download directory, or its ckpt-0/); see the module docstring."""
    start = time.perf_counter()
    on_phase = on_phase or _noop
    base = Path(root)
    if not base.is_dir():
        raise MissingResourceError(f"checkpoint directory not found: {base}")
    if base.name == CKPT_SUBDIR and not (base / MANIFEST_NAME).exists():
        base = base.parent
    cfg = load_model_config(base, preset)
    has_config = (base / CONFIG_FILENAME).is_file()
    model = CONFIG_FILENAME if has_config else (preset or "grok-1")
    manifest, manifest_error = _load_manifest(base)
    report = VerifyReport(str(base), "manifest" if manifest else "layout", model)
    if manifest_error:
        report.corrupt.append(Finding(MANIFEST_NAME, "manifest", manifest_error))
        report.checks["manifest"] = "FAILED (refused: checked against the layout only)"
    workers = workers or os.cpu_count() or 1
    is_native = not (base / CKPT_SUBDIR).is_dir() and native.detect(base) is not None

    # What should be there: path -> (size, sha256 or None). The layout decides which files
    # matter; the manifest adds its other files and the checksums.
    if is_native:  # the files the index names (sizes as found; the headers are checked below)
        files = [*native.shard_files(base), base / native.INDEX_NAME, base / CONFIG_FILENAME]
        layout = {f.name: f.stat().st_size for f in files if f.is_file()}
    else:
        layout = expected_files(cfg)
    expected: dict[str, tuple[int, str | None]] = {p: (s, None) for p, s in layout.items()}
    if manifest is not None:
        for path, rec in manifest.files.items():
            if path in layout and rec.size != layout[path]:
                report.corrupt.append(
                    Finding(
                        path,
                        "manifest",
                        f"{MANIFEST_NAME} says {rec.size} bytes, the layout of {model} "
                        f"{layout[path]}: the manifest does not describe this checkpoint",
                    )
                )
            else:
                expected[path] = (rec.size, rec.sha256)
    tok = base / TOKENIZER_FILENAME
    if tok.is_file() and not has_config and not expected.get(TOKENIZER_FILENAME, (0, None))[1]:
        expected[TOKENIZER_FILENAME] = (GROK1_TOKENIZER_BYTES, GROK1_TOKENIZER_SHA256)
    elif not tok.is_file() and TOKENIZER_FILENAME not in expected:
        report.warnings.append(f"no {TOKENIZER_FILENAME} (grokctl download fetches it)")
    report.files, report.bytes = len(expected), sum(s for s, _ in expected.values())

    intact: list[str] = []  # present with the right size
    for path, (size, _) in sorted(expected.items()):
        full = base / path
        if not full.is_file():
            if os.path.lexists(full):
                report.corrupt.append(Finding(path, "size", "not a regular file"))
            else:
                report.missing.append(Finding(path, "missing", "not found"))
        elif (actual := full.stat().st_size) != size:
            what = "truncated" if actual < size else "too long"
            report.corrupt.append(Finding(path, "size", f"{what}: {actual} bytes, expected {size}"))
        else:
            intact.append(path)
    report.checks["sizes"] = _verdict(report, len(expected))
    _unexpected(base, expected, report)

    if is_native:
        refs = _native_structure(base, intact, model, cfg, report, workers)
    else:
        specs = expected_specs(cfg)
        _explain_sizes(base, specs, report)
        tensors = [p for p in intact if p.startswith(CKPT_SUBDIR + "/")]
        refs = list(_structure(base, tensors, specs, model, report, workers).items())
    if deep:
        _nonfinite(refs, report, workers, on_phase)
    else:
        report.checks["nan_inf"] = "skipped (use --deep)"

    to_hash = [p for p in intact if expected[p][1]]
    if quick:
        report.checks["sha256"] = "skipped (--quick)"
    else:
        if manifest is not None:  # a manifest vouches for every file of the layout, or fails
            reported = {f.path for f in report.corrupt}
            for path in sorted(set(intact) & set(layout) - set(to_hash) - reported):
                why = "no sha256" if path in manifest.files else "no entry"
                report.unverified.append(
                    Finding(path, "unverified", f"{why} in {MANIFEST_NAME}: content not checked")
                )
        if to_hash:
            _hash(base, to_hash, expected, report, workers, on_phase)
        else:
            report.checks["sha256"] = (
                "no checksums (manifest refused)"
                if manifest_error
                else "no checksums (no manifest)"
                if manifest is None
                else "no checksums"
            )
        if report.unverified:
            report.checks["sha256"] += (
                f"; UNVERIFIED ({len(report.unverified)} of {len(layout)} files have no "
                f"sha256 in {MANIFEST_NAME})"
            )

    if torrent or torrent_file:
        _pieces(base, torrent_file, manifest, report, workers, on_phase)
    report.seconds = time.perf_counter() - start
    return report


def _load_manifest(base: Path) -> tuple[Manifest | None, str | None]:
    """The manifest, or (None, why it was refused): a bad manifest is a finding, and the
    checkpoint is still checked against its layout."""
    try:
        return Manifest.load(base), None
    except IntegrityError as exc:
        return None, str(exc).removeprefix(f"{base / MANIFEST_NAME}: ").removeprefix(f"{base}: ")


def _verdict(report: VerifyReport, n: int, kinds: tuple[str, ...] = ("missing", "size")) -> str:
    bad = [f for f in report.missing + report.corrupt if f.kind in kinds]
    return f"ok ({n} files)" if not bad else f"FAILED ({len(bad)} of {n})"


def _explain_sizes(base: Path, specs: dict[str, Any], report: VerifyReport) -> None:
    """A tensor file of the wrong size that the reader refuses for another reason than its
    length (a wrong shape or dtype, a big-endian array, an unsafe pickle) is reported with that
    reason: the same words `inspect` and `generate` use for it."""
    for i, f in enumerate(report.corrupt):
        spec = specs.get(f.path)
        if f.kind != "size" or spec is None or not (base / f.path).is_file():
            continue
        try:
            check_entry(spec, parse_tensor_file(base / f.path), f.path)
        except IntegrityError as exc:
            why = str(exc).removeprefix(f"{base / f.path}: ").removeprefix(f"{f.path}: ")
            if "truncated" not in why:
                report.corrupt[i] = Finding(f.path, "structure", why)


def _unexpected(base: Path, expected: dict[str, Any], report: VerifyReport) -> None:
    for f in sorted(base.glob("*.safetensors")):
        if f.name not in expected:
            report.unexpected.append(Finding(f.name, "unexpected", f"{f.stat().st_size} bytes"))
    ckpt = base / CKPT_SUBDIR
    if ckpt.is_dir():
        for f in sorted(ckpt.rglob("*")):
            rel = f.relative_to(base).as_posix()
            if f.is_file() and rel not in expected:
                report.unexpected.append(Finding(rel, "unexpected", f"{f.stat().st_size} bytes"))
    if (base / PARTIAL_DIR).exists():
        report.warnings.append(
            f"{PARTIAL_DIR}/ holds an unfinished download (run `grokctl download` again)"
        )


def _structure(
    base: Path,
    tensors: list[str],
    specs: dict[str, Any],
    model: str,
    report: VerifyReport,
    workers: int,
) -> dict[str, Any]:
    def one(path: str) -> tuple[str, Any, str | None]:
        spec = specs.get(path)
        if spec is None:
            return path, None, f"not a tensor of the {model} model ({len(specs)} tensors)"
        try:
            ref = parse_tensor_file(base / path)
            check_entry(spec, ref, path)
            return path, ref, None
        except IntegrityError as exc:
            return path, None, str(exc).removeprefix(f"{base / path}: ").removeprefix(f"{path}: ")

    refs = {}
    with cf.ThreadPoolExecutor(max_workers=max(4, workers)) as pool:
        for path, ref, error in pool.map(one, tensors):
            if error:
                report.corrupt.append(Finding(path, "structure", error))
            else:
                refs[path] = ref
    bad = len(tensors) - len(refs)
    if not tensors:
        report.checks["structure"] = "skipped (no tensor file has its expected size)"
        return refs
    report.checks["structure"] = (
        f"ok ({len(refs)} tensors match {model})"
        if not bad
        else f"FAILED ({bad} of {len(tensors)})"
    )
    return refs


def _native_structure(
    base: Path, intact: list[str], model: str, cfg: Any, report: VerifyReport, workers: int
) -> list[tuple[str, Any]]:
    """Validate every safetensors header, then each parameter's shape and dtype against the
    config; (file, ref) of every tensor that passed, for --deep."""
    shards = [p for p in intact if p.endswith(".safetensors")]
    if not shards:
        report.checks["structure"] = "skipped (no safetensors shard has its expected size)"
        return []

    def one(path: str) -> tuple[str, dict[str, ArrayRef], str | None]:
        try:
            return path, native.parse_header(base / path)[0], None
        except IntegrityError as exc:
            return path, {}, str(exc).removeprefix(f"{base / path}: ")

    keys: dict[str, ArrayRef] = {}
    bad = 0
    with cf.ThreadPoolExecutor(max_workers=max(4, workers)) as pool:
        for path, refs, error in pool.map(one, shards):
            if error:
                bad += 1
                report.corrupt.append(Finding(path, "structure", error))
            keys.update(refs)
    out: list[tuple[str, Any]] = []
    wrong = 0
    for spec in param_specs(cfg):
        try:
            ref = native.check_entry(spec, keys)
        except IntegrityError as exc:
            if bad:  # a tensor of an unreadable shard: already reported for that file
                continue
            wrong += 1
            msg = str(exc)
            where = msg.split(": ", 1)[0] if msg.startswith(str(base)) else native.INDEX_NAME
            rel = Path(where).name
            report.corrupt.append(Finding(rel, "structure", msg.split(": ", 1)[-1]))
            continue
        main = ref.weight if isinstance(ref, QuantRef) else ref
        out.append((Path(main.path).name, ref))
    report.checks["structure"] = (
        f"ok ({len(out)} tensors in {len(shards)} shards match {model})"
        if not bad and not wrong
        else f"FAILED ({bad} unreadable shard(s), {wrong} tensor(s) wrong)"
    )
    return out


def _nonfinite(
    refs: list[tuple[str, Any]], report: VerifyReport, workers: int, on_phase: PhaseCallback
) -> None:
    arrays = []
    for path, ref in refs:
        for a in (ref.weight, ref.scales) if isinstance(ref, QuantRef) else (ref,):
            if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
                arrays.append((path, a))
    tick = on_phase("scanning for NaN/Inf", sum(a.nbytes for _, a in arrays))

    def one(item: tuple[str, ArrayRef]) -> tuple[str, int]:
        path, a = item
        flat = a.memmap().reshape(-1)
        bad, step = 0, max(1, (64 << 20) // a.dtype.itemsize)
        for i in range(0, flat.size, step):
            chunk = np.asarray(flat[i : i + step], dtype=np.float32)
            bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
            tick(min(step, flat.size - i) * a.dtype.itemsize)
        return path, bad

    found = 0
    per_file: dict[str, int] = {}
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        for path, bad in pool.map(one, arrays):
            if bad:
                per_file[path] = per_file.get(path, 0) + bad
    for path, bad in per_file.items():
        found += 1
        report.corrupt.append(Finding(path, "nonfinite", f"{bad} NaN/Inf values"))
    report.checks["nan_inf"] = (
        f"ok ({len(arrays)} float arrays)" if not found else f"FAILED ({found})"
    )


def _hash(
    base: Path,
    paths: list[str],
    expected: dict[str, tuple[int, str | None]],
    report: VerifyReport,
    workers: int,
    on_phase: PhaseCallback,
) -> None:
    paths = sorted(paths, key=lambda p: -expected[p][0])  # big files first: even finish
    total = sum(expected[p][0] for p in paths)
    tick = on_phase("hashing (sha256)", total)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda p: sha256_file(base / p, tick), paths))
    report.hash_seconds = time.perf_counter() - t0
    report.bytes_hashed = total
    bad = 0
    for p, digest in zip(paths, digests, strict=True):
        want = expected[p][1]
        if digest != want:
            bad += 1
            report.corrupt.append(Finding(p, "sha256", f"sha256 {digest} does not match {want}"))
    rate = f"{human_bytes(total)} in {report.hash_seconds:.2f} s, {report.hash_gb_per_s:.2f} GB/s"
    report.checks["sha256"] = (
        f"ok ({len(paths)} files, {rate})" if not bad else f"FAILED ({bad}; {rate})"
    )


def _pieces(
    base: Path,
    torrent_file: Path | None,
    manifest: Manifest | None,
    report: VerifyReport,
    workers: int,
    on_phase: PhaseCallback,
) -> None:
    from grokctl.fetch.pieces import check_pieces
    from grokctl.fetch.torrent import TORRENT_NAME

    path = torrent_file or base / TORRENT_NAME
    if not path.is_file():
        raise UsageError(
            f"--torrent: no {TORRENT_NAME} in {base} (it is saved by `grokctl download --magnet`); "
            "pass --torrent-file PATH"
        )
    import libtorrent as lt

    total = lt.torrent_info(path.read_bytes()).total_size()
    res = check_pieces(base, path, workers, on_phase("checking torrent pieces (sha1)", total))
    report.pieces_checked, report.pieces_failed = res.checked, res.failed
    for rel, n in sorted(res.bad_files.items()):
        report.corrupt.append(Finding(rel, "pieces", f"{n} piece(s) fail the torrent's hashes"))
    skipped = f", {res.skipped} skipped (files absent)" if res.skipped else ""
    report.checks["torrent"] = (
        f"ok ({res.checked} pieces{skipped})"
        if not res.failed
        else f"FAILED ({res.failed} of {res.checked} pieces{skipped})"
    )
