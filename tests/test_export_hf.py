"""export_student.py --format hf / safetensors: weights that torchvision and timm load, config.json, the model card."""
import json
import os
import sys
import types

import pytest
import safetensors.torch
import timm
import torch
import torchvision
import yaml

import export_student
import models
from utils.checkpoint import file_digest

pytestmark = pytest.mark.usefixtures('one_thread')

TEACHER = {'arch': 'resnet50', 'weights': '/data/weights/moco_v2.pth', 'sha256': 'ab' * 32, 'feat_dim': 2048,
           'teacher_fc': False}


def export(*argv):
    return export_student.main(export_student.get_args_parser().parse_args([str(a) for a in argv]))


def user_error(capsys, *argv):
    """The stderr line and exit code of export_student.py on ``argv``, which must fail."""
    with pytest.raises(SystemExit) as exit_info:
        export_student.exit_on_user_error(lambda: export(*argv))
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    return err, exit_info.value.code


def write_student(path, arch='resnet18', heads=(None,), out_dim=16, teachers=None):
    """A seeded-random student saved as train_student.py saves it (at epoch 3 of 10, 32 px); returns
    (path, backbone state, {head name: head state})."""
    torch.manual_seed(0)
    backbone = models.build_backbone(arch, 32)
    head_states = {name: models.build_head(backbone.feat_dim, out_dim).state_dict() for name in heads}
    state = {'encoder_q.' + k: v for k, v in backbone.state_dict().items()}
    for name, head in head_states.items():
        state.update({('predict_q.' if name is None else f'predict_q.{name}.') + k: v for k, v in head.items()})
    args = {'arch_student': arch, 'arch_teacher': 'resnet50', 'n_mlp_layers': 4, 'linear_pred': False,
            'image_size': 32, 'epochs': 10, 'batch_size': 8, 'learning_rate': 0.05, 'dataset': 'imagenet'}
    info = {'teacher': TEACHER} if teachers is None else {'teachers': teachers}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'epoch': 3, 'state_dict': state, 'optimizer': {}, 'args': args, **info}, path)
    return str(path), backbone.state_dict(), head_states


def assert_equal_states(loaded, expected):
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def write_result(path, sha256, **result):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump({**result, 'settings': {'weights_sha256': sha256, 'stage': 'backbone', 'dataset': 'imagenet',
                                          'data': '/data/sets/tiny/', 'image_size': 32, 'num_classes': 10}}, f)


def read_card(path):
    """(the model card's YAML header as a dict, its body)."""
    text = open(path).read()
    assert text.startswith('---\n')
    header, body = text[4:].split('\n---\n', 1)
    return yaml.safe_load(header), body


