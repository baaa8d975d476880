"""Where the harness finds Horovod 0.28.1's own ``test/parallel/test_torch.py``.

hvdcomp does not carry Horovod's code (Apache-2.0, but not ours to ship), so the harness
reads the file from outside the repository. The Horovod sdist on PyPI would be the natural
source in CI (package registries are reachable there, nothing else is), but the 0.28.1
sdist holds no ``test/`` folder at all (its MANIFEST.in includes only ``horovod/``,
``cmake/``, ``third_party/`` and build files), so the file comes from a Horovod git
checkout at tag ``v0.28.1`` instead, copied once into the cache next to the built wheel:

    python tests/horovod_test_source.py --git-dir /path/to/horovod/.git

or from any path named by ``HVDCOMP_HOROVOD_TEST_TORCH`` (``.ci/run`` points it at the copy this
workplace keeps beside the repository, ``../shared/peers/horovod-v0.28.1/test_torch.py``).
``python tests/horovod_test_source.py --check`` prints the file the tests will read. Either way its SHA-256 must be
that of the file at the tag, so the tests that run are Horovod's, unmodified.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
from pathlib import Path

HOROVOD_VERSION = "0.28.1"
#: Commit of Horovod's tag v0.28.1 ("Bump version to v0.28.1 (#3942)").
HOROVOD_COMMIT = "1d217b59949986d025f6db93c49943fb6b6cc78f"
TEST_FILE = "test/parallel/test_torch.py"
#: SHA-256 of test/parallel/test_torch.py at HOROVOD_COMMIT (4416 lines).
TEST_FILE_SHA256 = "8af114f63fb7a87271322ad2da2c7050c3a9028570e45e8c44e9b1b4cac8db3a"
#: Environment variable naming a copy of the file to use instead of the cache.
PATH_VARIABLE = "HVDCOMP_HOROVOD_TEST_TORCH"


def cache_path() -> Path:
    """Where the verified copy is kept: ``$HVDCOMP_CACHE`` (default ``~/.cache/hvdcomp``),
    the folder in which ``launch/setup.sh`` keeps the built Horovod wheel."""
    cache = Path(os.environ.get("HVDCOMP_CACHE", Path.home() / ".cache" / "hvdcomp"))
    return cache / f"horovod-{HOROVOD_VERSION}-tests" / "test_torch.py"


def sha256(path: Path) -> str:
    """Hex SHA-256 of the file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(path: Path) -> Path:
    """``path`` if it holds Horovod 0.28.1's test file; ValueError naming both digests if not."""
    digest = sha256(path)
    if digest != TEST_FILE_SHA256:
        raise ValueError(f"{path} is not Horovod v{HOROVOD_VERSION}'s {TEST_FILE} "
                         f"(sha256 {digest}, expected {TEST_FILE_SHA256})")
    return path


def find_test_file() -> Path | None:
    """The verified test file: ``$HVDCOMP_HOROVOD_TEST_TORCH`` if set (it must exist and
    verify), else the cached copy if present, else None."""
    named = os.environ.get(PATH_VARIABLE)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ValueError(f"{PATH_VARIABLE}={named} is not a file")
        return verified(path)
    path = cache_path()
    return verified(path) if path.is_file() else None


def install_from_git(git_dir: Path) -> Path:
    """Copy the file at tag v0.28.1 out of the Horovod git directory ``git_dir`` (a clone's
    ``.git`` or a bare repository) into :func:`cache_path`; returns that path."""
    text = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{HOROVOD_COMMIT}:{TEST_FILE}"],
                          check=True, capture_output=True).stdout
    digest = hashlib.sha256(text).hexdigest()
    if digest != TEST_FILE_SHA256:
        raise ValueError(f"{git_dir} at {HOROVOD_COMMIT} has a {TEST_FILE} with sha256 {digest}, "
                         f"expected {TEST_FILE_SHA256}")
    target = cache_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(text)
    tmp.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--git-dir", type=Path, help="a Horovod git directory that has the v0.28.1 commit")
    action.add_argument("--check", action="store_true",
                        help="print the verified file the tests will read; exit 1 if there is none")
    args = parser.parse_args()
    if args.check:
        found = find_test_file()
        if found is None:
            raise SystemExit(f"no copy: set {PATH_VARIABLE} or run with --git-dir")
        print(found)
        return
    print(install_from_git(args.git_dir))


if __name__ == "__main__":
    main()
