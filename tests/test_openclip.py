"""open_clip teachers (models/openclip.py): k-NN features equal to open_clip's own encode_image on the evaluation
view in the model's own normalisation, strict loading, pretrained tags from a local cache, and eval_zeroshot.py
against open_clip's own zero-shot classifier. Seeded random weights, a few tiny images."""
import os

import huggingface_hub
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

import cache_teacher_feats
import eval_knn
import eval_zeroshot
from data.folders import build_dataset
from evaluation import zeroshot
from models.backbones import is_teacher_arch
from models.loading import load_backbone
from models.student import load_student
from tests.conftest import make_image_folder, read_json, write_student_checkpoint
from utils.errors import SimRegError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_state(name, seed=0):
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    return model, model.state_dict()


@pytest.fixture(scope='module')
def vit_b32(tmp_path_factory):
    """(open_clip's ViT-B-32 with seeded random weights, its model.state_dict() file)."""
    model, state = clip_state('ViT-B-32')
    path = tmp_path_factory.mktemp('w') / 'vit_b32.pth'
    torch.save(state, path)
    return model, str(path)


def eval_view(path, size, mean, std):
    """The protocol's evaluation view by PIL and torchvision's classic transforms, normalised with ``mean``/``std``."""
    view = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    return view(Image.open(path).convert('RGB'))


def reference_features(model, folder, split, size, mean, std):
    images = torch.stack([eval_view(p, size, mean, std) for p, _ in build_dataset(folder, split, None).samples])
    with torch.no_grad():
        return model.encode_image(images)


@pytest.mark.slow
@pytest.mark.parametrize('name, mean, std, safetensors', [('ViT-B-32', CLIP_MEAN, CLIP_STD, False),
                                                          ('ViT-B-16-SigLIP', (0.5,) * 3, (0.5,) * 3, True)])
def test_knn_features_are_open_clips_encode_image(tmp_path, one_thread, name, mean, std, safetensors):
    """eval_knn.py --arch open_clip/<name> caches encode_image's features of the resize-256/crop-224 view normalised
    the model's way (CLIP's or SigLIP's mean/std), at the model's own size; a .safetensors file loads too."""
    model, state = clip_state(name)
    weights = str(tmp_path / ('w.safetensors' if safetensors else 'w.pth'))
    save_file(state, weights) if safetensors else torch.save(state, weights)
    data = make_image_folder(tmp_path / 'data', n_classes=2, per_class=2, size=64)
    args = eval_knn.get_args_parser().parse_args([data, '--arch', f'open_clip/{name}', '--weights', weights,
                                                  '--save', str(tmp_path / 'out'), '-j', '0', '-b', '4'])
    report = eval_knn.main(args)
    assert (report['settings']['image_size'], report['settings']['feat_dim']) == (224, open_clip.get_model_config(
        name)['embed_dim'])
    cached = torch.from_numpy(np.load(tmp_path / 'out' / 'val_feats.npy')).float()
    cosine = F.cosine_similarity(cached, reference_features(model, data, 'val', 224, mean, std), dim=1)
    assert len(cosine) == 4 and cosine.min() >= 0.9999, cosine


def test_strict_loading_names_the_key_and_wrong_names_say_where_to_look(vit_b32, tmp_path):
    _, path = vit_b32
    state = torch.load(path, weights_only=True)
    del state['visual.ln_post.weight']
    torch.save(state, tmp_path / 'missing.pth')
    with pytest.raises(SimRegError) as missing:
        load_backbone('open_clip/ViT-B-32', str(tmp_path / 'missing.pth'))
    assert str(missing.value) == (f'{tmp_path / "missing.pth"} as open_clip/ViT-B-32 does not fit (layout guessed: '
                                  f'open_clip state dict): missing 1 key [visual.ln_post.weight]: check --arch / the '
                                  f'weights file')
    with pytest.raises(SimRegError) as wrong:
        load_backbone('open_clip/ViT-B-33', path)
    assert str(wrong.value) == ('open_clip has no model \'ViT-B-33\' (open_clip/ViT-B-33): python -c "import '
                                'open_clip; print(*open_clip.list_models())" lists the valid names')


def test_a_pretrained_tag_is_read_from_the_local_cache_only(vit_b32, tmp_path, monkeypatch):
    """laion2b_s34b_b79k resolves to open_clip's file in a pre-filled Hugging Face cache; absent, one line."""
    model, path = vit_b32
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    with pytest.raises(SimRegError, match='not in the local cache and nothing is downloaded here'):
        load_backbone('open_clip/ViT-B-32', 'laion2b_s34b_b79k')
    repo = tmp_path / 'hub' / 'models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K'
    os.makedirs(repo / 'snapshots' / 'abc')
    os.makedirs(repo / 'refs')
    (repo / 'refs' / 'main').write_text('abc')
    os.symlink(path, repo / 'snapshots' / 'abc' / 'open_clip_pytorch_model.bin')
    tower = load_backbone('open_clip/ViT-B-32', 'laion2b_s34b_b79k')
    assert (tower.feat_dim, tower.input_size, tower.input_mean, tower.input_std) == (512, 224, CLIP_MEAN, CLIP_STD)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(tower(images), model.encode_image(images))


def test_prompts_are_imagenets_for_its_wnid_folders(tmp_path):
    wnids = [f'n{i:08d}' for i in range(1000)]
    for wnid in wnids:
        os.makedirs(tmp_path / 'imagenet' / wnid)
    names, templates = zeroshot.prompts(str(tmp_path / 'imagenet'), [wnids[0], wnids[999]])
    assert names == ['tench', 'toilet paper'] and templates is open_clip.OPENAI_IMAGENET_TEMPLATES
    names, templates = zeroshot.prompts(str(tmp_path), ['golden_retriever', 'cat'])
    assert names == ['golden retriever', 'cat'] and templates == ('a photo of a {}.',)


