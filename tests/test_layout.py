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


def project_functions():
    """(path, FunctionDef) of every function in the project's non-test Python files."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in ('tests', '.git') and not d.startswith('.')]
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                tree = ast.parse(open(path).read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.FunctionDef):
                        yield os.path.relpath(path, ROOT), node


def test_no_function_is_longer_than_80_lines_but_the_argument_parsers():
    long = [f'{path}:{node.name} ({node.end_lineno - node.lineno + 1} lines)' for path, node in project_functions()
            if node.end_lineno - node.lineno + 1 > 80 and node.name != 'get_args_parser']
    assert not long, long


def test_constructors_and_train_one_epoch_take_at_most_6_parameters():
    many = []
    for path, node in project_functions():
        if node.name in ('__init__', 'train_one_epoch') and not path.startswith('benchmarks'):
            count = len(node.args.posonlyargs + node.args.args + node.args.kwonlyargs) - (node.name == '__init__')
            if count > 6:
                many.append(f'{path}:{node.name} ({count})')
    assert not many, many


def test_the_trainer_main_defines_no_function_inside():
    path = os.path.join(ROOT, 'train_student.py')
    main = next(n for n in ast.parse(open(path).read()).body if isinstance(n, ast.FunctionDef) and n.name == 'main')
    assert not [n.name for n in ast.walk(main) if isinstance(n, ast.FunctionDef) and n is not main]
