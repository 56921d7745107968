"""Students by torchvision name: the network without its final Linear, returning the pooled feature in
torchvision's key names; trained, checkpointed, evaluated and exported like the ResNets."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import eval_knn
import eval_linear
import export_student
import train_student
from conftest import make_image_folder, read_json, train
from models import build_head, load_backbone, load_student
from models.backbones import (FINAL_LINEAR, REFUSED, STUDENT_ARCHS, build_backbone, classifier_attr,
                              set_projection, torchvision_family)
from models.batchnorm import BNGroups, GroupBatchNorm2d, convert_batchnorm
from utils.errors import SimRegError

pytestmark = pytest.mark.usefixtures('one_thread')


def torchvision_model(name, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None)


def final_linear(model, path):
    linear = model.get_submodule(path)
    assert isinstance(linear, nn.Linear)
    return linear


# name -> feat_dim (the in_features of torchvision's final Linear, checked below too)
FEAT_DIMS = {'mobilenet_v3_large': 1280, 'mobilenet_v3_small': 1024, 'efficientnet_b0': 1280,
             'convnext_tiny': 768, 'regnet_y_400mf': 440, 'shufflenet_v2_x1_0': 1024, 'mnasnet0_5': 1280,
             'densenet121': 1024, 'swin_t': 768}


@pytest.mark.parametrize('name, feat_dim', FEAT_DIMS.items())
def test_students_return_the_pooled_feature(name, feat_dim):
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    reference = torchvision_model(name)
    path = FINAL_LINEAR[torchvision_family(name)]
    assert model.feat_dim == feat_dim == final_linear(reference, path).in_features
    assert classifier_attr(model) == path and isinstance(model.get_submodule(path), nn.Identity)
    # torchvision's keys, less only the final Linear's
    assert set(reference.state_dict()) - set(model.state_dict()) == {f'{path}.weight', f'{path}.bias'}
    assert set(model.state_dict()) <= set(reference.state_dict())
    with torch.no_grad():
        feature = model(torch.randn(2, 3, 64, 64))
    assert feature.shape == (2, feat_dim) and feature.abs().sum() > 0


def test_what_stays_before_the_removed_linear():
    """MobileNet-v3 keeps its feature layer (Linear 960 -> 1280 + Hardswish), loses the Dropout that fed the
    logits; EfficientNet loses its classifier's Dropout; ConvNeXt keeps its LayerNorm2d and Flatten."""
    v3 = build_backbone('mobilenet_v3_large')
    assert [type(m) for m in v3.classifier] == [nn.Linear, nn.Hardswish, nn.Identity, nn.Identity]
    assert (v3.classifier[0].in_features, v3.classifier[0].out_features) == (960, 1280)
    assert [type(m) for m in build_backbone('efficientnet_b0').classifier] == [nn.Identity, nn.Identity]
    convnext = build_backbone('convnext_tiny')
    assert [type(m).__name__ for m in convnext.classifier] == ['LayerNorm2d', 'Flatten', 'Identity']
    # in training too the feature is what the final Linear took, not a dropped-out copy
    v3.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    first = v3(x)
    torch.manual_seed(1)
    assert torch.equal(first, v3(x))


# one model of every accepted family, built on the meta device (no weights: shapes only)
ONE_PER_FAMILY = ['resnet18', 'regnet_x_400mf', 'shufflenet_v2_x0_5', 'densenet121', 'mobilenet_v2',
                  'mobilenet_v3_small', 'efficientnet_v2_s', 'mnasnet0_5', 'convnext_tiny', 'vgg11_bn', 'alexnet',
                  'swin_v2_t', 'vit_b_32', 'maxvit_t']
# those whose forward no other test runs (a forward on the meta device costs as much as a real one)
META_FORWARD = {'vgg11_bn': 64, 'alexnet': 64, 'maxvit_t': 224}


