"""`make test` says what the system lacks before it runs, rather than in skip reasons only a reader of
the output finds."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_names_each_missing_system_tool_and_how_to_get_it(tmp_path):
    bare = tmp_path / "bin"      # a PATH with make and a shell, but no Redis and no openssl
    bare.mkdir()
    for tool in ("make", "sh"):
        (bare / tool).symlink_to(shutil.which(tool))
    run = subprocess.run([str(bare / "make"), "-s", "system-check"], cwd=REPO, env={"PATH": str(bare)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for tool in ("redis-server", "redis-cli", "openssl"):
        assert f"make test: '{tool}' not found: the Redis tier's tests will be skipped. Install it from your " \
               "system's packages (Debian/Ubuntu: apt-get install redis-server openssl)." in run.stdout


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("redis-server") is None
                    or shutil.which("redis-cli") is None or shutil.which("openssl") is None,
                    reason="make, redis-server, redis-cli or openssl is not installed")
def test_make_test_says_nothing_when_the_system_has_everything():
    run = subprocess.run(["make", "-s", "system-check"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == ""
