"""timm ViT students (vit_tiny_patch16, vit_small_patch16): built at --image_size, the CLS feature, trained,
evaluated and exported in timm's key names, which timm loads."""
import pytest
import timm
import torch

import export_student
from conftest import cache_workspace, make_image_folder, read_json, run_command, train
from models import load_student
from models.backbones import STUDENT_ARCHS, build_backbone

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('arch, timm_name, dim', [('vit_tiny_patch16', 'vit_tiny_patch16_224', 192),
                                                  ('vit_small_patch16', 'vit_small_patch16_224', 384)])
def test_student_is_timms_vit_at_the_image_size(arch, timm_name, dim):
    assert arch in STUDENT_ARCHS
    model = build_backbone(arch, 64)
    assert model.feat_dim == dim and tuple(model.pos_embed.shape) == (1, 1 + 4 * 4, dim)
    reference = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=64)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-5)  # the CLS after the final norm


@pytest.mark.slow
def test_vit_student_trains_exports_and_timm_loads_it(tmp_path, capsys):
    ws = cache_workspace(tmp_path)
    train([str(ws / 'data'), '--arch_student', 'vit_tiny_patch16', '--arch_teacher', 'resnet18',
           '--teacher_weights', str(ws / 'teacher.pth'), '--image_size', '32', '--batch_size', '7', '--epochs', '1',
           '--num_workers', '0', '--single_aug', '--weak_weak', '--base_dir', str(tmp_path), '--exp', 'vit',
           '--channels_last'])
    checkpoint = tmp_path / 'exp' / 'vit' / 'checkpoints' / 'ckpt_epoch_1.pth'
    backbone, head = load_student(str(checkpoint))
    initial, _ = load_student(str(tmp_path / 'exp' / 'vit' / 'checkpoints' / 'ckpt_epoch_0.pth'))
    assert not torch.equal(backbone.blocks[0].attn.qkv.weight, initial.blocks[0].attn.qkv.weight)  # it trained
    assert backbone.image_size == 32 and head[0].in_features == 192

    output = tmp_path / 'vit_tiny_simreg.pth'
    export_student.main(export_student.get_args_parser().parse_args([str(checkpoint), str(output)]))
    assert "timm.create_model('vit_tiny_patch16_224', img_size=32) is the model" in capsys.readouterr().out
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32)
    result = model.load_state_dict(torch.load(output, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ['head.bias', 'head.weight'] and not result.unexpected_keys
    model.reset_classifier(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), backbone(x), atol=1e-5)

    # the evaluation scripts read a ViT student like any other (--arch is checked at its training size)
    data = make_image_folder(tmp_path / 'eval', n_classes=2, per_class=3, size=40)
    run_command(['python', 'eval_knn.py', data, '--arch', 'vit_tiny_patch16', '--image_size', '32', '-j', '0',
                 '-b', '4', '--weights', str(checkpoint), '--save', str(tmp_path / 'knn')])
    assert set(read_json(tmp_path / 'knn' / 'knn_results.json')['majority_top1']) >= {'1', '20'}