def test_every_family_builds_with_torchvision_keys():
    assert {torchvision_family(n) for n in ONE_PER_FAMILY} == set(FINAL_LINEAR)
    for name in ONE_PER_FAMILY:
        with torch.device('meta'):
            model = build_backbone(name)
            reference = torchvision_model(name) if torchvision_family(name) != 'regnet' else None
        if name in META_FORWARD:
            size = META_FORWARD[name]
            assert model(torch.empty(2, 3, size, size, device='meta')).shape == (2, model.feat_dim), name
        if reference is not None:  # RegNet cannot be built on the meta device (it is above, on the CPU)
            linear = final_linear(reference, classifier_attr(model))
            assert model.feat_dim == linear.in_features, name
            missing = set(reference.state_dict()) - set(model.state_dict())
            assert missing == set(model.classifier_keys) and set(model.state_dict()) <= set(reference.state_dict())
    assert model.classifier_keys == ('classifier.5.weight',)  # MaxViT's final Linear has no bias


def test_mobilenet_stays_mobilenet_v2():
    assert type(build_backbone('mobilenet')) is torchvision.models.MobileNetV2
    assert 'mobilenet' in STUDENT_ARCHS and 'mobilenet_v3_large' in STUDENT_ARCHS


@pytest.mark.parametrize('name', ['squeezenet1_0', 'squeezenet1_1', 'googlenet', 'inception_v3'])
def test_models_without_one_final_linear_are_refused(name):
    with pytest.raises(SimRegError, match=f'{name} cannot be a student: .*; choose another torchvision '
                                          'classification model .* lists them') as info:
        build_backbone(name)
    assert REFUSED[torchvision_family(name)] in str(info.value) and '\n' not in str(info.value)
    assert name not in STUDENT_ARCHS


def test_unknown_names_are_refused_with_how_to_list_them(capsys):
    with pytest.raises(SimRegError, match="unknown architecture 'mobilenet_v4': students are torchvision's "
                                          'classification models by name .*print\\(\\*b.STUDENT_ARCHS\\)'):
        build_backbone('mobilenet_v4')
    with pytest.raises(SimRegError, match='unknown architecture'):
        build_backbone('fasterrcnn_resnet50_fpn')  # torchvision, but not a classification model
    parser = train_student.get_args_parser()
    assert parser.parse_args(['data', '--arch_student', 'efficientnet_b0']).arch_student == 'efficientnet_b0'
    with pytest.raises(SystemExit):
        parser.parse_args(['data', '--arch_student', 'squeezenet1_0'])
    assert "invalid choice: 'squeezenet1_0'" in capsys.readouterr().err


def test_fixed_size_models_refuse_other_sizes_in_one_line():
    with torch.device('meta'):
        vit = build_backbone('vit_b_16')
        with pytest.raises(SimRegError, match='vit_b_16 takes 224x224 images only .* not 64x64: pass --image_size 224'):
            vit(torch.empty(1, 3, 64, 64))
        assert vit(torch.empty(1, 3, 224, 224)).shape == (1, 768)


def test_set_projection_puts_a_linear_back_at_the_classifier_path():
    model = set_projection(build_backbone('mobilenet_v3_small'), nn.Linear(1024, 16))
    assert model.feat_dim == 16 and isinstance(model.classifier[3], nn.Linear)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_a_torchvision_file_loads_as_a_backbone_and_with_its_classifier(tmp_path):
    """A plain torchvision file (a baseline for eval_knn.py --arch): the final Linear is recognised as its
    classifier and dropped; ``keep_fc`` (--teacher_fc) puts it back, giving torchvision's logits."""
    reference = torchvision_model('mobilenet_v3_small', seed=3).eval()
    torch.save(reference.state_dict(), tmp_path / 'mobilenet_v3_small.pth')
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = reference(images)
        backbone = load_backbone('mobilenet_v3_small', str(tmp_path / 'mobilenet_v3_small.pth'))
        with_fc = load_backbone('mobilenet_v3_small', str(tmp_path / 'mobilenet_v3_small.pth'), keep_fc=True)
        reference.classifier[3] = nn.Identity()
        assert torch.equal(backbone(images), reference(images)) and backbone.feat_dim == 1024
        assert torch.equal(with_fc(images), logits) and with_fc.feat_dim == 1000


