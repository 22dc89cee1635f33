"""Where a benchmark's result is written: at the top of the latest runs of docs/benchmarks.md, with the earlier result
of the same benchmark moved, verbatim, to the archive beside it."""

from __future__ import annotations

from pathlib import Path

from support import bench_module

ROOT = Path(__file__).resolve().parents[2]


common = bench_module("_common.py")

HARNESS_OLD = "### Checks: vs. baselines (2026-11-27 14:15 UTC)\n\nMachine: old. Command: `harness.py`\n\n| a |\n|---|"
SCALE = "### Cost per check vs. active tasks (2026-11-27 12:57 UTC)\n\nMachine: m. Command: `scale.py`"
HARNESS_NEW = ["### Checks: vs. baselines (2026-12-01 10:00 UTC)", "", "Machine: new. Command: `harness.py`"]


def benchmarks_file(tmp_path: Path) -> Path:
    path = tmp_path / "benchmarks.md"
    path.write_text(
        f"# Benchmarks\n\n## Targets\n\n| target | met? |\n\n## Latest runs\n\n{common.LATEST_MARKER} -->\n\n"
        f"{HARNESS_OLD}\n\n{SCALE}\n\n## Analysis\n\nWhy.\n"
    )
    return path


def test_a_new_result_goes_on_top_of_the_latest_runs_and_supersedes_the_last(tmp_path: Path) -> None:
    path = benchmarks_file(tmp_path)
    (tmp_path / "benchmarks-archive.md").write_text(
        f"# Archive\n\n{common.ARCHIVE_MARKER} -->\n\n### Checks: vs. baselines (2026-11-27 10:08 UTC)\n\nOldest.\n"
    )
    common.publish(HARNESS_NEW, path)
    assert path.read_text() == (
        f"# Benchmarks\n\n## Targets\n\n| target | met? |\n\n## Latest runs\n\n{common.LATEST_MARKER} -->\n\n"
        f"{chr(10).join(HARNESS_NEW)}\n\n{SCALE}\n\n## Analysis\n\nWhy.\n"
    )
    assert (tmp_path / "benchmarks-archive.md").read_text() == (
        f"# Archive\n\n{common.ARCHIVE_MARKER} -->\n\n{HARNESS_OLD}\n\n"
        "### Checks: vs. baselines (2026-11-27 10:08 UTC)\n\nOldest.\n"
    )


def test_a_result_of_a_new_benchmark_supersedes_nothing(tmp_path: Path) -> None:
    path = benchmarks_file(tmp_path)
    common.publish(["### Something new (2026-12-01 10:00 UTC)", "", "Machine: m."], path)
    text = path.read_text()
    assert text.index("### Something new") < text.index(HARNESS_OLD) < text.index(SCALE) < text.index("## Analysis")
    assert not (tmp_path / "benchmarks-archive.md").exists()


def test_the_archive_is_made_when_missing(tmp_path: Path) -> None:
    path = benchmarks_file(tmp_path)
    common.publish(HARNESS_NEW, path)
    archive = (tmp_path / "benchmarks-archive.md").read_text()
    assert archive.startswith("# Benchmarks archive\n")
    assert archive.endswith(f"{common.ARCHIVE_MARKER} -->\n\n{HARNESS_OLD}\n")


def test_a_file_without_the_marker_gets_the_result_at_its_end(tmp_path: Path) -> None:
    path = tmp_path / "results.md"
    path.write_text("# Results\n")
    common.publish(HARNESS_NEW, path)
    assert path.read_text() == "# Results\n\n" + "\n".join(HARNESS_NEW) + "\n"


def test_the_real_files_carry_the_markers() -> None:
    assert common.LATEST_MARKER in (ROOT / "docs" / "benchmarks.md").read_text()
    assert common.ARCHIVE_MARKER in (ROOT / "docs" / "benchmarks-archive.md").read_text()