def test_hf_folder_loads_into_torchvision_resnet18(tmp_path, capsys):
    checkpoint, backbone, _ = write_student(tmp_path / 'exp' / 'r18' / 'checkpoints' / 'ckpt_epoch_3.pth')
    knn = {'1': 41.5, '20': 45.25}
    write_result(tmp_path / 'exp' / 'r18' / 'features' / 'knn_results.json', file_digest(checkpoint),
                 majority_top1=knn)
    out = tmp_path / 'hf'
    export(checkpoint, out, '--format', 'hf')
    assert capsys.readouterr().out == (f'wrote model.safetensors, config.json, README.md to {out}: '
                                       f'torchvision.models.resnet18() loads model.safetensors with only fc.weight, '
                                       f'fc.bias missing\n')
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors']

    state = safetensors.torch.load_file(out / 'model.safetensors')
    model = torchvision.models.resnet18()
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight'] and not result.unexpected_keys
    assert_equal_states(state, backbone)

    config = json.loads((out / 'config.json').read_text())
    assert {k: config[k] for k in ('architecture', 'library', 'build', 'missing_keys', 'num_features', 'student',
                                   'epoch', 'checkpoint_sha256', 'heads', 'linear')} == {
        'architecture': 'resnet18', 'library': 'torchvision', 'build': 'torchvision.models.resnet18()',
        'missing_keys': ['fc.weight', 'fc.bias'], 'num_features': 512, 'student': 'resnet18', 'epoch': 3,
        'checkpoint_sha256': file_digest(checkpoint), 'heads': None, 'linear': None}
    assert config['teachers'] == [{'head': None, 'arch': 'resnet50', 'sha256': 'ab' * 32, 'feat_dim': 2048}]
    assert config['knn'] == {'data': 'tiny', 'dataset': 'imagenet', 'image_size': 32, 'num_classes': 10,
                             'majority_top1': knn}
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]
    assert (config['pretrained_cfg']['mean'], config['pretrained_cfg']['std']) == ([0.485, 0.456, 0.406],
                                                                                  [0.229, 0.224, 0.225])
    assert config['training'] == {'arch_teacher': 'resnet50', 'arch_student': 'resnet18', 'epochs': 10,
                                  'batch_size': 8, 'image_size': 32, 'learning_rate': 0.05, 'dataset': 'imagenet'}
    assert '/data/' not in (out / 'config.json').read_text()  # no local path goes public

    header, body = read_card(out / 'README.md')
    assert header == {'library_name': 'torchvision', 'license': 'other', 'pipeline_tag': 'image-feature-extraction',
                      'tags': ['torchvision', 'safetensors', 'image-feature-extraction', 'knowledge-distillation',
                               'simreg']}
    assert '- k-NN top-1 (majority vote) on tiny (10 classes, 32 px): 1-NN 41.50%, 20-NN 45.25%' in body
    assert '| epochs | 10 |' in body and '| batch_size | 8 |' in body
    code = body.split('```python\n')[1].split('```')[0]
    assert code.splitlines() == [
        'import safetensors.torch, torchvision', 'model = torchvision.models.resnet18()',
        "model.load_state_dict(safetensors.torch.load_file('model.safetensors'), strict=False)  "
        "# missing: fc.weight, fc.bias"]
    cwd = os.getcwd()
    try:  # the card's three lines run as written, in the folder
        os.chdir(out)
        scope = {}
        exec(code, scope)
    finally:
        os.chdir(cwd)
    assert_equal_states({k: v for k, v in scope['model'].state_dict().items() if not k.startswith('fc.')}, backbone)


def test_hf_folder_of_a_timm_student_loads_into_timm(tmp_path, capsys, monkeypatch):
    """resnet10t: timm.create_model(..., num_classes=0) loads it strictly, and so does timm's own Hub loader (its
    downloads answered from the folder): config.json is a timm config."""
    checkpoint, backbone, _ = write_student(tmp_path / 'exp' / 't' / 'checkpoints' / 'last.pth', 'resnet10t')
    out = tmp_path / 'hf'
    export(checkpoint, out, '--format', 'hf', '--license', 'apache-2.0')
    state = safetensors.torch.load_file(out / 'model.safetensors')
    model = timm.create_model('resnet10t', num_classes=0)
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert_equal_states(state, backbone)
    config = json.loads((out / 'config.json').read_text())
    assert (config['build'], config['missing_keys'], config['num_features']) == (
        "timm.create_model('resnet10t', num_classes=0)", [], 512)
    assert (config['knn'], config['linear']) == (None, None)
    header, _ = read_card(out / 'README.md')
    assert (header['library_name'], header['license']) == ('timm', 'apache-2.0')

    monkeypatch.setattr(timm.models._hub, 'download_from_hf', lambda repo, name, **kw: str(out / name))
    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_hf',
                        lambda repo, *a, **kw: safetensors.torch.load_file(out / 'model.safetensors'))
    hub_model = timm.create_model('hf-hub:someone/resnet10t-simreg', pretrained=True)
    assert hub_model.num_classes == 0 and tuple(hub_model.pretrained_cfg['input_size']) == (3, 32, 32)
    assert_equal_states({k: hub_model.state_dict()[k] for k in backbone}, backbone)
    assert hub_model.state_dict().keys() == backbone.keys()


