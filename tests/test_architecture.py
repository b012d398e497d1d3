"""The package's imports (every ``import`` in every module, also inside functions): no circle between modules, and
none from a lower layer to a higher one."""
import ast
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parents[1] / 'ldae_models'
# the layers, lowest first: a unit imports only from units of its own layer or below
LAYERS = [{'progress', 'layers', 'hub'}, {'models', 'data'}, {'engine', 'features'}, {'plots', 'probe'}, {'jobs'},
          {'__init__'}, {'cli', '__main__'}]


def module_graph() -> Dict[str, Set[str]]:
    """{module: the package's modules it imports}, from the source."""
    graph: Dict[str, Set[str]] = {}
    for path in PACKAGE.rglob('*.py'):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        mod = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        pkg = mod if path.name == '__init__.py' else mod.rsplit('.', 1)[0]
        out = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split('.')[:len(pkg.split('.')) - (node.level - 1)] if node.level else []
                target = '.'.join(base + ([node.module] if node.module else [])) if node.level else node.module or ''
                if target.startswith('ldae_models'):
                    for alias in node.names:  # `from . import data`: the module data; `from .x import y`: x
                        sub = f'{target}.{alias.name}'
                        out.add(sub if (PACKAGE.parent / (sub.replace('.', '/') + '.py')).exists()
                                or (PACKAGE.parent / sub.replace('.', '/')).is_dir() else target)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith('ldae_models')}
        out.discard(mod)
    return graph


def unit(mod: str) -> str:
    parts = mod.split('.')
    return parts[1] if len(parts) > 1 else '__init__'


def test_no_module_imports_itself_through_others():
    graph = module_graph()
    state: Dict[str, int] = {}

    def visit(m: str, stack: list) -> None:
        state[m] = 1
        for n in graph.get(m, ()):
            if n == 'ldae_models':  # the package root re-exports; importing it is importing the API, not a module
                continue
            assert state.get(n) != 1, 'an import circle: ' + ' -> '.join(stack + [m, n])
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_lower_layer_imports_a_higher_one():
    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    graph = module_graph()
    units = {unit(m) for m in graph}
    assert units <= set(level), f'units without a layer: {units - set(level)}'
    for m, targets in graph.items():
        for t in targets:
            assert level[unit(t)] <= level[unit(m)], f'{m} (layer {level[unit(m)]}) imports {t} ' \
                                                     f'(layer {level[unit(t)]})'
