"""Write a distilled student's backbone for downstream use: a torchvision (or timm) state dict, and/or ONNX that
onnxruntime matches within ``ONNX_TOLERANCE`` on a batch of another size than the export's.

    python export_student.py exp/outputs/checkpoints/ckpt_epoch_130.pth resnet18_simreg.pth [--onnx resnet18.onnx]
"""
import argparse
import io
import warnings

import numpy as np
import torch

from evaluation.common import check_output, same_file
from models import load_student
from utils.checkpoint import save_atomic, write_file_atomic
from utils.errors import SimRegError, exit_on_user_error

ONNX_TOLERANCE = 1e-4  # max|onnxruntime - PyTorch| <= ONNX_TOLERANCE * max(1, max|PyTorch|)
EXAMPLE_BATCH, CHECK_BATCH = 2, 3  # the export traces one batch size, the check runs another
OPSETS = range(9, 21)  # the opsets torch's TorchScript-based exporter writes


def get_args_parser():
    p = argparse.ArgumentParser('Export a SimReg student backbone as a torchvision state dict and/or ONNX',
                                add_help=True)
    p.add_argument('checkpoint', help='student checkpoint (train_student.py or the original main.py)')
    p.add_argument('output', nargs='?', help='where to write the state dict (.pth); may be left out with --onnx')
    p.add_argument('--arch', help='expected student architecture; checked against the checkpoint')
    p.add_argument('--onnx', metavar='PATH', help='also write the backbone as ONNX (input "images" N x 3 x H x W, '
                   'ImageNet-normalised; output "features" N x feat_dim; batch, height and width dynamic)')
    p.add_argument('--image_size', type=int, default=224,
                   help='height and width of the ONNX export\'s example input and of its check batch')
    p.add_argument('--opset', type=int, default=17, choices=OPSETS, metavar='N',
                   help=f'ONNX opset version ({OPSETS[0]}-{OPSETS[-1]}; default 17)')
    return p


def main(args):
    """Write the backbone's state dict to ``args.output`` and/or ONNX to ``args.onnx``; returns the state dict."""
    if args.output is None and args.onnx is None:
        raise SimRegError('nothing to write: give OUTPUT (the state dict, .pth) and/or --onnx PATH')
    if args.output is not None and args.onnx is not None and same_file(args.output, args.onnx):
        raise SimRegError(f'OUTPUT and --onnx are one file ({args.onnx}): name two files')
    for flag, path in (('OUTPUT', args.output), ('--onnx', args.onnx)):
        if path is not None:
            check_output(path, flag, {'the checkpoint': args.checkpoint})
    if args.onnx is not None:
        if args.image_size < 32:
            raise SimRegError(f'--image_size {args.image_size} is below the 32 pixels the backbones downsample by: '
                              f'pass --image_size 32 or more (224 is what the evaluation uses)')
        import_onnx()  # before anything is written
    backbone, _ = load_student(args.checkpoint, arch=args.arch, backbone_only=True)
    state = backbone.state_dict()
    if args.output is not None:
        save_atomic(state, args.output)
        print(f'wrote {len(state)} tensors ({backbone.feat_dim}-d feature) to {args.output}: {loading_note(backbone)}')
    if args.onnx is not None:
        export_onnx(backbone, args.onnx, args.image_size, args.opset)
    if args.output is not None and hasattr(backbone, 'timm_name') and hasattr(backbone, 'image_size'):  # a ViT
        print(f"(a timm ViT: timm.create_model('{backbone.timm_name}', img_size={backbone.image_size}) is the model "
              f"to load them into)")
    return state


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
