"""Finding a dataset on disk, and downloading it with a checksum where a network exists."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from dorat.data.registry import SPECS, Spec, is_complete
from dorat.errors import DataError
from dorat.files.checkpoint import file_digest

DEBIAN_ROOT = Path("/usr/share/datasets")


def candidate_dirs(name: str, data_dir: str | None = None) -> list[Path]:
    """Lookup order: $DORAT_DATA, ~/.cache/dorat, Debian's /usr/share/datasets; only --data-dir
    (DIR/NAME, then DIR) when it is given: a directory the user names is never silently
    replaced by another one."""
    if data_dir:
        return [Path(data_dir) / name, Path(data_dir)]
    out: list[Path] = []
    if os.environ.get("DORAT_DATA"):
        out.append(Path(os.environ["DORAT_DATA"]) / name)
    out.append(Path.home() / ".cache" / "dorat" / name)
    out.append(DEBIAN_ROOT / name)
    return out


def get_spec(name: str) -> Spec:
    if name not in SPECS:
        raise DataError(
            f"unknown dataset '{name}'; choose one of {', '.join(SPECS)}, or npz:PATH or "
            "imagefolder:DIR for your own data"
        )
    return SPECS[name]


def locate(name: str, data_dir: str | None = None) -> Path | None:
    spec = get_spec(name)
    for root in candidate_dirs(name, data_dir):
        if root.is_dir() and is_complete(spec, root):
            return root
    return None


def _safe_extract(archive: Path, dest: Path) -> None:
    dest_resolved = dest.resolve()

    def inside(member: str) -> bool:
        target = (dest / member).resolve()
        return target == dest_resolved or dest_resolved in target.parents

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            bad = [m for m in z.namelist() if not inside(m)]
            if bad:
                raise DataError(f"{archive} has entries outside the target folder: {bad[:3]}")
            z.extractall(dest)
        return
    with tarfile.open(archive) as t:
        members = t.getmembers()
        bad = [m.name for m in members if not inside(m.name) or m.issym() or m.islnk() or m.isdev()]
        if bad:
            raise DataError(f"{archive} has unsafe entries (links or paths outside): {bad[:3]}")
        t.extractall(dest, members=members)


def _offline_message(spec: Spec, target: Path, why: str) -> str:
    files = ", ".join(f"{d.url} (MD5 {d.md5})" for d in spec.downloads)
    apt = (
        f"install Debian's package (`apt-get install {spec.debian_package}`), or "
        if spec.debian_package else ""
    )
    return (
        f"dataset '{spec.name}' is not on this machine and could not be downloaded ({why}). "
        f"To fix: {apt}download {files} and put the file(s) as downloaded in {target} (archives "
        "are checked and unpacked on first use; or pass --data-dir / set DORAT_DATA)"
    )


def unpack_archives(spec: Spec, root: Path) -> bool:
    """The dataset's archive(s) put in ``root`` by hand (e.g. cifar-10-python.tar.gz, downloaded
    elsewhere): check each MD5, unpack them safely (no links, nothing outside ``root``) into a
    temporary folder and move the result in. True when ``root`` is then complete."""
    archives = [(d, root / d.url.rsplit("/", 1)[-1]) for d in spec.downloads if d.extract]
    if not archives or not all(p.is_file() for _, p in archives):
        return False
    for d, p in archives:
        got = file_digest(p)
        if got != d.md5:
            raise DataError(f"{p} has MD5 {got}, expected {d.md5} (an incomplete download or "
                            f"another file): download it again from {d.url}")
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as tmp:
            for _, p in archives:
                _safe_extract(p, Path(tmp))
            for item in sorted(Path(tmp).iterdir()):
                if (root / item.name).exists():
                    raise DataError(f"{root / item.name} exists but is incomplete; remove it, and "
                                    f"{archives[0][1].name} is unpacked in its place")
                os.replace(item, root / item.name)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot unpack {archives[0][1]} into {root} ({e}); check the file and that "
                        "the folder is writable") from None
    return is_complete(spec, root)


def download(name: str, data_dir: str | None = None, timeout: float = 30.0) -> Path:
    """Download (and unpack) a dataset, checking each file's MD5. Returns its directory."""
    spec = get_spec(name)
    target = Path(data_dir) / name if data_dir else (
        Path(os.environ["DORAT_DATA"]) / name if os.environ.get("DORAT_DATA")
        else Path.home() / ".cache" / "dorat" / name
    )
    if spec.obtain:
        raise DataError(f"dataset '{name}' is not on this machine and has no download: "
                        + spec.obtain.format(target=target) + " (or pass --data-dir / set DORAT_DATA)")
    if not spec.downloads:
        raise DataError(f"dataset '{name}' has no download source; put its files in {target}")
    created = next((p for p in (*reversed(target.parents), target) if not p.exists()), None)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {target} ({e.strerror}); pass a writable --data-dir") from None
    try:
        _fetch_into(spec, target, timeout)
    except DataError:  # a failed download leaves no directory it made behind
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    if not is_complete(spec, target):
        raise DataError(f"download of '{name}' finished but {target} is still incomplete")
    return target


def _fetch_into(spec: Spec, target: Path, timeout: float) -> None:
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        for d in spec.downloads:
            fname = d.url.rsplit("/", 1)[-1]
            part = Path(tmp) / fname
            try:
                with urllib.request.urlopen(d.url, timeout=timeout) as r, open(part, "wb") as f:
                    shutil.copyfileobj(r, f)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise DataError(_offline_message(spec, target, str(getattr(e, "reason", e)))) from None
            got = file_digest(part)
            if got != d.md5:
                raise DataError(
                    f"{d.url} downloaded with MD5 {got}, expected {d.md5} (corrupted or changed "
                    "upstream); try again, or put verified files in " + str(target)
                )
            if d.extract:
                _safe_extract(part, target)
            else:
                os.replace(part, target / fname)


def find_or_fetch(name: str, data_dir: str | None = None, allow_download: bool = True) -> Path:
    root = locate(name, data_dir)
    if root is not None:
        return root
    spec = get_spec(name)
    for cand in candidate_dirs(name, data_dir):
        if cand.is_dir() and unpack_archives(spec, cand):
            return cand
    target = candidate_dirs(name, data_dir)[0]
    try:
        if not allow_download and not spec.obtain:
            raise DataError(_offline_message(spec, target, "downloads are disabled"))
        return download(name, data_dir)
    except DataError:
        elsewhere = locate(name) if data_dir else None  # --data-dir looks only there
        if elsewhere is None:
            raise
        raise DataError(f"dataset '{name}' is not in --data-dir {data_dir}"
                        f"{'' if Path(data_dir).is_dir() else ' (no such directory)'}, but this "
                        f"machine has it in {elsewhere}: leave --data-dir out, or point it "
                        "there") from None
