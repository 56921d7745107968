"""export_student.py: a distilled student becomes a plain torchvision state dict, and an ONNX model."""
import importlib
import sys

import pytest
import torch
import torchvision

import export_student
from conftest import write_student_checkpoint
from models import load_student
from fixture_weights import (assert_close_to_reference, filled_state_dict, manifest,
                             original_simreg_checkpoint, run_reference)

pytestmark = pytest.mark.usefixtures('one_thread')


def export(*argv):
    """export_student.py on these command-line arguments, in this process."""
    return export_student.main(export_student.get_args_parser().parse_args([str(a) for a in argv]))


# arch -> (backbone manifest, 4-layer head manifest) of the reference fixtures
STUDENT_MANIFESTS = {'resnet18': ('resnet18', 'mlp4_resnet18'), 'mobilenet': ('mobilenet_v2', 'mlp4_mobilenet_v2')}


def project_student(path, arch):
    """A student checkpoint in this project's layout holding the fixtures' filled weights (a randomly
    initialised MobileNet-v2 outputs features of about 1e-9, which any export matches within 1e-4)."""
    backbone, head = (filled_state_dict(manifest(name)) for name in STUDENT_MANIFESTS[arch])
    state = {**{'encoder_q.' + k: v for k, v in backbone.items()}, **{'predict_q.' + k: v for k, v in head.items()}}
    args = {'arch_student': arch, 'arch_teacher': 'resnet50', 'n_mlp_layers': 4, 'linear_pred': False}
    torch.save({'epoch': 1, 'state_dict': state, 'optimizer': {}, 'scaler': {}, 'args': args}, path)
    return path, backbone


def test_original_student_exports_to_torchvision_resnet18(tmp_path, capsys):
    checkpoint = tmp_path / 'ckpt_epoch_130.pth'
    torch.save(original_simreg_checkpoint('resnet50_to_resnet18'), checkpoint)
    output = tmp_path / 'resnet18_simreg.pth'
    export(checkpoint, output, '--arch', 'resnet18')
    assert 'only the classifier is missing' in capsys.readouterr().out

    state = torch.load(output, weights_only=True)
    assert set(state) == {k for k, _, _ in manifest('resnet18')}  # no head, no prefixes
    model = torchvision.models.resnet18()
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight'] and not result.unexpected_keys
    model.fc = torch.nn.Identity()
    assert_close_to_reference(run_reference(model, 'resnet18'), 'resnet18')


