"""Check that the package is exactly what `nbdev_export` makes from the notebooks, that every notebook is
clean (`nbdev_clean` changes nothing), that no saved output carries a path of the machine that ran it (a
warning's kernel file, a temporary folder: the outputs are the published docs), and that README.md is current.

It works on a copy, so it never touches your files, and prints what to run when something is out of date.
Exit status 0 when all is in sync, 1 otherwise.
"""
from __future__ import annotations

import filecmp
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tree(folder: Path, pattern: str) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in folder.rglob(pattern) if '.ipynb_checkpoints' not in p.parts and '__pycache__' not in p.parts}


def compare(ours: dict[str, Path], theirs: dict[str, Path]) -> list[str]:
    "Names that differ between two {relative name: path} maps (added, removed or changed)."
    return sorted(n for n in set(ours) | set(theirs) if n not in ours or n not in theirs or not filecmp.cmp(ours[n], theirs[n], shallow=False))


MACHINE_PATH = re.compile(r'(?<![\w.])/(?:tmp|root|home|work|var/folders)/\S*|ipykernel_\d+')


def machine_paths(notebook: Path) -> list[str]:
    "Paths of the executing machine found in a notebook's saved outputs."
    found = []
    for cell in json.loads(notebook.read_text()).get('cells', []):
        for out in cell.get('outputs', []):
            found += MACHINE_PATH.findall(json.dumps(out))
    return found


def main(root: Path = ROOT) -> int:
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ('settings.ini', 'setup.py'): shutil.copy2(root / name, tmp / name)
        shutil.copytree(root / 'nbs', tmp / 'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_proc'))
        shutil.copytree(root / 'transformers_howfar', tmp / 'transformers_howfar', ignore=shutil.ignore_patterns('__pycache__'))
        for f in (tmp / 'transformers_howfar').rglob('*.py'):
            if f.name != '__init__.py': f.unlink()  # exported modules must all come from notebooks
        for cmd in ('nbdev_export', 'nbdev_clean'):
            subprocess.run([str(BIN / cmd)], cwd=tmp, check=True, capture_output=True)
        pkg = compare(tree(root / 'transformers_howfar', '*.py'), tree(tmp / 'transformers_howfar', '*.py'))
        if pkg: problems.append(f'package differs from the notebooks in {pkg}: run `nbdev_export`')
        nbs = compare(tree(root / 'nbs', '*.ipynb'), tree(tmp / 'nbs', '*.ipynb'))
        if nbs: problems.append(f'notebooks not clean: {nbs}: run `nbdev_clean`')
    leaks = {p.name: found[0] for p in sorted((root / 'nbs').glob('*.ipynb')) if (found := machine_paths(p))}
    if leaks: problems.append(f'saved outputs carry machine paths {leaks}: fix the cause (e.g. a warning) and re-run those notebooks')
    sys.path.insert(0, str(root / 'tools'))
    from make_readme import render
    readme = root / 'README.md'
    if not readme.exists() or readme.read_text() != render(root / 'nbs' / 'index.ipynb'):
        problems.append('README.md is stale: run `make readme`')
    for p in problems: print('out of sync:', p)
    if not problems: print('in sync: package = nbdev_export(notebooks), notebooks clean, README current')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
