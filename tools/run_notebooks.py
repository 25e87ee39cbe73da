"""Execute notebooks in place, the way their saved outputs become the docs: every cell runs in order, except
cells flagged with a `tst_flags` word (`slow`, `data`, `gpu`) or `#| eval: false`, whose saved outputs are kept.

    python tools/run_notebooks.py nbs/24_layers.lsh.ipynb [...]         # run these
    python tools/run_notebooks.py --flags slow nbs/50_bench.measure.ipynb  # also run the `slow` cells
"""
import argparse
import os
import sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.config import get_config


def run(path: Path, run_flags: set[str]) -> bool:
    "Run the notebook at `path` in its folder; False (and the error printed) if a cell fails."
    skip = set(get_config().tst_flags.split()) - run_flags
    nb = read_nb(path)
    def preproc(cell):
        if cell.cell_type != 'code' or 'nbdev_export' + '(' in cell.source: return True
        directives = {line[3:].split()[0].rstrip(':'): line for line in cell.source.splitlines()
                      if line.startswith('#| ') and len(line) > 3}
        if directives.get('eval', '').replace(' ', '').endswith('eval:false'): return True
        if skip & directives.keys(): return True
        cell.outputs = []  # a cell that prints nothing now leaves no stale output
        return False
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        shell = CaptureShell(path)
        shell.run_all(nb, exc_stop=True, preproc=preproc)
    except Exception as e:
        print(f'{path}: {type(e).__name__}: {e}', file=sys.stderr); return False
    finally: os.chdir(cwd)
    write_nb(nb, path)
    return True


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('notebooks', nargs='+', type=Path)
    parser.add_argument('--flags', nargs='*', default=[], help='tst_flags whose cells run too')
    args = parser.parse_args()
    failed = [p for p in args.notebooks if not run(p.resolve(), set(args.flags))]
    sys.exit(1 if failed else 0)