def test_project_mobilenet_student_exports_to_torchvision(tmp_path):
    checkpoint, _ = project_student(tmp_path / 'last.pth', 'mobilenet')
    export(checkpoint, tmp_path / 'mobilenet.pth')
    result = torchvision.models.mobilenet_v2().load_state_dict(
        torch.load(tmp_path / 'mobilenet.pth', weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ['classifier.1.bias', 'classifier.1.weight']
    assert not result.unexpected_keys


def test_teacher_file_is_refused_with_one_line(tmp_path, capsys):
    teacher = tmp_path / 'resnet50.pth'
    torch.save(filled_state_dict(manifest('mlp2_resnet18')), teacher)
    with pytest.raises(SystemExit) as exit_info:
        export_student.exit_on_user_error(lambda: export(teacher, tmp_path / 'out.pth'))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'not a SimReg student checkpoint' in err and err.count('\n') == 1
    assert not (tmp_path / 'out.pth').exists()


def test_several_teacher_student_exports_its_backbone(tmp_path):
    """The backbone is shared by every head, so exporting needs no --head."""
    backbone = filled_state_dict(manifest('resnet18'))
    head = filled_state_dict(manifest('mlp4_resnet18'))
    state = {**{'encoder_q.' + k: v for k, v in backbone.items()},
             **{f'predict_q.{name}.{k}': v for name in ('resnet50', 'resnet50_1') for k, v in head.items()}}
    args = {'arch_student': 'resnet18', 'arch_teacher': 'resnet50,resnet50', 'n_mlp_layers': 4,
            'linear_pred': False}
    checkpoint = tmp_path / 'last.pth'
    torch.save({'epoch': 1, 'state_dict': state, 'optimizer': {}, 'scaler': {}, 'args': args}, checkpoint)
    export(checkpoint, tmp_path / 'resnet18.pth')
    exported = torch.load(tmp_path / 'resnet18.pth', weights_only=True)
    assert exported.keys() == backbone.keys()
    assert all(torch.equal(exported[k], v) for k, v in backbone.items())


@pytest.mark.parametrize('arch', ['resnet18', 'mobilenet'])
def test_onnx_runs_in_onnxruntime_like_pytorch(tmp_path, capsys, arch):
    """Exported at batch 2 and 64x64; onnxruntime runs other batch sizes and image sizes, within 1e-4 of the
    PyTorch backbone, and the state dict written along is the one a plain export writes."""
    import onnxruntime
    checkpoint, backbone_state = project_student(tmp_path / 'last.pth', arch)
    export(checkpoint, tmp_path / 'student.pth', '--onnx', tmp_path / 'student.onnx', '--image_size', 64)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith(f'wrote {tmp_path / "student.onnx"} ')
    assert lines[1].endswith('within 0.0001')
    exported = torch.load(tmp_path / 'student.pth', weights_only=True)
    assert exported.keys() == backbone_state.keys()
    assert all(torch.equal(exported[k], v) for k, v in backbone_state.items())
    assert not list(tmp_path.glob('.*.tmp'))

    backbone, _ = load_student(checkpoint)
    session = onnxruntime.InferenceSession(str(tmp_path / 'student.onnx'), providers=['CPUExecutionProvider'])
    assert [i.name for i in session.get_inputs()] == ['images']
    assert [o.name for o in session.get_outputs()] == ['features']
    generator = torch.Generator().manual_seed(1)
    for shape in ((5, 3, 64, 64), (1, 3, 96, 80)):
        images = torch.randn(shape, generator=generator)
        (features,) = session.run(['features'], {'images': images.numpy()})
        with torch.no_grad():
            expected = backbone(images)
        assert features.shape == (shape[0], backbone.feat_dim)
        assert expected.abs().max() > 0.5  # a real feature, not one any model matches within 1e-4
        err = (torch.from_numpy(features) - expected).abs().max().item()
        assert err <= 1e-4 * max(1.0, expected.abs().max().item()), f'{arch} {shape}: max abs difference {err}'


@pytest.mark.parametrize('missing', ['onnx', 'onnxruntime'])
def test_onnx_without_its_packages_names_the_fix(tmp_path, capsys, monkeypatch, missing):
    checkpoint = write_student_checkpoint(tmp_path / 'last.pth')
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    with pytest.raises(SystemExit) as exit_info:
        export_student.exit_on_user_error(
            lambda: export(checkpoint, tmp_path / 'student.pth', '--onnx', tmp_path / 'student.onnx'))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --onnx needs the onnx and onnxruntime packages') and err.count('\n') == 1
    assert f'({missing} is not installed)' in err and err.rstrip().endswith('pip install onnx onnxruntime')
    assert not (tmp_path / 'student.pth').exists() and not (tmp_path / 'student.onnx').exists()


def test_state_dict_export_imports_no_onnx_package(tmp_path, monkeypatch):
    checkpoint = write_student_checkpoint(tmp_path / 'last.pth')
    for name in ('onnx', 'onnxruntime'):
        monkeypatch.setitem(sys.modules, name, None)
    importlib.reload(export_student)  # a module-level import of either would fail here
    state = export(checkpoint, tmp_path / 'student.pth')
    assert torch.load(tmp_path / 'student.pth', weights_only=True).keys() == state.keys()


def test_nothing_to_write_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_student.exit_on_user_error(lambda: export(tmp_path / 'last.pth'))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == 'error: nothing to write: give OUTPUT (the state dict, .pth) and/or --onnx PATH\n'


def test_onnx_that_does_not_match_is_not_written(tmp_path, capsys, monkeypatch):
    checkpoint = write_student_checkpoint(tmp_path / 'last.pth')
    monkeypatch.setattr(export_student, 'ONNX_TOLERANCE', -1.0)  # no difference passes
    with pytest.raises(SystemExit) as exit_info:
        export_student.exit_on_user_error(
            lambda: export(checkpoint, '--onnx', tmp_path / 'student.onnx', '--image_size', 32))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: the ONNX export does not match PyTorch (onnxruntime vs PyTorch on a batch of 3 '
                          'at 32x32') and err.count('\n') == 1
    assert not (tmp_path / 'student.onnx').exists() and not list(tmp_path.glob('.*.tmp'))
