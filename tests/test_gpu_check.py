"""benchmarks/gpu_check.py cannot arrive broken on a GPU machine: its --smoke mode runs every figure's code on the
CPU and prints each figure's line, with a number or an explicit skip."""
import re

import pytest

from conftest import run_command

from benchmarks.gpu_check import FIGURES

NUMBER = r'[0-9.]+(e[+-]?[0-9]+)?'


@pytest.mark.slow
def test_smoke_prints_every_figure(tmp_path):
    out = run_command(['python', 'benchmarks/gpu_check.py', '--smoke', '--work', str(tmp_path)]).stdout
    for name, (needs_cuda, _, _) in FIGURES.items():
        lines = re.findall(rf'^{name}: (.*)$', out, re.MULTILINE)
        assert len(lines) == 1, (name, out[-3000:])
        if needs_cuda:
            assert lines[0].startswith('skipped (no CUDA)'), lines[0]
        else:
            assert re.match(rf'{NUMBER} img/s', lines[0]) or re.match(rf'packed_collate {NUMBER} img/s', lines[0])
            assert float(re.search(NUMBER, lines[0]).group()) > 0, lines[0]
            wait = re.search(rf'data wait ({NUMBER})%', lines[0])
            assert name.startswith('epoch_') == bool(wait) and (not wait or 0 <= float(wait.group(1)) <= 100), lines[0]
