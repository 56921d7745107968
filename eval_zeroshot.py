"""Zero-shot top-1/top-5 of a student distilled from an open_clip (CLIP, SigLIP) teacher, through its regression
head, and of that teacher, with the teacher's text tower (``evaluation.zeroshot``), in ``<save>/zeroshot.json``.

    python eval_zeroshot.py --weights exp/clip_to_r18/checkpoints/ckpt_epoch_130.pth --save out/ /path/to/imagenet
"""
import argparse
import json
import os

import torch
import torch.nn as nn

from data.folders import build_dataset
from data.transforms import eval_transform
from evaluation import common, features, zeroshot
from models.openclip import ImageTower, load_clip, weights_file
from utils.checkpoint import read_checkpoint, write_file_atomic
from utils.distributed import cleanup
from utils.errors import SimRegError, exit_on_user_error


def get_args_parser():
    p = argparse.ArgumentParser('Zero-shot evaluation of students of open_clip teachers', add_help=True)
    common.add_data_args(p, 'dataset root holding the --split folder (<split>/<class>/<image>)')
    p.add_argument('--weights', required=True, help='student checkpoint (train_student.py) of an open_clip teacher')
    p.add_argument('--head', help='which head of a several-teacher student (its open_clip teacher\'s)')
    p.add_argument('--arch_teacher', help='open_clip/<model name> of the teacher (default: the checkpoint\'s)')
    p.add_argument('--teacher_weights', help='the teacher\'s state-dict file or local pretrained tag (default: the '
                                             'checkpoint\'s)')
    p.add_argument('--split', default='val', help='the folder under DIR to classify')
    p.add_argument('--class_names', help='file of class names, one per line in the folders\' sorted order (default: '
                                         'ImageNet\'s for its wnid folders, else the folder names, _ as space)')
    p.add_argument('--amp', action='store_true', help='run the networks under autocast')
    p.set_defaults(stage=None, use_pred=False)  # common.start: the results go to --save itself
    return p


def main(args):
    """The zeroshot.json report on rank 0, None elsewhere."""
    checkpoint = read_checkpoint(args.weights, mmap=True)
    arch, spec = zeroshot.teacher_of(checkpoint, args.head, args.arch_teacher, args.teacher_weights, args.weights)
    run = common.start(args, 'zeroshot_logs')
    clip = load_clip(arch, spec)
    teacher = ImageTower(clip, arch, spec)
    student = features.load_feature_model(args.weights, stage='head', head_name=args.head)
    out_dim = [m for m in student.head if isinstance(m, nn.Linear)][-1].out_features
    if out_dim != teacher.feat_dim:
        raise SimRegError(f'the head of {args.weights} outputs {out_dim}-d, {arch} embeds in {teacher.feat_dim}-d: '
                          f'pass the teacher it was distilled from (--arch_teacher, --teacher_weights)')
    size = common.resolve_image_size(args, teacher)  # the teacher's own size: both networks see the same view
    dataset = build_dataset(args.data, args.split, eval_transform(size), args.dataset)
    extract = dict(dataset=dataset, batch_size=args.batch_size, workers=args.workers, device=run.device, amp=args.amp)
    image_features = {'teacher': features.extract_features(teacher, desc='teacher features', **extract),
                      'student': features.extract_features(student, desc='student features', **extract)}
    cleanup()
    if not run.main:
        return None
    names, templates = zeroshot.prompts(dataset.root, dataset.classes, args.class_names)
    classifier = zeroshot.text_classifier(clip, arch, names, templates, run.device)
    labels = torch.tensor(dataset.targets)
    results = {who: zeroshot.accuracy(feats, labels, classifier) for who, feats in image_features.items()}
    for who, acc in results.items():
        run.logger.info(f'zero-shot {who} * Acc@1 {acc["top1"]:.2f} Acc@5 {acc["top5"]:.2f}')
    report = {**results, 'settings': {
        'weights': os.path.abspath(args.weights), 'head': args.head, 'teacher_arch': arch,
        'teacher_weights': os.path.abspath(weights_file(arch, spec)), 'data': os.path.abspath(args.data),
        'split': args.split, 'dataset': args.dataset, 'image_size': size, 'num_images': len(dataset),
        'num_classes': len(names), 'templates': len(templates), 'teacher_mean': list(teacher.input_mean),
        'teacher_std': list(teacher.input_std), 'amp': args.amp, 'processes': run.world_size,
        'minutes': round(run.minutes(), 3)}}
    write_file_atomic(json.dumps(report, indent=2) + '\n', os.path.join(run.save, 'zeroshot.json'))
    run.logger.info(f'=> results in {os.path.join(run.save, "zeroshot.json")}')
    return report


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