def test_with_head_of_several_teachers_writes_one_file_per_head(tmp_path, capsys):
    teachers = {'resnet50': TEACHER, 'vit_small_patch16': {**TEACHER, 'arch': 'vit_small_patch16',
                                                            'sha256': 'cd' * 32, 'feat_dim': 384}}
    checkpoint, _, heads = write_student(tmp_path / 'exp' / 'two' / 'checkpoints' / 'last.pth',
                                         heads=tuple(teachers), teachers=teachers)
    out = tmp_path / 'hf'
    export(checkpoint, out, '--format', 'hf', '--with_head')
    config = json.loads((out / 'config.json').read_text())
    assert [(t['head'], t['sha256']) for t in config['teachers']] == [('resnet50', 'ab' * 32),
                                                                      ('vit_small_patch16', 'cd' * 32)]
    assert list(config['heads']) == ['head_resnet50.safetensors', 'head_vit_small_patch16.safetensors']
    for file, spec in config['heads'].items():
        assert (spec['in_dim'], spec['out_dim'], spec['n_mlp_layers'], spec['linear_pred']) == (512, 16, 4, False)
        head = models.build_head(spec['in_dim'], spec['out_dim'], spec['n_mlp_layers'], spec['linear_pred'])
        state = safetensors.torch.load_file(out / file)
        head.load_state_dict(state)  # strict
        assert_equal_states(state, heads[spec['teacher']])
    assert 'models.head.build_head(512, 16, 4, False)' in read_card(out / 'README.md')[1]


def test_with_head_of_one_teacher_and_figures_of_another_file(tmp_path, capsys):
    """head.safetensors loads into build_head; a k-NN result of another checkpoint is left out with a note, the
    linear probe of this one is in."""
    exp = tmp_path / 'exp' / 'r18'
    checkpoint, _, heads = write_student(exp / 'checkpoints' / 'ckpt_epoch_3.pth')
    write_result(exp / 'features' / 'knn_results.json', 'ef' * 32, majority_top1={'1': 10.0})
    write_result(exp / 'linear' / 'linear_results.json', file_digest(checkpoint), best={'top1': 52.5, 'epoch': 90})
    export(checkpoint, tmp_path / 'hf', '--format', 'hf', '--with_head')
    assert capsys.readouterr().out.startswith(f'note: {exp / "features" / "knn_results.json"} is not of this '
                                              f'checkpoint\'s backbone: left out\n')
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert config['knn'] is None
    assert config['linear'] == {'data': 'tiny', 'dataset': 'imagenet', 'image_size': 32, 'top1': 52.5, 'epoch': 90}
    head = models.build_head(512, 16)
    head.load_state_dict(safetensors.torch.load_file(tmp_path / 'hf' / 'head.safetensors'))
    assert_equal_states(head.state_dict(), heads[None])
    assert config['heads'] == {'head.safetensors': {'teacher': None, 'in_dim': 512, 'out_dim': 16,
                                                    'n_mlp_layers': 4, 'linear_pred': False}}
    assert '- linear probe top-1 on tiny (32 px): 52.50% (epoch 90)' in read_card(tmp_path / 'hf' / 'README.md')[1]


def test_safetensors_format_writes_the_state_dict_alone(tmp_path, capsys):
    checkpoint, backbone, _ = write_student(tmp_path / 'last.pth', 'mobilenet')
    export(checkpoint, tmp_path / 'student.safetensors', '--format', 'safetensors')
    state = safetensors.torch.load_file(tmp_path / 'student.safetensors')
    assert_equal_states(state, backbone)
    result = torchvision.models.mobilenet_v2().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ['classifier.1.bias', 'classifier.1.weight']
    assert sorted(os.listdir(tmp_path)) == ['last.pth', 'student.safetensors']


@pytest.mark.parametrize('argv, line', [
    (['out.pth', '--with_head'], 'error: --with_head belongs to the Hugging Face folder: add --format hf (and OUTDIR)'),
    (['out', '--push_to_hub', 'me/r18'], 'error: --push_to_hub belongs to the Hugging Face folder: add --format hf '
                                         '(and OUTDIR)'),
    (['--format', 'hf', '--onnx', 'x.onnx'], 'error: --format hf writes a folder: give OUTDIR'),
    (['last.pth', '--format', 'hf'], 'error: --format hf writes a folder: give OUTDIR, not the file {}'),
])
def test_bad_flags_are_one_line(tmp_path, capsys, monkeypatch, argv, line):
    monkeypatch.chdir(tmp_path)
    checkpoint, _, _ = write_student(tmp_path / 'last.pth')
    err, code = user_error(capsys, checkpoint, *argv)
    assert (err, code) == (line.format('last.pth') + '\n', 2)
    assert os.listdir(tmp_path) == ['last.pth']


