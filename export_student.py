"""Write a distilled student's backbone for downstream use: a torchvision (or timm) state dict (.pth or
.safetensors), a Hugging Face folder (weights, config.json, model card), and/or ONNX that onnxruntime matches within
``ONNX_TOLERANCE`` on a batch of another size than the export's.

    python export_student.py exp/outputs/checkpoints/ckpt_epoch_130.pth resnet18_simreg.pth [--onnx resnet18.onnx]
    python export_student.py exp/outputs/checkpoints/ckpt_epoch_130.pth resnet18_simreg/ --format hf [--with_head]
"""
import argparse
import io
import json
import os
import warnings

import numpy as np
import safetensors.torch
import torch

from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from evaluation.common import check_output, same_file
from evaluation.report import read_result, source_paths
from models import load_student
from models.student import student_checkpoint, student_heads
from utils.checkpoint import file_digest, read_checkpoint, save_atomic, write_file_atomic
from utils.errors import SimRegError, exit_on_user_error

ONNX_TOLERANCE = 1e-4  # max|onnxruntime - PyTorch| <= ONNX_TOLERANCE * max(1, max|PyTorch|)
EXAMPLE_BATCH, CHECK_BATCH = 2, 3  # the export traces one batch size, the check runs another
OPSETS = range(9, 21)  # the opsets torch's TorchScript-based exporter writes


FORMATS = {'pth': 'a torch.save state dict (OUTPUT.pth)', 'safetensors': 'the same state dict as safetensors '
           '(OUTPUT.safetensors)', 'hf': 'a Hugging Face folder OUTDIR: model.safetensors, config.json, README.md'}
HF_FILES = ('model.safetensors', 'config.json', 'README.md')
TRAINING_ARGS = ('arch_teacher', 'arch_student', 'epochs', 'batch_size', 'image_size', 'learning_rate', 'dataset')


def get_args_parser():
    p = argparse.ArgumentParser('Export a SimReg student backbone: a torchvision (timm) state dict, safetensors, a '
                                'Hugging Face folder and/or ONNX', add_help=True)
    p.add_argument('checkpoint', help='student checkpoint (train_student.py or the original main.py)')
    p.add_argument('output', nargs='?', help='where to write the state dict (.pth, .safetensors) or, with --format hf, '
                   'the folder; may be left out with --onnx')
    p.add_argument('--format', default='pth', choices=FORMATS,
                   help='; '.join(f'{k}: {v}' for k, v in FORMATS.items()) + ' (default: pth)')
    p.add_argument('--with_head', action='store_true', help='--format hf: also the regression head, '
                   'head.safetensors (head_<name>.safetensors per teacher of a several-teacher student)')
    p.add_argument('--license', default='other', help='--format hf: the model card\'s licence, a Hub licence id '
                   '(default: other, i.e. not stated)')
    p.add_argument('--push_to_hub', metavar='REPO_ID', help='--format hf: then upload the folder\'s files to this '
                   'Hub model repository (needs huggingface_hub and a login)')
    p.add_argument('--arch', help='expected student architecture; checked against the checkpoint')
    p.add_argument('--onnx', metavar='PATH', help='also write the backbone as ONNX (input "images" N x 3 x H x W, '
                   'ImageNet-normalised; output "features" N x feat_dim; batch, height and width dynamic)')
    p.add_argument('--image_size', type=int, default=224,
                   help='height and width of the ONNX export\'s example input and of its check batch')
    p.add_argument('--opset', type=int, default=17, choices=OPSETS, metavar='N',
                   help=f'ONNX opset version ({OPSETS[0]}-{OPSETS[-1]}; default 17)')
    return p


