"""export_student.py: a distilled student becomes a plain torchvision state dict."""
import pytest
import torch
import torchvision

import export_student
from fixture_weights import (assert_close_to_reference, filled_state_dict, manifest,
                             original_simreg_checkpoint, run_reference)

pytestmark = pytest.mark.usefixtures('one_thread')


def export(*argv):
    """export_student.py on these command-line arguments, in this process."""
    return export_student.main(export_student.get_args_parser().parse_args([str(a) for a in argv]))


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
    state = {**{'encoder_q.' + k: v for k, v in filled_state_dict(manifest('mobilenet_v2')).items()},
             **{'predict_q.' + k: v for k, v in filled_state_dict(manifest('mlp4_mobilenet_v2')).items()}}
    args = {'arch_student': 'mobilenet', 'arch_teacher': 'resnet50', 'n_mlp_layers': 4, 'linear_pred': False}
    checkpoint = tmp_path / 'last.pth'
    torch.save({'epoch': 1, 'state_dict': state, 'optimizer': {}, 'scaler': {}, 'args': args}, checkpoint)
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
