"""How well a student imitates its teacher: the mean cosine between the regression head's output
and the teacher's feature on held-out images (center crops of ``<data>/val``).

This is what distillation optimises (loss = 2 - 2 cos), measured on images the student never
trained on; it says whether distillation worked even when the teacher is random and k-NN says little.

    python eval_imitation.py --weights exp/<exp>/checkpoints/ckpt_epoch_130.pth /path/to/imagenet
"""
import argparse
import json
import os


from data.folders import build_dataset
from data.transforms import eval_transform
from models.loading import load_backbone, read_checkpoint, resolve_weights
from utils import features
from utils.checkpoint import write_text_atomic
from utils.distributed import cleanup, init_distributed, is_main_process
from utils.errors import SimRegError, exit_on_user_error

parser = argparse.ArgumentParser(description='mean cosine between a student head and its teacher on val')
parser.add_argument('data', help='dataset root holding val/')
parser.add_argument('--weights', required=True, help='student checkpoint')
parser.add_argument('--arch_teacher', help='teacher architecture (default: the one the checkpoint records)')
parser.add_argument('--teacher_weights', help='teacher weights (default: the file the checkpoint records)')
parser.add_argument('--head', help='which head of a several-teacher student (its teacher is the one compared)')
parser.add_argument('--dataset', default='imagenet', choices=['imagenet', 'imagenet100'])
parser.add_argument('--split', default='val', help='folder of held-out images')
parser.add_argument('--image_size', type=int, default=224)
parser.add_argument('-b', '--batch-size', type=int, default=256, help='total over all processes')
parser.add_argument('-j', '--workers', type=int, default=8)
parser.add_argument('--save', help='write imitation_epoch_<epoch>.json here')


def recorded_teacher(ckpt, args):
    """(arch, weights path, teacher_fc) from the flags, else from what train_student.py recorded."""
    recorded = ckpt.get('teacher') or (ckpt.get('teachers') or {}).get(args.head) or {}
    arch = args.arch_teacher or recorded.get('arch')
    weights = args.teacher_weights or recorded.get('weights')
    if not arch or not weights:
        raise SimRegError(f'{args.weights} records no live teacher for this head (cached targets, several '
                          f'teachers without --head, or an original checkpoint): pass --head, or '
                          f'--arch_teacher and --teacher_weights')
    return arch, resolve_weights(weights), bool(recorded.get('teacher_fc')) and not args.teacher_weights


def main():
    args = parser.parse_args()
    device = init_distributed()
    ckpt = read_checkpoint(args.weights)
    arch, teacher_path, teacher_fc = recorded_teacher(ckpt, args)
    student = features.load_feature_model(args.weights, stage='head', head_name=args.head)
    teacher = features.FeatureModel(load_backbone(arch, teacher_path, keep_fc=teacher_fc), None)
    dataset = build_dataset(args.data, args.split, eval_transform(args.image_size), args.dataset)
    extract = dict(dataset=dataset, batch_size=args.batch_size, workers=args.workers, device=device)
    predicted = features.extract_features(student, desc='student head', **extract)
    target = features.extract_features(teacher, desc='teacher', **extract)
    cleanup()
    if not is_main_process():
        return
    # both are L2-normalised: the row-wise dot product is the cosine
    cosine = (predicted.float() * target.float()).sum(dim=1)
    result = {'mean_cosine': cosine.mean().item(), 'loss_2_minus_2cos': (2 - 2 * cosine).mean().item(),
              'epoch': ckpt.get('epoch'), 'weights': os.path.abspath(args.weights), 'teacher_arch': arch,
              'teacher_weights': os.path.abspath(teacher_path), 'split': args.split, 'images': len(dataset),
              'image_size': args.image_size}
    print(f"mean cosine(head, teacher) on {len(dataset)} {args.split} images: {result['mean_cosine']:.4f}")
    if args.save:
        name = f"imitation_epoch_{result['epoch'] if result['epoch'] is not None else 'x'}.json"
        write_text_atomic(json.dumps(result, indent=2), os.path.join(args.save, name))


if __name__ == '__main__':
    exit_on_user_error(main)