def main(args):
    """Write the backbone's state dict (or Hugging Face folder) to ``args.output`` and/or ONNX to ``args.onnx``;
    returns the state dict."""
    if args.output is None and args.onnx is None:
        raise SimRegError('nothing to write: give OUTPUT (the state dict, .pth) and/or --onnx PATH')
    hf_only = [flag for flag, given in (('--with_head', args.with_head), ('--license', args.license != 'other'),
                                        ('--push_to_hub', args.push_to_hub)) if given]
    if args.format != 'hf' and hf_only:
        raise SimRegError(f'{hf_only[0]} belongs to the Hugging Face folder: add --format hf (and OUTDIR)')
    if args.format == 'hf' and (args.output is None or os.path.isfile(args.output)):
        raise SimRegError('--format hf writes a folder: give OUTDIR' +
                          (f', not the file {args.output}' if args.output is not None else ''))
    if args.output is not None and args.onnx is not None and same_file(args.output, args.onnx):
        raise SimRegError(f'OUTPUT and --onnx are one file ({args.onnx}): name two files')
    outputs = [('OUTDIR', os.path.join(args.output, f)) for f in HF_FILES] if args.format == 'hf' else [
        ('OUTPUT', args.output)]
    for flag, path in outputs + [('--onnx', args.onnx)]:
        if path is not None:
            check_output(path, flag, {'the checkpoint': args.checkpoint})
    if args.onnx is not None:
        if args.image_size < 32:
            raise SimRegError(f'--image_size {args.image_size} is below the 32 pixels the backbones downsample by: '
                              f'pass --image_size 32 or more (224 is what the evaluation uses)')
        import_onnx()  # before anything is written
    if args.push_to_hub:
        import_hub()
    backbone, _ = load_student(args.checkpoint, arch=args.arch, backbone_only=True)
    state = backbone.state_dict()
    if args.format == 'hf':
        export_hf(args, backbone)
    elif args.output is not None:
        if args.format == 'pth':
            save_atomic(state, args.output)
        else:
            write_file_atomic(safetensors_bytes(state), args.output)
        print(f'wrote {len(state)} tensors ({backbone.feat_dim}-d feature) to {args.output}: {loading_note(backbone)}')
    if args.onnx is not None:
        export_onnx(backbone, args.onnx, args.image_size, args.opset)
    vit = hasattr(backbone, 'timm_name') and hasattr(backbone, 'image_size')
    if vit and args.output is not None and args.format != 'hf':
        print(f"(a timm ViT: timm.create_model('{backbone.timm_name}', img_size={backbone.image_size}) is the model "
              f"to load them into)")
    return state


def safetensors_bytes(state):
    return safetensors.torch.save({k: v.contiguous() for k, v in state.items()}, metadata={'format': 'pt'})


def export_hf(args, backbone):
    """Write OUTDIR's model.safetensors, config.json and README.md (and with --with_head the head files), each
    atomically, none replacing the checkpoint; then push them with --push_to_hub."""
    ckpt = read_checkpoint(args.checkpoint, mmap=True)
    train_args, state = student_checkpoint(ckpt, args.checkpoint)
    heads = {}
    for name in (student_heads(state) or [None]) if args.with_head else []:
        _, head = load_student(args.checkpoint, head=name)
        heads['head.safetensors' if name is None else f'head_{name}.safetensors'] = (name, head)
    config = hf_config(args.checkpoint, ckpt, train_args, backbone, heads)
    files = {'model.safetensors': safetensors_bytes(backbone.state_dict()),
             **{file: safetensors_bytes(head.state_dict()) for file, (_, head) in heads.items()},
             'config.json': json.dumps(config, indent=2) + '\n', 'README.md': model_card(config, args.license)}
    paths = {file: os.path.join(args.output, file) for file in files}
    for file in heads:  # the other files' paths are checked before the checkpoint is read
        check_output(paths[file], 'OUTDIR', {'the checkpoint': args.checkpoint})
    for file, data in files.items():
        write_file_atomic(data, paths[file])
    print(f'wrote {", ".join(files)} to {args.output}: {config["build"]} loads model.safetensors'
          + (f' with only {", ".join(config["missing_keys"])} missing' if config['missing_keys'] else ''))
    if args.push_to_hub:
        push_to_hub(args.output, list(files), args.push_to_hub)


def hf_config(checkpoint, ckpt, train_args, backbone, heads):
    """config.json: timm's fields (architecture, num_features, model_args, pretrained_cfg: what timm.create_model
    reads from a Hub folder) and the student's provenance: teacher(s), epochs, the evaluations of this file."""
    size = train_args.get('image_size') or 224
    infos = ckpt.get('teachers') or {None: ckpt.get('teacher') or {'arch': train_args.get('arch_teacher')}}
    sha256 = file_digest(checkpoint)
    return {
        **library_build(backbone),
        'num_classes': 0, 'num_features': backbone.feat_dim,
        'pretrained_cfg': {'input_size': [3, size, size], 'interpolation': 'bilinear', 'crop_pct': 0.875,
                           'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD), 'num_classes': 0},
        'student': train_args['arch_student'],
        'teachers': [{'head': name, **{k: info.get(k) for k in ('arch', 'sha256', 'feat_dim')}}
                     for name, info in infos.items()],
        'epoch': ckpt.get('epoch') if isinstance(ckpt.get('epoch'), int) else None,
        'training': {k: train_args.get(k) for k in TRAINING_ARGS},
        'checkpoint_sha256': sha256,
        **evaluations(checkpoint, sha256),
        'heads': {file: {'teacher': name, 'in_dim': backbone.feat_dim, 'out_dim': head[-1].out_features,
                         'n_mlp_layers': train_args.get('n_mlp_layers', 4),
                         'linear_pred': train_args.get('linear_pred', False)}
                  for file, (name, head) in heads.items()} or None,
    }


def library_build(backbone):
    """architecture, library, build (the call that makes the model model.safetensors loads into), missing_keys
    (what that load then misses) and model_args (timm's arguments beyond the name)."""
    name = getattr(backbone, 'torchvision_name', None)
    if name is not None:
        return {'architecture': name, 'library': 'torchvision', 'build': f'torchvision.models.{name}()',
                'missing_keys': list(backbone.classifier_keys), 'model_args': {}}
    model_args = {'img_size': backbone.image_size} if hasattr(backbone, 'image_size') else {}  # a ViT
    call = ''.join(f', {k}={v}' for k, v in model_args.items())
    return {'architecture': backbone.timm_name, 'library': 'timm', 'missing_keys': [], 'model_args': model_args,
            'build': f"timm.create_model('{backbone.timm_name}'{call}, num_classes=0)"}


def evaluations(checkpoint, sha256):
    """knn and linear: the k-NN (eval_knn.py) and linear probe (eval_linear.py) results of this very file's backbone
    where demo.sh and knn_eval.sh put them (evaluation/report.py SOURCES); null where there are none."""
    paths = source_paths(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))))  # <exp>/checkpoints/<file>
    knn, linear = (own_result(paths[source], sha256) for source in ('after_knn', 'linear'))
    return {'knn': knn and {**measured_on(knn['settings']), 'num_classes': knn['settings'].get('num_classes'),
                            'majority_top1': knn['majority_top1']},
            'linear': linear and {**measured_on(linear['settings']), **linear['best']}}


