"""The docs site in docs/, opened page by page in headless Chromium from a local server.

Checks what a reader would see: every notebook has a page in the sidebar, no broken internal link or image,
no raw nbdev directive, show_doc call or Quarto fence in the text, and formulas rendered by MathJax.
Screenshots of each page's first screen go to build/screenshots/ (whole pages with HOWFAR_FULL_SCREENSHOTS=1).
Build the site first (`make docs`).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / 'docs'
SHOTS = ROOT / 'build' / 'screenshots'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']


def expected_pages() -> dict[str, str]:
    "Notebook → page name, as nbdev names them (numeric prefix dropped; index stays index)."
    out = {}
    for nb in sorted((ROOT / 'nbs').glob('*.ipynb')):
        if nb.name.startswith('_'): continue
        out[nb.name] = re.sub(r'^\d+[a-z]?_', '', nb.stem) + '.html'
    return out


@contextlib.contextmanager
def serve_site():
    "A local HTTP server for docs/; yields its base URL."
    if not (SITE / 'index.html').exists(): pytest.fail('docs/index.html missing: build the site with `make docs`')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SITE))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_port}/'
    httpd.shutdown()


@contextlib.contextmanager
def open_browser():
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if not exe: pytest.fail('chromium not found: `make chromium` installs Debian\'s chromium')
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)  # a fresh profile each launch
        yield b
        b.close()


@pytest.fixture(scope='session')
def visited(tmp_path_factory):
    """Every page of the site, visited once per test run: its text, links (`SITE/` for the site's own), images,
    anchors, math and sidebar. Parallel workers share one visit through a file, under a lock."""
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root) / 'docs_site_visited.json'
    with open(f'{shared}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not shared.exists():
            with serve_site() as server, open_browser() as browser:
                shared.write_text(json.dumps(visit_site(server, browser)))
        return json.loads(shared.read_text())


def visit_site(server: str, browser) -> dict:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={'width': 1280, 'height': 1000})
    results = {}
    for html in sorted(SITE.glob('*.html')):
        page.goto(server + html.name, wait_until='load')
        page.wait_for_function('!window.MathJax || !MathJax.startup || !MathJax.startup.promise ? true : MathJax.startup.promise.then(() => true)')
        results[html.name] = page.evaluate('''() => {
            const body = document.querySelector('main') || document.body;
            const clone = body.cloneNode(true);
            clone.querySelectorAll('pre, code, mjx-container, script, style').forEach(e => e.remove());
            return {
              text: clone.innerText,
              links: [...document.querySelectorAll('a[href]')].map(a => a.href),
              images: [...document.querySelectorAll('img')].map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0})),
              ids: [...document.querySelectorAll('[id]')].map(e => e.id),
              math: document.querySelectorAll('mjx-container').length,
              sidebar: [...document.querySelectorAll('.bd-sidebar a.reference')].map(a => a.getAttribute('href')),
            };
        }''')
        page.screenshot(path=str(SHOTS / (html.stem + '.png')), full_page=bool(os.environ.get('HOWFAR_FULL_SCREENSHOTS')))
    page.close()
    for r in results.values():  # the site's own links without this server's address
        r['links'] = ['SITE/' + link[len(server):] if link.startswith(server) else link for link in r['links']]
    return results


def test_every_notebook_has_a_page_in_the_sidebar(visited):
    sidebar = {urlparse(h).path.lstrip('./') or 'index.html' for h in visited['index.html']['sidebar']}
    for nb, page in expected_pages().items():
        assert page in visited, f'{nb}: no page {page} in docs/'
        assert page == 'index.html' or page in sidebar, f'{nb}: {page} missing from the sidebar {sorted(sidebar)}'


def test_no_broken_internal_links_or_images(visited):
    broken = []
    for name, r in visited.items():
        for img in r['images']:
            if not img['ok']: broken.append(f'{name}: image {img["src"]}')
        for link in r['links']:
            if not link.startswith('SITE/'): continue
            url, frag = urldefrag(link)
            target = urlparse(url[len('SITE/'):]).path or 'index.html'
            if not (SITE / target).exists(): broken.append(f'{name}: link to missing {target}')
            elif frag and target in visited and frag not in visited[target]['ids']: broken.append(f'{name}: link to missing anchor {target}#{frag}')
    assert not broken, '\n'.join(broken)


@pytest.mark.parametrize('raw', ['#|', 'show_doc(', ':::'])
def test_no_raw_notebook_syntax_visible(visited, raw):
    bad = [name for name, r in visited.items() if raw in r['text']]
    assert not bad, f'{raw!r} visible on {bad}'


def test_formulas_render(visited):
    for name, r in visited.items():
        assert not re.search(r'\$\$|\$[^\s$][^$\n]*\$', r['text']), f'{name}: raw $...$ math visible'
    assert visited['index.html']['math'] >= 1, 'the home page formula was not rendered by MathJax'


def test_api_anchors_use_quarto_names(visited):
    "Quarto names API anchors after the function (core.html#check_shape); links must hold with either tool."
    assert 'check_shape' in visited['core.html']['ids']


def test_screenshots_saved(visited):
    for page in expected_pages().values():
        assert (SHOTS / page.replace('.html', '.png')).stat().st_size > 10_000