def test_group_batchnorm_handles_these_students():
    """Every BatchNorm2d of EfficientNet, MobileNet-v3 (momentum 0.01, eps 1e-3) and MNASNet (momentum 3e-4)
    becomes a ghost BatchNorm with its own settings; ConvNeXt has none and is left as it is."""
    for name, (momentum, eps) in [('efficientnet_b0', (0.1, 1e-5)), ('mobilenet_v3_small', (0.01, 1e-3)),
                                  ('mnasnet0_5', (1 - 0.9997, 1e-5))]:
        model = build_backbone(name)
        settings = [(m.momentum, m.eps) for m in model.modules() if type(m) is nn.BatchNorm2d]
        assert settings[0] == pytest.approx((momentum, eps))
        convert_batchnorm(model, BNGroups(2))
        grouped = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(type(m) is GroupBatchNorm2d for m in grouped) and len(grouped) == len(settings) > 0
        assert [(m.momentum, m.eps) for m in grouped] == settings
    torch.manual_seed(0)
    plain = build_backbone('mobilenet_v3_small').train()
    ghost = convert_batchnorm(copy.deepcopy(plain), BNGroups(2))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ghost(x), torch.cat([plain(half) for half in x.split(2)]))
    convnext = build_backbone('convnext_tiny')
    assert convert_batchnorm(convnext, BNGroups(2)) is convnext
    assert not [m for m in convnext.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ---------------------------------------------------------------- trained, evaluated, exported

def export_loads_into_torchvision(checkpoint, tmp_path, name):
    """export_student.py writes a state dict that torchvision.models.<name>() loads with only the final Linear
    missing, and that model, its final Linear replaced by Identity, computes the student's feature."""
    output = tmp_path / f'{name}.pth'
    export_student.main(export_student.get_args_parser().parse_args([str(checkpoint), str(output)]))
    state = torch.load(output, weights_only=True)
    model = torchvision_model(name, seed=123)
    path = FINAL_LINEAR[torchvision_family(name)]
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == [f'{path}.bias', f'{path}.weight'] and not result.unexpected_keys
    model.set_submodule(path, nn.Identity())
    backbone, _ = load_student(str(checkpoint))
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = backbone(images), model.eval()(images)
        fresh = torchvision_model(name, seed=123)
        fresh.set_submodule(path, nn.Identity())
        untrained = fresh.eval()(images)
    assert ours.shape == (3, backbone.feat_dim) and ours.abs().sum() > 0
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, untrained)  # the check would see weights that did not come over
    return backbone


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('students')
    make_image_folder(root / 'data', n_classes=3, per_class=8, size=40)
    torch.manual_seed(0)
    torch.save({'state_dict': build_backbone('resnet18').state_dict()}, root / 'teacher.pth')
    return root


def train_one_epoch(ws, arch):
    """A resnet18 teacher (random) into ``arch``: 24 images at 32 px, 3 steps, BatchNorm over ghost groups of 4."""
    train(['--base_dir', str(ws / 'runs'), '--exp', arch, '--arch_teacher', 'resnet18', '--teacher_weights',
           str(ws / 'teacher.pth'), '--arch_student', arch, '--batch_size', '8', '--bn_batch', '4',
           '--image_size', '32', '--num_workers', '0', '--epochs', '1', '--print_freq', '1', '--single_aug',
           '--weak_weak', str(ws / 'data')])
    return ws / 'runs' / 'exp' / arch / 'checkpoints'


@pytest.mark.slow
@pytest.mark.parametrize('name', ['mobilenet_v3_large', 'efficientnet_b0'])
def test_student_trains_and_exports_to_torchvision(workspace, tmp_path, name):
    checkpoints = train_one_epoch(workspace, name)
    last = torch.load(checkpoints / 'last.pth', weights_only=True)
    first = torch.load(checkpoints / 'ckpt_epoch_0.pth', weights_only=True)
    assert last['epoch'] == 1 and last['args']['arch_student'] == name
    assert last['state_dict'].keys() == first['state_dict'].keys()
    stem = 'encoder_q.features.0.0.weight'  # the first convolution, in both
    assert not torch.equal(last['state_dict'][stem], first['state_dict'][stem])  # trained
    backbone = export_loads_into_torchvision(checkpoints / 'last.pth', tmp_path, name)
    assert backbone.feat_dim == 1280


