"""``--log_to wandb,mlflow``: a training run tracked in Weights & Biases or MLflow beside TensorBoard (rank 0): the
same scalars at the same steps, the arguments (``logs/train_args.json``) once, and at each close the report files
present in the experiment folder (``report.png``, ``report.json``) and report.json's numbers as ``results/*``. The
tracked run's id is kept in ``logs/tracking.json``: a resumed training run, and evaluation/report.py, continue it."""
import importlib
import json
import os
import time

from utils.checkpoint import write_file_atomic
from utils.errors import SimRegError

PACKAGES = {'wandb': 'wandb', 'mlflow': 'mlflow-skinny'}  # tracker -> the pip package that provides it
REPORT_FILES = ('report.png', 'report.json')  # evaluation/report.py's outputs, in the experiment folder


def check_log_to(log_to):
    """The trackers of a ``--log_to`` comma list, each importable; else a SimRegError that names the fix."""
    names = [name for name in (log_to or '').split(',') if name]
    for name in names:
        if name not in PACKAGES:
            raise SimRegError(f'--log_to {log_to}: {name!r} is not a tracker; give a comma list of '
                              f'{", ".join(PACKAGES)}')
        try:
            importlib.import_module(name)
        except ImportError:
            raise SimRegError(f'--log_to {name} needs the {name} library: pip install {PACKAGES[name]}') from None
    return names


def build_trackers(logs_dir, log_to):
    """One tracker per name of ``log_to``, for the experiment whose logs are in ``logs_dir``."""
    return [{'wandb': WandbRun, 'mlflow': MlflowRun}[name](logs_dir) for name in check_log_to(log_to)]


def log_report(exp_dir):
    """After evaluation/report.py wrote its files: the tracked runs of the experiment (those of ``--log_to`` in its
    train_args.json) get them."""
    args_path = os.path.join(exp_dir, 'logs', 'train_args.json')
    if not os.path.isfile(args_path):
        return
    with open(args_path) as f:
        log_to = json.load(f).get('log_to')
    for tracker in build_trackers(os.path.join(exp_dir, 'logs'), log_to):
        tracker.start()
        tracker.close()


class Tracker:
    """A tracked run: ``start`` opens it (the one in tracking.json, or a new one), ``scalars(values, step)`` as
    TensorBoard's, ``close`` logs the report files present and ends it. Subclasses give ``open(args, state) -> state``
    (state: what tracking.json keeps), ``scalars`` and ``finish(numbers, files)``."""
    name = None

    def __init__(self, logs_dir):
        self.logs_dir, self.exp_dir, self.started = logs_dir, os.path.dirname(os.path.abspath(logs_dir)), False

    def start(self, resume=True):
        """Open the tracked run of tracking.json if ``resume``, else a new one (a fresh start, --overwrite)."""
        with open(os.path.join(self.logs_dir, 'train_args.json')) as f:
            args = json.load(f)
        path = os.path.join(self.logs_dir, 'tracking.json')
        states = read_json(path) if os.path.isfile(path) else {}
        previous = states.get(self.name) if resume else None
        state = self.open(args, previous)
        if state != previous:
            write_file_atomic(json.dumps({**states, self.name: state}, indent=2) + '\n', path)
        self.started = True

    def close(self):
        if not self.started:
            return
        files = [path for path in (os.path.join(self.exp_dir, name) for name in REPORT_FILES) if os.path.isfile(path)]
        report = os.path.join(self.exp_dir, 'report.json')
        self.finish(results(read_json(report)) if os.path.isfile(report) else {}, files)
        self.started = False


class WandbRun(Tracker):
    """A W&B run named by --exp in project ``$WANDB_PROJECT`` (default simreg; a resumed run: the one it was started
    in); its local files go to ``<exp dir>/wandb`` (or ``$WANDB_DIR``); ``$WANDB_MODE`` (online, offline) as wandb
    reads it. The train/* scalars are plotted against ``train/step`` (TensorBoard's step), the others against
    ``epoch``."""
    name = 'wandb'

    def open(self, args, state):
        import wandb
        self.run = wandb.init(project=(state or {}).get('project') or os.environ.get('WANDB_PROJECT', 'simreg'),
                              name=args['exp'], id=state and state['run_id'], resume='allow',
                              dir=os.environ.get('WANDB_DIR', self.exp_dir), config=None if state else args,
                              settings=wandb.Settings(console='off'))
        self.axes = set()
        return {'run_id': self.run.id, 'project': self.run.project}

    def scalars(self, values, step):
        axis = 'train/step' if next(iter(values)).startswith('train/') else 'epoch'
        for group in {tag.split('/')[0] for tag in values} - self.axes:
            self.run.define_metric(f'{group}/*', step_metric=axis)
            self.axes.add(group)
        self.run.log({**values, axis: step})

    def finish(self, numbers, files):
        self.run.summary.update(numbers)
        for path in files:
            self.run.save(path, base_path=self.exp_dir, policy='now')
        self.run.finish()


class MlflowRun(Tracker):
    """An MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default simreg) named by --exp, in the store of
    ``$MLFLOW_TRACKING_URI`` (a resumed run: the one it was started in), else a local file store ``<base_dir>/mlruns``
    shared by the experiments of --base_dir (``mlflow ui --backend-store-uri <base_dir>/mlruns`` shows them)."""
    name = 'mlflow'

    def open(self, args, state):
        import mlflow
        from mlflow.entities import Param
        os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')  # MLflow 3 refuses a file store unless allowed
        uri = ((state or {}).get('tracking_uri') or os.environ.get('MLFLOW_TRACKING_URI')
               or 'file:' + os.path.abspath(os.path.join(args['base_dir'], 'mlruns')))
        self.client = mlflow.tracking.MlflowClient(uri)
        if state:
            self.run_id = state['run_id']
            self.client.update_run(self.run_id, status='RUNNING')
        else:
            name = os.environ.get('MLFLOW_EXPERIMENT_NAME', 'simreg')
            experiment = self.client.get_experiment_by_name(name)
            run = self.client.create_run(experiment.experiment_id if experiment else
                                         self.client.create_experiment(name), run_name=args['exp'])
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in args.items()])
        return {'run_id': self.run_id, 'tracking_uri': uri}

    def scalars(self, values, step):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(tag, value, now, step) for tag, value in values.items()])

    def finish(self, numbers, files):
        if numbers:
            self.scalars(numbers, 0)
        for path in files:
            self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id)


def results(report):
    """report.json's numbers, and its dicts of numbers (k-NN top-1 by k), as {'results/<name>[_<key>]': value}."""
    flat = {}
    for key, value in report.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        flat.update({f'results/{key}' + (f'_{k}' if k else ''): v for k, v in items
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return flat


def read_json(path):
    with open(path) as f:
        return json.load(f)