@pytest.mark.slow
def test_zeroshot_equals_open_clips_classifier_for_teacher_and_student(vit_b32, tmp_path, one_thread):
    """The teacher's top-1/top-5 are those of open_clip's own build_zero_shot_classifier on encode_image; the
    student's come through its regression head (ImageNet-normalised input), into zeroshot.json."""
    model, teacher_weights = vit_b32
    student_path = write_student_checkpoint(tmp_path / 'student.pth', head_dim=512)
    checkpoint = torch.load(student_path, weights_only=True)
    checkpoint['teacher'] = {'arch': 'open_clip/ViT-B-32', 'weights': teacher_weights}
    torch.save(checkpoint, student_path)
    data = make_image_folder(tmp_path / 'data', n_classes=3, per_class=3, size=64, splits=('val',))
    for c, kept in ((1, 2), (2, 1)):  # 3, 2 and 1 images: each class predicted for all scores differently
        for i in range(kept, 3):
            os.remove(tmp_path / 'data' / 'val' / f'class_{c}' / f'{i:03d}.jpg')
    args = eval_zeroshot.get_args_parser().parse_args([data, '--weights', student_path, '-j', '0', '-b', '9',
                                                       '--save', str(tmp_path / 'out')])
    report = eval_zeroshot.main(args)
    assert read_json(tmp_path / 'out' / 'zeroshot.json') == report

    tokenizer = open_clip.get_tokenizer('ViT-B-32')
    classifier = open_clip.build_zero_shot_classifier(model, tokenizer, ['class 0', 'class 1', 'class 2'],
                                                      ('a photo of a {}.',))
    labels = torch.tensor(build_dataset(data, 'val', None).targets)
    backbone, head = load_student(student_path)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        outputs = {'teacher': reference_features(model, data, 'val', 224, CLIP_MEAN, CLIP_STD),
                   'student': head(backbone(torch.stack([eval_view(p, 224, *imagenet)
                                                         for p, _ in build_dataset(data, 'val', None).samples])))}
    for who, output in outputs.items():
        top = (F.normalize(output, dim=1) @ classifier).topk(3, dim=1).indices
        expected = 100.0 * (top[:, 0] == labels).float().mean().item()
        assert report[who]['top1'] == pytest.approx(expected, abs=1e-9), who
        assert report[who]['top5'] == 100.0  # three classes
    settings = report['settings']
    assert (settings['teacher_arch'], settings['num_images'], settings['templates']) == ('open_clip/ViT-B-32', 6, 1)


def test_open_clip_names_are_teacher_archs(capsys):
    parser = cache_teacher_feats.get_args_parser()
    assert parser.parse_args(['D', '--teacher_weights', 't', '--arch_teacher', 'open_clip/ViT-B-32']).arch_teacher \
        == 'open_clip/ViT-B-32'
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(['D', '--teacher_weights', 't', '--arch_teacher', 'openclip/ViT-B-32'])
    assert refused.value.code == 2
    assert "'openclip/ViT-B-32' is no teacher: choose from resnet18" in capsys.readouterr().err
    assert is_teacher_arch('open_clip/ViT-B-16-SigLIP') and not is_teacher_arch('mobilenet')


@pytest.mark.parametrize('name', ['ViT-S-32', 'ViT-B-16-SigLIP'])
def test_at_another_size_the_tower_is_open_clips_model_built_for_it(tmp_path, one_thread, name):
    """A tower run at 96 px equals open_clip's own model made for 96 px (``force_image_size``) with the trained
    weights loaded the way open_clip loads them at another size; back at its size it is the trained model again."""
    from open_clip.model import resize_pos_embed
    from timm.layers import resample_abs_pos_embed
    _, state = clip_state(name)
    torch.save(state, tmp_path / 'w.pth')
    tower = load_backbone(f'open_clip/{name}', str(tmp_path / 'w.pth'))
    reference = open_clip.create_model(name, force_image_size=96).eval()
    resized = dict(state)
    resize_pos_embed(resized, reference)  # open_clip's own ViTs
    if 'visual.trunk.pos_embed' in resized:  # timm towers: as timm resamples a checkpoint for another size
        resized['visual.trunk.pos_embed'] = resample_abs_pos_embed(resized['visual.trunk.pos_embed'], (6, 6),
                                                                   num_prefix_tokens=0)
    reference.load_state_dict(resized)
    trained = open_clip.create_model(name).eval()
    trained.load_state_dict(state)
    small, full = torch.randn(2, 3, 96, 96), torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert F.cosine_similarity(tower(small), reference.encode_image(small)).min() > 0.9999
        torch.testing.assert_close(tower(full), trained.encode_image(full), rtol=0, atol=1e-6)
    assert not [key for key in tower.state_dict() if 'trained_pos' in key]  # nothing added to the weights


def test_a_tower_that_cannot_take_another_size_says_so(tmp_path):
    torch.save(clip_state('RN50')[1], tmp_path / 'rn50.pth')
    tower = load_backbone('open_clip/RN50', str(tmp_path / 'rn50.pth'))
    with pytest.raises(SimRegError, match=r'^open_clip/RN50 takes 224px images only: pass --teacher_image_size 224'):
        tower(torch.zeros(1, 3, 96, 96))
