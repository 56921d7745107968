"""Write a distilled student's backbone as a plain torchvision state dict, for downstream use.

    python export_student.py exp/outputs/checkpoints/ckpt_epoch_130.pth resnet18_simreg.pth

Reads any student checkpoint models.loading accepts (this project's, or the original code's),
drops the regression head and every prefix; ``torchvision.models.resnet18()`` (or the student's
architecture) then loads the file with ``strict=False``, only the classifier missing.
"""
import argparse

from models import load_student
from utils.checkpoint import save_atomic
from utils.errors import exit_on_user_error


def get_args_parser():
    p = argparse.ArgumentParser('Export a SimReg student backbone as a torchvision state dict', add_help=True)
    p.add_argument('checkpoint', help='student checkpoint (train_student.py or the original main.py)')
    p.add_argument('output', help='where to write the state dict (.pth)')
    p.add_argument('--arch', help='expected student architecture; checked against the checkpoint')
    return p


def main(args):
    """Write the backbone's state dict to ``args.output``; returns the state dict."""
    backbone, _ = load_student(args.checkpoint, arch=args.arch, backbone_only=True)
    state = backbone.state_dict()
    save_atomic(state, args.output)
    print(f'wrote {len(state)} tensors ({backbone.feat_dim}-d feature) to {args.output}: load them into the '
          f'torchvision model with strict=False; only the classifier is missing')
    return state


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