def own_result(path, sha256):
    """The result file at ``path`` when measured on the backbone of the file whose sha256 is ``sha256``, else None
    (with a note when it is another file's)."""
    result = read_result(path)
    settings = (result or {}).get('settings', {})
    if result is not None and (settings.get('weights_sha256'), settings.get('stage')) != (sha256, 'backbone'):
        print(f'note: {path} is not of this checkpoint\'s backbone: left out')
        return None
    return result


def measured_on(settings):
    """The images of an evaluation: their folder's name (not its local path), --dataset, --image_size."""
    data = settings.get('data')
    return {'data': data and os.path.basename(os.path.normpath(data)), 'dataset': settings.get('dataset'),
            'image_size': settings.get('image_size')}


def model_card(config, license):
    """README.md: the Hub's YAML metadata header, how the student was trained and evaluated, how to load it."""
    tags = [config['library'], 'safetensors', 'image-feature-extraction', 'knowledge-distillation', 'simreg']
    teachers = ', '.join(t['arch'] or 'unknown' for t in config['teachers'])
    training = {**config['training'], 'epoch': config['epoch']}
    rows = [f'| {k} | {v} |' for k, v in training.items() if v is not None]
    knn, linear = config['knn'], config['linear']
    results = ([f"- k-NN top-1 (majority vote) on {knn['data']} ({knn['num_classes']} classes, {knn['image_size']} "
                f"px): " + ', '.join(f'{k}-NN {v:.2f}%' for k, v in knn['majority_top1'].items())] if knn else [])
    results += ([f"- linear probe top-1 on {linear['data']} ({linear['image_size']} px): {linear['top1']:.2f}% "
                 f"(epoch {linear['epoch']})"] if linear else [])
    classifier = config['missing_keys'][0].rsplit('.', 1)[0] if config['missing_keys'] else None
    strict = ', strict=False' if config['missing_keys'] else ''
    missing = f"  # missing: {', '.join(config['missing_keys'])}" if config['missing_keys'] else ''
    size = config['pretrained_cfg']['input_size'][-1]
    heads = ([f'- {file}: the regression head (teacher {h["teacher"] or teachers}) from the {h["in_dim"]}-d feature '
              f'to the teacher\'s {h["out_dim"]}-d feature space (L2-normalise its output); it loads into '
              f'`models.head.build_head({h["in_dim"]}, {h["out_dim"]}, {h["n_mlp_layers"]}, {h["linear_pred"]})` of '
              f'the SimReg code' for file, h in config['heads'].items()] if config['heads'] else [])
    return '\n'.join([
        '---', f'library_name: {config["library"]}', f'license: {license}', 'tags:', *[f'- {t}' for t in tags],
        'pipeline_tag: image-feature-extraction', '---', '',
        f'# {config["student"]} distilled from {teachers} (SimReg)', '',
        f'A {config["architecture"]} backbone trained by feature regression (SimReg, Navaneet et al., BMVC 2021) to '
        f'imitate {teachers}. It returns the {config["num_features"]}-d pooled feature of a 3 x {size} x {size} '
        f'image normalised with the ImageNet mean/std (resized to {round(size * 256 / 224)}, centre-cropped).', '',
        '## Training', '', '| argument | value |', '|---|---|', *rows, '', *(['## Evaluation', '', *results, '']
                                                                         if results else []),
        '## Loading', '', '```python', f'import safetensors.torch, {config["library"]}',
        f'model = {config["build"]}',
        f"model.load_state_dict(safetensors.torch.load_file('model.safetensors'){strict}){missing}", '```', '',
        *([f"For the feature, replace the classifier: `model.set_submodule('{classifier}', torch.nn.Identity())`.",
           ''] if classifier else []),
        *(['## Files', '', '- model.safetensors: the backbone', *heads, ''] if heads else []),
        '`config.json` holds the architecture, input size, mean/std, the teacher\'s sha256, the training arguments '
        'and the evaluations.', ''])