@pytest.mark.slow
def test_student_checkpoint_evaluates_with_its_own_arch(workspace, tmp_path):
    """eval_knn.py and eval_linear.py read the arch from the checkpoint: a 1280-d MobileNet-v3 feature."""
    checkpoint = workspace / 'runs' / 'exp' / 'mobilenet_v3_large' / 'checkpoints' / 'last.pth'
    if not checkpoint.exists():
        train_one_epoch(workspace, 'mobilenet_v3_large')
    small = ['--image_size', '32', '--workers', '0', str(workspace / 'data')]
    knn = eval_knn.main(eval_knn.get_args_parser().parse_args(
        ['--weights', str(checkpoint), '--save', str(tmp_path / 'knn'), *small]))
    assert knn['settings']['num_train'] == 24 and set(knn['majority_top1']) >= {'1', '20'}
    eval_linear.main(eval_linear.get_args_parser().parse_args(
        ['--weights', str(checkpoint), '--save', str(tmp_path / 'linear'), '--use_cache', '--epochs', '2',
         '--eval-freq', '1', '-b', '8', *small]))
    results = read_json(tmp_path / 'linear' / 'linear_results.json')
    assert results['settings']['stage'] == 'backbone' and 0 <= results['best']['top1'] <= 100
    assert np.load(tmp_path / 'linear' / 'train_feats.npy').shape == (24, 1280)


def calibrated_student(path, name, seed=0):
    """A student checkpoint whose BatchNorms hold the statistics of random images, so that the feature is of
    order one (freshly initialised, MobileNet-v3's is of order 1e-4, which any export matches within 1e-4)."""
    torch.manual_seed(seed)
    backbone = build_backbone(name).eval()  # stochastic depth off: the statistics of the eval forward
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train().momentum = None  # a cumulative average over the batches below
    with torch.no_grad():
        for _ in range(3):
            backbone(torch.randn(16, 3, 32, 32))
    head = build_head(backbone.feat_dim, 64)
    state = {**{'encoder_q.' + k: v for k, v in backbone.state_dict().items()},
             **{'predict_q.' + k: v for k, v in head.state_dict().items()}}
    args = {'arch_student': name, 'arch_teacher': 'resnet18', 'n_mlp_layers': 4, 'linear_pred': False}
    torch.save({'epoch': 1, 'state_dict': state, 'optimizer': {}, 'scaler': {}, 'args': args}, path)
    return path


