"""The layout the README's map describes: each package imports only the ones below it."""
import ast
import os

from conftest import ROOT

# a package may import those to its right, never one to its left (nor a top-level script)
LAYERS = ('evaluation', 'models', 'data', 'utils')
SCRIPTS = {name[:-3] for name in os.listdir(ROOT) if name.endswith('.py')}


def project_imports(path):
    """The project's top-level packages and scripts that the module at ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split('.')[0] for name in names} & (set(LAYERS) | SCRIPTS)
    return found


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for i, package in enumerate(LAYERS):
        allowed = {package, *LAYERS[i + 1:]}
        folder = os.path.join(ROOT, package)
        for name in sorted(os.listdir(folder)):
            if name.endswith('.py'):
                bad = project_imports(os.path.join(folder, name)) - allowed
                wrong += [f'{package}/{name} imports {b}' for b in sorted(bad)]
    assert not wrong, wrong


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / 'm.py'
    module.write_text('import os\nfrom utils.errors import SimRegError\n\ndef f():\n    from models import teachers\n'
                      '    import train_student\n')
    assert project_imports(str(module)) == {'utils', 'models', 'train_student'}
