"""How well a student imitates its teacher: the mean cosine between the head's output and the teacher's feature
on held-out center crops (``<data>/val``), what distillation optimises (loss = 2 - 2 cos): telling where k-NN
cannot (e.g. a random teacher).

    python eval_imitation.py --weights exp/<exp>/checkpoints/ckpt_epoch_130.pth /path/to/imagenet
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.folders import build_dataset
from data.transforms import eval_transform
from evaluation import common, features
from models.loading import load_backbone
from models.presets import resolve_weights
from utils.checkpoint import read_checkpoint, write_file_atomic
from utils.distributed import cleanup, init_distributed, is_main_process
from utils.errors import SimRegError, exit_on_user_error


def get_args_parser():
    p = argparse.ArgumentParser('Mean cosine between a student head and its teacher on val', add_help=True)
    common.add_data_args(p, 'dataset root holding val/ (or the --split folder)',
                         save_help='write imitation_epoch_<epoch>.json here (default: %(default)s)')
    p.add_argument('--weights', required=True, help='student checkpoint')
    p.add_argument('--arch_teacher', help='teacher architecture (default: the one the checkpoint records)')
    p.add_argument('--teacher_weights', help='teacher weights (default: the file the checkpoint records)')
    p.add_argument('--head', help='which head of a several-teacher student (its teacher is the one compared)')
    p.add_argument('--split', default='val', help='folder of held-out images')
    return p


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


class HeadAndTeacher(nn.Module):
    """The student head's output and the teacher's feature of the same images, each L2-normalised, side by
    side: one pass over the images serves both."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher

    def forward(self, images):
        predicted, target = self.student(images).float(), self.teacher(images).float()
        if predicted.shape[1] != target.shape[1]:
            raise SimRegError(f'the head gives {predicted.shape[1]}-d outputs, the teacher {target.shape[1]}-d '
                              f'features: pass the teacher this student was distilled from')
        return torch.cat([F.normalize(predicted, dim=1), F.normalize(target, dim=1)], dim=1)


def main(args):
    """The mean cosine on rank 0 (the dict written to imitation_epoch_<epoch>.json), None elsewhere."""
    device = init_distributed(args.dist_timeout)
    ckpt = read_checkpoint(args.weights)
    arch, teacher_path, teacher_fc = recorded_teacher(ckpt, args)
    student = features.load_feature_model(args.weights, stage='head', head_name=args.head)
    teacher = features.FeatureModel(load_backbone(arch, teacher_path, keep_fc=teacher_fc), None)
    common.resolve_image_size(args, student.backbone)
    dataset = build_dataset(args.data, args.split, eval_transform(args.image_size), args.dataset)
    both = features.extract_features(HeadAndTeacher(student, teacher), dataset, args.batch_size, args.workers, device,
                                     desc='student head and teacher', l2_normalize=False)
    main_process = is_main_process()
    cleanup()
    if not main_process:
        return None
    predicted, target = both.float().chunk(2, dim=1)
    cosine = (predicted * target).sum(dim=1)  # both are L2-normalised: the row-wise dot product is the cosine
    result = {'mean_cosine': cosine.mean().item(), 'loss_2_minus_2cos': (2 - 2 * cosine).mean().item(),
              'epoch': ckpt.get('epoch'), 'weights': os.path.abspath(args.weights), 'teacher_arch': arch,
              'teacher_weights': os.path.abspath(teacher_path), 'split': args.split, 'images': len(dataset),
              'image_size': args.image_size}
    print(f"mean cosine(head, teacher) on {len(dataset)} {args.split} images: {result['mean_cosine']:.4f}")
    if args.save:
        name = f"imitation_epoch_{result['epoch'] if result['epoch'] is not None else 'x'}.json"
        write_file_atomic(json.dumps(result, indent=2), os.path.join(args.save, name))
    return result


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
