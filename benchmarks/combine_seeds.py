"""Combine one-seed results files of the same benchmark command into one table with mean ± half range.

Run: ``python benchmarks/combine_seeds.py --output heal-frontier-smollm2-hard-3seeds heal-frontier-smollm2-hard
heal-frontier-smollm2-hard-seed1 heal-frontier-smollm2-hard-seed2`` (names in ``benchmarks/results/``).

Long runs (a SmolLM2 heal takes over an hour here) are run one seed per process, so that seeds can run side by
side or in separate sessions. This puts their tables back together the way the benchmarks' own multi-seed tables
read. The files must come from the same command except ``--seeds``, ``--output`` and ``--keep``: the command lines
are compared with those removed, and so are the tables' headers and key columns. A cell equal in every file is
kept. A numeric cell becomes the mean ± half the range, at the input's decimal places. Any other cell lists each
file's value, separated by "/". Ratio columns such as "× dense" are averaged too: with the same dense value in
every file, that equals the ratio of the means up to rounding.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_markdown

PER_RUN_OPTIONS = ("--seeds", "--output", "--keep")  # may differ between the files; nothing else may
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def read_results(name: str) -> dict:
    """A results file's command, other header lines, table header and rows (cells stripped)."""
    path = RESULTS / f"{name}.md" if not name.endswith(".md") else Path(name)
    if not path.is_file():
        raise SystemExit(f"no results file {path}; give names of files in {RESULTS}")
    lines = path.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    if len(table) < 3:
        raise SystemExit(f"{path} holds no Markdown table")
    command = next((line for line in lines if line.startswith("Command: `")), None)
    if command is None:
        raise SystemExit(f"{path} states no command; only results files written by a benchmark can be combined")
    header = [line for line in lines if line and not line.startswith("|")]
    return {
        "path": path,
        "command": command.split("`")[1],
        "machine": command.split("Machine: ", 1)[1].rstrip(".") if "Machine: " in command else "not stated",
        "header": header,
        "columns": cells(table[0]),
        "rows": [cells(line) for line in table[2:]],
    }


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def shared_command(command: str) -> str:
    """The command without the options that may differ between seeds."""
    words, kept, skip = command.split(), [], False
    for word in words:
        if skip:
            skip = False
            continue
        if word in PER_RUN_OPTIONS:
            skip = True
            continue
        if word.split("=", 1)[0] in PER_RUN_OPTIONS:
            continue
        kept.append(word)
    return " ".join(kept)


def option(command: str, name: str) -> str | None:
    words = command.split()
    for index, word in enumerate(words):
        if word == name and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def combine_cell(values: list[str]) -> str:
    """One cell from each file's value: kept when equal, mean ± half range when numeric, else listed."""
    if len(set(values)) == 1:
        return values[0]
    plain = [value.strip("*") for value in values]
    if all(NUMBER.match(value) for value in plain):
        numbers = [float(value) for value in plain]
        places = max(len(value.split(".")[1]) if "." in value else 0 for value in plain)
        mean = sum(numbers) / len(numbers)
        return f"{mean:.{places}f} ± {(max(numbers) - min(numbers)) / 2:.{places}f}"
    return "; ".join(values) if any("→" in value for value in values) else "/".join(values)


def combine(results: list[dict], key_columns: int) -> list[list[str]]:
    first = results[0]
    for other in results[1:]:
        if shared_command(other["command"]) != shared_command(first["command"]):
            raise SystemExit(
                f"{other['path'].name} was run with another command than {first['path'].name}; only --seeds, --output and --keep may differ:\n"
                f"  {shared_command(first['command'])}\n  {shared_command(other['command'])}"
            )
        dense = [[line for line in result["header"] if line.startswith("Dense")] for result in (first, other)]
        if dense[0] != dense[1]:
            raise SystemExit(f"{other['path'].name} states another dense baseline than {first['path'].name}: {dense[1]} vs {dense[0]}")
        if other["columns"] != first["columns"] or len(other["rows"]) != len(first["rows"]):
            raise SystemExit(f"{other['path'].name} has another table than {first['path'].name} (columns or row count differ)")
        for mine, theirs in zip(first["rows"], other["rows"]):
            if mine[:key_columns] != theirs[:key_columns]:
                raise SystemExit(f"rows differ in their first {key_columns} columns: {mine[:key_columns]} vs {theirs[:key_columns]}")
    return [[combine_cell(list(values)) for values in zip(*rows)] for rows in zip(*(result["rows"] for result in results))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="results files (names in benchmarks/results/, without .md), one per seed")
    parser.add_argument("--output", required=True, help="name of the combined results file")
    parser.add_argument("--key-columns", type=int, default=1, help="leading columns that must be equal row by row (e.g. the ratio)")
    args = parser.parse_args()
    if len(args.names) < 2:
        raise SystemExit("give at least two results files to combine")
    results = [read_results(name) for name in args.names]
    rows = combine(results, args.key_columns)
    first = results[0]
    title = first["header"][0] if first["header"][0].startswith("#") else f"# {first['path'].stem}"
    described = [line for line in first["header"][1:] if not line.startswith("Command: ")]
    sources = [
        f"- `{result['path'].name}`: seeds {option(result['command'], '--seeds') or '0'}; machine: {result['machine']}." for result in results
    ]
    lines = [
        title + f" ({len(results)} files combined)",
        "",
        f"Combined by: `python benchmarks/combine_seeds.py {' '.join(args.names)} --output {args.output}"
        + (f" --key-columns {args.key_columns}" if args.key_columns != 1 else "")
        + "`. Each file came from the same command except --seeds, --output and --keep:",
        f"`{shared_command(first['command'])}`.",
        *sources,
        "A cell that differs between the files is the mean ± half the range of their values (numeric cells; ratios"
        " such as × dense are averaged too), or lists each file's value in the order above. The description below is"
        " the first file's, its seed left out.",
        "",
        *[re.sub(r" Seeds [\d,]+ \(calibration and healing windows\)\.", "", line) for line in described],
        "",
        "| " + " | ".join(first["columns"]) + " |",
        "|" + "---|" * len(first["columns"]),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    write_markdown(args.output, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
