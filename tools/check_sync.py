"""Check that the package is exactly what `nbdev_export` makes from the notebooks, that every notebook is
clean (`nbdev_clean` changes nothing), and that README.md is current.

It works on a copy, so it never touches your files, and prints what to run when something is out of date.
Exit status 0 when all is in sync, 1 otherwise.
"""
from __future__ import annotations

import filecmp
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


def main(root: Path = ROOT) -> int:
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ('settings.ini', 'setup.py'): shutil.copy2(root / name, tmp / name)
        shutil.copytree(root / 'nbs', tmp / 'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_proc'))
        shutil.copytree(root / 'transformers_howfar', tmp / 'transformers_howfar', ignore=shutil.ignore_patterns('__pycache__'))
        for f in (tmp / 'transformers_howfar').glob('*.py'):
            if f.name != '__init__.py': f.unlink()  # exported modules must all come from notebooks
        for cmd in ('nbdev_export', 'nbdev_clean'):
            subprocess.run([str(BIN / cmd)], cwd=tmp, check=True, capture_output=True)
        pkg = compare(tree(root / 'transformers_howfar', '*.py'), tree(tmp / 'transformers_howfar', '*.py'))
        if pkg: problems.append(f'package differs from the notebooks in {pkg}: run `nbdev_export`')
        nbs = compare(tree(root / 'nbs', '*.ipynb'), tree(tmp / 'nbs', '*.ipynb'))
        if nbs: problems.append(f'notebooks not clean: {nbs}: run `nbdev_clean`')
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