def test_mobilenet_v3_exports_to_onnx_and_torchvision(tmp_path, capsys):
    import onnxruntime
    checkpoint = calibrated_student(tmp_path / 'last.pth', 'mobilenet_v3_large')
    export_loads_into_torchvision(checkpoint, tmp_path, 'mobilenet_v3_large')
    assert ('torchvision.models.mobilenet_v3_large().load_state_dict(state, strict=False) loads them; only the '
            'classifier is missing (classifier.3.weight, classifier.3.bias)') in capsys.readouterr().out
    export_student.main(export_student.get_args_parser().parse_args(
        [str(checkpoint), '--onnx', str(tmp_path / 'student.onnx'), '--image_size', '32']))
    assert capsys.readouterr().out.strip().endswith('within 0.0001')
    backbone, _ = load_student(str(checkpoint))
    session = onnxruntime.InferenceSession(str(tmp_path / 'student.onnx'), providers=['CPUExecutionProvider'])
    images = torch.randn(4, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    (features,) = session.run(['features'], {'images': images.numpy()})
    with torch.no_grad():
        expected = backbone(images)
    assert features.shape == (4, 1280) and expected.abs().max() > 0.5
    torch.testing.assert_close(torch.from_numpy(features), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize('name', ['mnasnet0_5', 'regnet_x_400mf', 'shufflenet_v2_x0_5'])
def test_student_checkpoints_of_other_families_load_and_export(tmp_path, name):
    """Through load_student (built on the meta device: RegNet on the CPU) and into torchvision; MNASNet loads
    only with its state-dict version, which a renamed copy of the tensors does not carry."""
    checkpoint = calibrated_student(tmp_path / 'last.pth', name)
    backbone = export_loads_into_torchvision(checkpoint, tmp_path, name)
    assert backbone.feat_dim == {'mnasnet0_5': 1280, 'regnet_x_400mf': 400, 'shufflenet_v2_x0_5': 1024}[name]


def test_what_the_onnx_exporter_cannot_export_is_one_line(tmp_path, capsys, monkeypatch):
    """VGG's and AlexNet's adaptive pooling to a fixed grid of a dynamic input size, for one: the exporter's
    own error, in one line, and nothing written."""
    from conftest import write_student_checkpoint

    def refuse(*args, **kwargs):
        raise torch.onnx.OnnxExporterError('Unsupported: ONNX export of operator adaptive_avg_pool2d, input size '
                                           'not accessible. Please feel free to request support')
    monkeypatch.setattr(torch.onnx, 'export', refuse)
    checkpoint = write_student_checkpoint(tmp_path / 'last.pth')
    with pytest.raises(SystemExit) as exit_info:
        export_student.exit_on_user_error(lambda: export_student.main(export_student.get_args_parser().parse_args(
            [checkpoint, '--onnx', str(tmp_path / 'student.onnx'), '--image_size', '32'])))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: torch's ONNX exporter cannot export this backbone (Unsupported: ONNX export of operator "
        f"adaptive_avg_pool2d, input size not accessible): {tmp_path / 'student.onnx'} not written; use the state "
        "dict (OUTPUT.pth)\n")
    assert not list(tmp_path.glob('*.onnx'))


@pytest.mark.parametrize('name, feat_dim', [('resnet10t', 512), ('resnet14t', 2048)])
def test_timm_resnets_are_timms_model_without_its_classifier(name, feat_dim):
    import timm
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=0).eval()
    assert model.feat_dim == feat_dim and classifier_attr(model) == 'fc' and name in STUDENT_ARCHS
    assert model.state_dict().keys() == reference.state_dict().keys()  # timm's keys, all of them
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), reference(images)) and model(images).shape == (2, feat_dim)


def test_timm_student_exports_to_timm_and_onnx(tmp_path, capsys):
    """A resnet10t student checkpoint: export_student.py writes timm's state dict, which
    timm.create_model('resnet10t', num_classes=0) loads strictly and which then computes the student's feature;
    its ONNX file gives the same feature in onnxruntime."""
    import onnxruntime
    import timm
    checkpoint = calibrated_student(tmp_path / 'last.pth', 'resnet10t')
    export_student.main(export_student.get_args_parser().parse_args([str(checkpoint), str(tmp_path / 's.pth')]))
    assert ("timm.create_model('resnet10t', num_classes=0).load_state_dict(state) loads them; nothing is missing"
            in capsys.readouterr().out)
    torch.manual_seed(123)
    model = timm.create_model('resnet10t', pretrained=False, num_classes=0).eval()
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        untrained = model(images)
        model.load_state_dict(torch.load(tmp_path / 's.pth', weights_only=True))  # strict
        theirs = model(images)
        backbone, _ = load_student(str(checkpoint))
        ours = backbone(images)
    assert torch.equal(ours, theirs) and not torch.equal(ours, untrained) and ours.shape == (3, 512)
    export_student.main(export_student.get_args_parser().parse_args(
        [str(checkpoint), '--onnx', str(tmp_path / 'student.onnx'), '--image_size', '32']))
    assert capsys.readouterr().out.strip().endswith('within 0.0001')
    session = onnxruntime.InferenceSession(str(tmp_path / 'student.onnx'), providers=['CPUExecutionProvider'])
    (features,) = session.run(['features'], {'images': images.numpy()})
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(torch.from_numpy(features), ours, atol=1e-4 * ours.abs().max().item(), rtol=0)
