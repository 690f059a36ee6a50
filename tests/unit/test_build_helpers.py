"""The pure helpers of build.py: the build id digest."""
import importlib.util
import os
import shutil

import pytest

from unitutil import REPO


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("dkvm_build_under_test", REPO / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- tree digest -------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "a" / "payload"
    (root / "bin").mkdir(parents=True)
    (root / "lib" / "empty").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"tool v1")
    (root / "bin" / "tool").chmod(0o755)
    (root / "lib" / "libx.so").write_bytes(b"\0" * 100)
    (root / "lib" / "libx.so").chmod(0o644)
    return root


def test_tree_digest_stable(build, tree, tmp_path):
    first = build.tree_digest(tree)
    assert len(first) == 16 and int(first, 16) >= 0
    assert build.tree_digest(tree) == first
    # the same tree elsewhere has the same id
    copy = tmp_path / "b" / "payload"
    shutil.copytree(tree, copy)
    assert build.tree_digest(copy) == first


def test_tree_digest_content(build, tree):
    first = build.tree_digest(tree)
    (tree / "bin" / "tool").write_bytes(b"tool v2")
    changed = build.tree_digest(tree)
    assert changed != first
    (tree / "bin" / "tool").write_bytes(b"tool v1")
    assert build.tree_digest(tree) == first


def test_tree_digest_mode(build, tree):
    first = build.tree_digest(tree)
    os.chmod(tree / "bin" / "tool", 0o644)
    assert build.tree_digest(tree) != first
    os.chmod(tree / "bin" / "tool", 0o755)
    assert build.tree_digest(tree) == first


def test_tree_digest_names_and_dirs(build, tree):
    first = build.tree_digest(tree)
    (tree / "lib" / "empty" / "sub").mkdir()
    assert build.tree_digest(tree) != first
    (tree / "lib" / "empty" / "sub").rmdir()
    (tree / "lib" / "libx.so").rename(tree / "lib" / "liby.so")
    assert build.tree_digest(tree) != first


def test_tree_digest_several_roots(build, tree, tmp_path):
    other = tmp_path / "a" / "site-packages"
    other.mkdir()
    (other / "m.py").write_text("x = 1\n")
    both = build.tree_digest(tree, other)
    assert both != build.tree_digest(tree)
    (other / "m.py").write_text("x = 2\n")
    assert build.tree_digest(tree, other) != both
