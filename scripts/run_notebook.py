"""Execute a notebook in a real Jupyter kernel and print what each cell shows.

Usage: python scripts/run_notebook.py notebooks/quickstart.ipynb [--save OUT.ipynb]
"""

from __future__ import annotations

import argparse
import sys

import nbformat
from nbclient import NotebookClient


def _text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return "\n".join(output.get("traceback", []))
    data = output.get("data", {})
    return data.get("text/plain", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("--save", help="write the executed notebook here")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(
        nb,
        timeout=args.timeout,
        kernel_name="python3",
        resources={"metadata": {"path": "notebooks"}},
    )
    try:
        client.execute()
    finally:
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            print(f"\n>>> {cell.source.strip().splitlines()[0] if cell.source.strip() else ''}")
            for output in cell.get("outputs", []):
                print(_text(output).rstrip())
        if args.save:
            nbformat.write(nb, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
