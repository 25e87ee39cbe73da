"""Write README.md from nbs/index.ipynb without Quarto (what `nbdev_readme` does with it).

Markdown cells are copied; a code cell marked `#| output: asis` contributes the markdown it displayed (a
table built from the records); other code cells that are shown in the docs become fenced Python blocks with
their text output. `python tools/make_readme.py --check` exits 1 if README.md is stale.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = '<!-- Generated from nbs/index.ipynb by tools/make_readme.py (make readme): edit the notebook, not this file. -->\n\n'


def render(nb_path: Path = ROOT / 'nbs' / 'index.ipynb') -> str:
    "The README text for the index notebook."
    nb = json.loads(nb_path.read_text())
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source']).strip()
        if cell['cell_type'] == 'markdown' and src:
            parts.append(src)
        elif cell['cell_type'] == 'code' and src:
            lines = src.splitlines()
            flags = [l for l in lines if l.startswith('#|')]
            if any(re.match(r'#\|\s*output:\s*asis', f) for f in flags):  # markdown it printed, as is (a table)
                parts += [''.join(o.get('data', {}).get('text/markdown', '')).strip() for o in cell.get('outputs', [])]
                continue
            if any(re.match(r'#\|\s*(hide|echo:\s*false|include:\s*false)', f) for f in flags): continue
            parts.append('```python\n' + '\n'.join(l for l in lines if not l.startswith('#|')) + '\n```')
            text = ''.join(''.join(o.get('text', '') or o.get('data', {}).get('text/plain', '')) for o in cell.get('outputs', []))
            if text.strip(): parts.append('```\n' + text.strip() + '\n```')
    return HEADER + '\n\n'.join(parts) + '\n'


if __name__ == '__main__':
    text, readme = render(), ROOT / 'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            print('README.md is stale: run `make readme` (it is generated from nbs/index.ipynb)'); sys.exit(1)
    else:
        readme.write_text(text); print('wrote README.md')
