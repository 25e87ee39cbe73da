"""The house's floors: a module imports only from its own floor and the floors below it, and stays small.

core → data | layers → models → scratchpad → train | decoding → bench → experiments → cli
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'transformers_howfar'
FLOORS = {'core': 0, 'data': 1, 'layers': 1, 'models': 2, 'scratchpad': 3, 'train': 4, 'decoding': 4,
          'bench': 5, 'experiments': 6, 'demo': 7, 'cli': 7}
NEVER_BELOW_BENCH = ('bench', 'experiments', 'cli')  # what layers, models and training must never know of


def modules() -> dict[str, Path]:
    "Every module of the package by dotted name below the package (`layers.lsh`), private ones left out."
    found = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE).with_suffix('').parts
        if parts[-1] == '__init__': parts = parts[:-1]
        if parts and not any(p.startswith('_') for p in parts): found['.'.join(parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    "The package modules that the module `name` imports anywhere in its code (lazy imports inside functions too)."
    package = name.split('.')[:-1] if path.name != '__init__.py' else name.split('.')
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
                out.update([target] if node.module else [f'{target}.{a.name}'.lstrip('.') for a in node.names])
            elif node.module and node.module.startswith('transformers_howfar.'):
                out.add(node.module.removeprefix('transformers_howfar.'))
            elif node.module == 'transformers_howfar':
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix('transformers_howfar.') for a in node.names if a.name.startswith('transformers_howfar.'))
    return {t for t in out if t}


def floor(name: str) -> int:
    top = name.split('.')[0]
    if top not in FLOORS: pytest.fail(f'{name}: the module is on no floor; add its subpackage to FLOORS in {Path(__file__).name}')
    return FLOORS[top]


MODULES = modules()


def test_the_walk_sees_the_package():
    assert {'core', 'layers.lsh', 'models.reformer', 'train.trainer', 'cli'} <= set(MODULES)
    assert imports('models.reformer', MODULES['models.reformer']) >= {'core', 'layers.lsh'}


@pytest.mark.parametrize('name', sorted(MODULES))
def test_imports_go_down_only(name):
    for target in sorted(imports(name, MODULES[name])):
        assert floor(target) <= floor(name), f'{name} (floor {floor(name)}) imports {target} (floor {floor(target)})'
        if floor(name) < FLOORS['bench']:
            assert target.split('.')[0] not in NEVER_BELOW_BENCH, f'{name} imports {target}'


def test_the_check_fails_on_an_upward_import(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('def f():\n    from ..bench.measure import time_call\n')
    assert imports('layers.bad', bad) == {'bench.measure'}
    assert floor('bench.measure') > floor('layers.bad')


@pytest.mark.parametrize('name', sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= 400, f'{name}: {lines} lines; split it (at most 400 lines a module)'


def written_lines(path: Path):
    "The lines of an exported module that a notebook wrote: without nbdev's module docstring and `__all__` block."
    lines, in_all = path.read_text().splitlines(), False
    for number, line in enumerate(lines, 1):
        if line.startswith('__all__ = '): in_all = True
        if in_all:
            in_all = not line.rstrip().endswith(']')
            continue
        if number == 1 and line.startswith('"""'): continue
        yield number, line


@pytest.mark.parametrize('name', sorted(MODULES))
def test_exported_code_within_120_columns(name):
    long = [f'{number}: {len(line)}' for number, line in written_lines(MODULES[name]) if len(line) > 120]
    assert not long, f'{name}: lines over 120 columns (line: length) {long}'


def test_the_width_check_skips_only_what_nbdev_writes(tmp_path):
    module = tmp_path / 'm.py'
    module.write_text('"""' + 'x' * 130 + '"""\n__all__ = [' + "'a', " * 30 + "\n           'b']\n" + 'y = 1' + ' ' * 120 + '\n')
    assert [n for n, line in written_lines(module) if len(line) > 120] == [4]