def test_hf_folder_never_replaces_the_checkpoint(tmp_path, capsys):
    """A checkpoint named like one of the folder's files is refused before anything is written."""
    checkpoint, _, _ = write_student(tmp_path / 'hf' / 'model.safetensors')
    before = file_digest(checkpoint)
    err, code = user_error(capsys, checkpoint, tmp_path / 'hf', '--format', 'hf')
    assert code == 2 and err.startswith(f'error: OUTDIR {checkpoint} is the checkpoint {checkpoint}: writing it '
                                        f'would replace the input')
    assert os.listdir(tmp_path / 'hf') == ['model.safetensors'] and file_digest(checkpoint) == before


def test_push_to_hub_without_huggingface_hub_is_one_line(tmp_path, capsys, monkeypatch):
    checkpoint, _, _ = write_student(tmp_path / 'last.pth')
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)  # import fails as if not installed
    err, code = user_error(capsys, checkpoint, tmp_path / 'hf', '--format', 'hf', '--push_to_hub', 'me/r18')
    assert (err, code) == ('error: --push_to_hub needs the huggingface_hub package: pip install huggingface_hub\n', 2)
    assert not (tmp_path / 'hf').exists()


def fake_hub(fail=None):
    """A stand-in huggingface_hub whose HfApi records its calls (or raises ``fail``): tests never reach the Hub."""
    calls = []

    class HfApi:
        def create_repo(self, repo_id, **kwargs):
            if fail:
                raise fail
            calls.append(('create_repo', repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(('upload_folder', kwargs))
            return f'https://huggingface.co/{kwargs["repo_id"]}/commit/1'
    return types.SimpleNamespace(HfApi=HfApi), calls


def test_push_to_hub_uploads_the_written_files(tmp_path, capsys, monkeypatch):
    checkpoint, _, _ = write_student(tmp_path / 'last.pth')
    hub, calls = fake_hub()
    monkeypatch.setitem(sys.modules, 'huggingface_hub', hub)
    (tmp_path / 'hf').mkdir()
    (tmp_path / 'hf' / 'notes.txt').write_text('private')
    export(checkpoint, tmp_path / 'hf', '--format', 'hf', '--push_to_hub', 'me/r18')
    files = ['model.safetensors', 'config.json', 'README.md']
    assert calls == [('create_repo', 'me/r18', {'exist_ok': True}),
                     ('upload_folder', {'folder_path': str(tmp_path / 'hf'), 'repo_id': 'me/r18',
                                        'allow_patterns': files})]
    assert capsys.readouterr().out.splitlines()[-1] == ('pushed model.safetensors, config.json, README.md to '
                                                        'https://huggingface.co/me/r18/commit/1')


def test_push_to_hub_that_fails_is_one_line_and_keeps_the_folder(tmp_path, capsys, monkeypatch):
    checkpoint, _, _ = write_student(tmp_path / 'last.pth')
    hub, _ = fake_hub(fail=ConnectionError('Failed to resolve huggingface.co\nmore'))
    monkeypatch.setitem(sys.modules, 'huggingface_hub', hub)
    err, code = user_error(capsys, checkpoint, tmp_path / 'hf', '--format', 'hf', '--push_to_hub', 'me/r18')
    assert (err, code) == (f'error: could not push {tmp_path / "hf"} to the Hub repository me/r18 (Failed to resolve '
                           f'huggingface.co): the files are written; log in (hf auth login) and check the network, '
                           f'or upload the folder yourself\n', 2)
    assert sorted(os.listdir(tmp_path / 'hf')) == ['README.md', 'config.json', 'model.safetensors']