def push_to_hub(folder, files, repo_id):
    """Upload ``files`` of ``folder`` to the Hub model repository ``repo_id`` (created if needed)."""
    hub = import_hub()
    try:
        api = hub.HfApi()
        api.create_repo(repo_id, exist_ok=True)
        url = api.upload_folder(folder_path=folder, repo_id=repo_id, allow_patterns=files)
    except Exception as exc:  # no login, no network, no rights: the folder is written all the same
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SimRegError(f'could not push {folder} to the Hub repository {repo_id} ({reason}): the files are '
                          f'written; log in (hf auth login) and check the network, or upload the folder yourself') \
            from None
    print(f'pushed {", ".join(files)} to {url}')


def import_hub():
    """huggingface_hub, imported only for --push_to_hub; a SimRegError naming the fix when missing."""
    try:
        import huggingface_hub
    except ImportError:
        raise SimRegError('--push_to_hub needs the huggingface_hub package: pip install huggingface_hub') from None
    return huggingface_hub


def loading_note(backbone):
    """How to load the exported state dict, and what is then missing."""
    name = getattr(backbone, 'torchvision_name', None)
    if name is None and hasattr(backbone, 'timm_name') and not hasattr(backbone, 'image_size'):  # a timm CNN
        return (f"timm.create_model('{backbone.timm_name}', num_classes=0).load_state_dict(state) loads them; "
                f'nothing is missing (timm builds it without a classifier)')
    if name is None:
        return 'load them into the torchvision model with strict=False; only the classifier is missing'
    return (f'torchvision.models.{name}().load_state_dict(state, strict=False) loads them; only the classifier is '
            f'missing ({", ".join(backbone.classifier_keys)})')


def import_onnx():
    """(onnx, onnxruntime), imported only when ONNX is asked for; a SimRegError naming the fix when missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise SimRegError(f'--onnx needs the onnx and onnxruntime packages ({exc.name or exc} is not installed): '
                          f'pip install onnx onnxruntime') from None
    return onnx, onnxruntime


def export_onnx(backbone, path, image_size, opset):
    """Export ``backbone`` (eval mode) to ONNX, check it with onnxruntime against PyTorch, then write ``path``
    atomically; a model that does not match is not written."""
    onnx, onnxruntime = import_onnx()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(EXAMPLE_BATCH, 3, image_size, image_size, generator=generator)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch calls the TorchScript-based exporter "legacy"; unlike the dynamo one it needs no onnxscript
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        try:
            torch.onnx.export(backbone.eval(), (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=['images'], output_names=['features'],
                              dynamic_axes={'images': {0: 'batch', 2: 'height', 3: 'width'},
                                            'features': {0: 'batch'}})
        except torch.onnx.OnnxExporterError as exc:  # e.g. VGG's adaptive pool to 7x7 of a dynamic size
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split('. ')[0]
            raise SimRegError(f'torch\'s ONNX exporter cannot export this backbone ({reason}): {path} not written; '
                              f'use the state dict (OUTPUT.pth)') from None
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_model_from_string(data))
    batch = torch.randn(CHECK_BATCH, 3, image_size, image_size, generator=generator)
    session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
    (out,) = session.run(['features'], {'images': batch.numpy()})
    with torch.no_grad():
        ref = backbone.eval()(batch).numpy()
    scale = float(np.abs(ref).max())
    err = float(np.abs(out - ref).max()) if out.shape == ref.shape else float('inf')
    check = (f'onnxruntime vs PyTorch on a batch of {CHECK_BATCH} at {image_size}x{image_size} (exported with '
             f'{EXAMPLE_BATCH}): max abs difference {err:.2g}, relative {err / max(scale, 1e-30):.2g}')
    if not err <= ONNX_TOLERANCE * max(1.0, scale):
        raise SimRegError(f'the ONNX export does not match PyTorch ({check}, above {ONNX_TOLERANCE}): {path} not '
                          f'written; try another --opset')
    write_file_atomic(data, path)
    print(f'wrote {path} (opset {opset}; images N x 3 x H x W -> features N x {backbone.feat_dim}): {check}, '
          f'within {ONNX_TOLERANCE}')


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
