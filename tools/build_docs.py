"""Build the docs site in `docs/` from the notebooks, without Quarto.

1. nbdev's own processing (the step `nbdev_docs` runs before Quarto) writes `_proc/`: show_doc outputs,
   front matter, links to the API.
2. `convert_notebook` turns each processed notebook into one that Sphinx + myst-nb render: the page is
   named after nbdev's `output-file` (so URLs match Quarto's, `core.html#check_shape`), show_doc outputs
   become markdown with an anchor per name, cell directives become myst-nb tags, callouts admonitions.
3. Sphinx (book theme, offline MathJax) renders `build/docs_src` into `docs/`.

With Quarto installed, `nbdev_docs` renders the same notebooks into the same folder instead.
Run: `python tools/build_docs.py` (or `make docs`).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / 'build' / 'docs_src'
OUT = ROOT / 'docs'
CALLOUTS = {'note': 'note', 'tip': 'tip', 'warning': 'warning', 'important': 'important', 'caution': 'caution'}


def settings() -> dict:
    cfg = ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini', encoding='utf-8')
    return dict(cfg['DEFAULT'])


def nbdev_process():
    "nbdev's processing step alone: module index, sidebar, `_proc/` (no Quarto, no installs)."
    from nbdev.doclinks import _build_modidx
    from nbdev.quarto import nbdev_sidebar, refresh_quarto_yml
    from nbdev.serve import proc_nbs
    _build_modidx()
    refresh_quarto_yml()
    nbdev_sidebar(force=True)
    return Path(proc_nbs(force=True))


def front_matter(cell: dict) -> dict:
    "The YAML front matter of nbdev's first raw cell, as a dict of its top-level `key: value` pairs."
    text = ''.join(cell['source']).strip().strip('-')
    out, key = {}, None
    for line in text.splitlines():
        m = re.match(r'^([\w-]+):\s*(.*)$', line)
        if m: key, out[m[1]] = m[1], m[2].strip()
        elif key and line.startswith('  '): out[key] += ' ' + line.strip()
    unquote = lambda v: v[1:-1].replace("''", "'") if len(v) > 1 and v[0] == v[-1] == "'" else v.strip('"')
    return {k: unquote(v) for k, v in out.items()}  # YAML single quotes escape ' as ''


def directives(src: str) -> tuple[dict, str]:
    "Split `#| key: value` lines from a code cell's source."
    found, body = {}, []
    for line in src.splitlines():
        m = re.match(r'^#\|\s*([\w-]+)\s*:?\s*(.*)$', line)
        if m: found[m[1]] = m[2].strip() or 'true'
        else: body.append(line)
    return found, '\n'.join(body).strip('\n')


def local_links(text: str, site: str) -> str:
    "Absolute links into our own site become relative, so they work wherever the site is served."
    return text.replace(site, '')


def show_doc_markdown(md: str, site: str) -> str:
    "nbdev's show_doc markdown (Quarto flavour) as MyST: raw-HTML source link, an anchor per name."
    md = re.sub(r'^---\s*$', '', md, flags=re.M)
    md = re.sub(r'\[source\]\(([^)]+)\)\{[^}]*\}',
                r'<a class="sourcelink" href="\1" target="_blank" style="float:right; font-size:smaller">source</a>', md)
    def heading(m):
        name = m[2].strip()
        return f'<a id="{name.lower()}"></a>\n\n{m[1]} {name}'  # Quarto's anchors are lower case
    md = re.sub(r'^(#{2,4}) (\S+)\s*$', heading, md, count=1, flags=re.M)
    return local_links(md.strip(), site)


def display_math(md: str) -> str:
    "A `$$...$$` line inside a paragraph becomes its own block (Quarto accepts it inline; MyST needs blank lines)."
    return re.sub(r'(?m)^[ \t]*(\$\$.+?\$\$)[ \t]*$', r'\n\1\n', md)


def fix_anchors(pages: dict[str, dict]):
    "Links to an anchor no page has (an undocumented method, `bert.html#bert.classify`) go to its class, else the page."
    ids = {p: set(re.findall(r'<a id="([^"]+)"></a>', ''.join(c['source'] for c in nb['cells'] if c['cell_type'] == 'markdown')))
           for p, nb in pages.items()}
    def fix(m):
        page, frag = m[1], m[2]
        if page not in ids or frag in ids[page]: return m[0]
        parent = frag.split('.')[0]
        return f'({page}.html#{parent})' if parent in ids[page] else f'({page}.html)'
    for nb in pages.values():
        for c in nb['cells']:
            if c['cell_type'] == 'markdown': c['source'] = re.sub(r'\(([\w.]+?)\.html#([\w.]+)\)', fix, c['source'])


def callouts(md: str) -> str:
    "Quarto callout fences (`::: {.callout-note}`) as MyST admonitions (`:::{note}`)."
    md = re.sub(r'^:::+\s*\{\.callout-(\w+)[^}]*\}\s*$', lambda m: ':::{' + CALLOUTS.get(m[1], 'note') + '}', md, flags=re.M)
    return md


def convert_notebook(path: Path, site: str) -> tuple[str, dict]:
    "One processed notebook as (page name, myst-nb notebook)."
    nb = json.loads(path.read_text())
    cells, meta = nb['cells'], {}
    if cells and cells[0]['cell_type'] == 'raw':
        meta = front_matter(cells[0]); cells = cells[1:]
    page = Path(meta.get('output-file', path.stem + '.html')).stem
    out = []
    if meta.get('title'):
        head = f"# {meta['title']}"
        if meta.get('description'): head += f"\n\n> {meta['description']}"
        out.append({'cell_type': 'markdown', 'metadata': {}, 'source': head})
    for c in cells:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown':
            if src.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
            out.append({'cell_type': 'markdown', 'metadata': {}, 'source': display_math(callouts(local_links(src, site)))})
        elif c['cell_type'] == 'code':
            found, body = directives(src)
            if found.get('output') == 'asis':  # show_doc and other markdown-producing cells
                md = ''.join(''.join(o.get('data', {}).get('text/markdown', '')) for o in c.get('outputs', []))
                if md.strip(): out.append({'cell_type': 'markdown', 'metadata': {}, 'source': show_doc_markdown(md, site)})
                continue
            if 'hide' in found or found.get('include') == 'false': continue
            tags = []
            if found.get('echo') == 'false': tags.append('remove-input')
            if found.get('output') == 'false': tags.append('remove-output')
            if found.get('code-fold') in ('true', 'show'): tags.append('hide-input')
            if not body and 'remove-input' not in tags: continue
            out.append({'cell_type': 'code', 'metadata': {'tags': tags} if tags else {}, 'source': body,
                        'outputs': c.get('outputs', []), 'execution_count': None})
    for i, c in enumerate(out): c['id'] = f'cell-{i}'
    nb['cells'] = out
    nb['metadata'] = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
                      'language_info': {'name': 'python'}}
    return page, nb


def sidebar_order(proc: Path) -> list[str]:
    "Notebook file names in sidebar order, from nbdev's `sidebar.yml`."
    names = re.findall(r'-\s*([\w./-]+\.ipynb)', (proc / 'sidebar.yml').read_text())
    return [Path(n).name for n in names]


CONF = '''
project = {title!r}
author = {author!r}
copyright = {copyright!r}
extensions = ['myst_nb']
mathjax_path = 'mathjax/tex-chtml.js'  # served from the site itself: formulas render offline
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'html_image']
myst_all_links_external = True
nb_execution_mode = 'off'
nb_merge_streams = True
nb_render_markdown_format = 'myst'  # markdown outputs (result tables) render as tables
html_theme = 'sphinx_book_theme'
html_title = {title!r}
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {{'repository_url': {git_url!r}, 'use_repository_button': True, 'use_download_button': False, 'show_toc_level': 2,
                       'home_page_in_toc': True, 'navigation_with_keys': False}}
exclude_patterns = ['_build']
suppress_warnings = ['mystnb.unknown_mime_type']
'''


def copy_mathjax(out: Path):
    "The parts of MathJax 3 that `tex-chtml.js` loads, from the pinned `sphinx-mathjax-offline` package."
    import importlib.util
    src = Path(importlib.util.find_spec('sphinx-mathjax-offline').origin).parent / 'static' / 'mathjax'
    dst = out / '_static' / 'mathjax'
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / 'tex-chtml.js', dst / 'tex-chtml.js')
    for part in ('output/chtml', 'input/tex/extensions', 'ui', 'a11y'):
        shutil.copytree(src / part, dst / part, dirs_exist_ok=True)
    (dst / 'a11y' / 'sre.js').unlink(missing_ok=True)  # speech rule engine: 4 MB, only for screen-reader speech


def build(run_nbdev: bool = True) -> Path:
    cfg = settings()
    site = cfg['doc_host'].rstrip('/') + '/' + cfg['doc_baseurl'].strip('/') + '/'
    proc = nbdev_process() if run_nbdev else ROOT / '_proc'
    if SRC.exists(): shutil.rmtree(SRC)
    SRC.mkdir(parents=True)
    converted = dict(convert_notebook(proc / name, site) for name in sidebar_order(proc))
    fix_anchors(converted)
    for page, nb in converted.items(): (SRC / f'{page}.ipynb').write_text(json.dumps(nb, indent=1))
    pages = [p for p in converted if p != 'index']
    index = SRC / 'index.ipynb'
    nb = json.loads(index.read_text())
    nb['cells'].append({'cell_type': 'markdown', 'metadata': {}, 'id': 'toctree',
                        'source': '```{toctree}\n:hidden:\n:maxdepth: 1\n\n' + '\n'.join(pages) + '\n```'})
    index.write_text(json.dumps(nb, indent=1))
    (SRC / 'conf.py').write_text(CONF.format(**cfg))
    if OUT.exists(): shutil.rmtree(OUT)
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-W', '--keep-going', '-q', '-d', str(ROOT / 'build' / 'doctrees'), str(SRC), str(OUT)]
    subprocess.run(cmd, check=True)
    copy_mathjax(OUT)
    shutil.rmtree(OUT / '_sources', ignore_errors=True)
    shutil.rmtree(ROOT / 'jupyter_execute', ignore_errors=True)  # myst-nb's scratch copies
    (OUT / '.nojekyll').write_text('')
    for junk in ('.buildinfo', '.buildinfo.bak'): (OUT / junk).unlink(missing_ok=True)
    return OUT


if __name__ == '__main__':
    print(f'docs site written to {build().relative_to(ROOT)}/')
