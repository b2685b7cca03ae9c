"""Minimal graph-mode stand-in for TF 1.x `tf.estimator`, used by the kit shim (boot.py).

Why it exists
-------------
TensorFlow removed `tf.estimator` in 2.16 (tensorflow-estimator 2.15 is the
last release and does not load with TF >= 2.16).  Even on TF <= 2.15 the real
Estimator cannot run the starting kit's baselines: Estimator builds a NEW
tf.Graph for every train()/predict() call and calls `input_fn` inside it, but
the kit creates its tf.data.Dataset once, in ingestion's default graph.  In
TF 1.13 a Dataset was a graph-independent description, so that worked; since
TF 2.0 a Dataset owns a variant tensor of the graph it was created in, and any
transformation from another graph fails with
  "ValueError: Tensor(...) must be from the same graph as Tensor(...)".

What it does
------------
Same public surface the kit's baselines use (Estimator(model_fn, model_dir,
config, params), .train(input_fn, steps, max_steps), .predict(input_fn),
.evaluate(input_fn, steps), EstimatorSpec, ModeKeys, RunConfig), but every call
builds its ops in the CURRENT default graph (the one holding the kit's
dataset), inside one variable scope with AUTO_REUSE so that successive
train()/predict() calls share the model weights, and runs them in one
persistent Session.  Training therefore continues across train() calls like
the real Estimator (which restored a checkpoint instead).  Known difference:
optimizer slot variables (e.g. Adam moments) created by a model_fn are new on
every train() call, so optimizer state restarts at each call.
"""
import atexit
import collections
import inspect
import itertools
import logging
import tempfile

import numpy as np
import tensorflow as _tf

tf = _tf.compat.v1
_logger = logging.getLogger("kit_shim.tf1_estimator")
_counter = itertools.count()
_open_sessions = []


@atexit.register
def _close_sessions():
  # Close sessions while the interpreter is still intact: left to the garbage
  # collector at interpreter shutdown, Session.close() can block forever.
  while _open_sessions:
    try:
      _open_sessions.pop().close()
    except Exception:
      pass


class ModeKeys(object):
  TRAIN = "train"
  EVAL = "eval"
  PREDICT = "infer"


_SPEC_FIELDS = ("mode", "predictions", "loss", "train_op", "eval_metric_ops",
                "export_outputs", "training_chief_hooks", "training_hooks",
                "scaffold", "evaluation_hooks", "prediction_hooks")


class EstimatorSpec(collections.namedtuple("EstimatorSpec", _SPEC_FIELDS)):
  def __new__(cls, mode, predictions=None, loss=None, train_op=None,
              eval_metric_ops=None, export_outputs=None,
              training_chief_hooks=None, training_hooks=None, scaffold=None,
              evaluation_hooks=None, prediction_hooks=None):
    return super(EstimatorSpec, cls).__new__(
        cls, mode, predictions, loss, train_op, eval_metric_ops,
        export_outputs, training_chief_hooks, training_hooks, scaffold,
        evaluation_hooks, prediction_hooks)


class RunConfig(object):
  def __init__(self, model_dir=None, tf_random_seed=None, session_config=None,
               **kwargs):
    self.model_dir = model_dir
    self.tf_random_seed = tf_random_seed
    self.session_config = session_config
    for k, v in kwargs.items():
      setattr(self, k, v)


def _split_input(result):
  if isinstance(result, (tuple, list)):
    if len(result) == 2:
      return result[0], result[1]
    if len(result) == 1:
      return result[0], None
  return result, None


class Estimator(object):
  def __init__(self, model_fn, model_dir=None, config=None, params=None,
               warm_start_from=None):
    self._model_fn = model_fn
    self._config = config if config is not None else RunConfig()
    self._model_dir = (model_dir or getattr(self._config, "model_dir", None)
                       or tempfile.mkdtemp(prefix="kit_shim_estimator_"))
    self._params = dict(params or {})
    self._scope = "estimator_%d" % next(_counter)
    self._sess = None
    self._initialized = set()
    self._trained = False
    try:
      self._model_fn_args = set(inspect.signature(model_fn).parameters)
    except (TypeError, ValueError):
      self._model_fn_args = {"features", "labels", "mode"}

  # -- properties of the real Estimator used by some model code --
  @property
  def model_dir(self):
    return self._model_dir

  @property
  def config(self):
    return self._config

  @property
  def params(self):
    return dict(self._params)

  # -- internals --
  def _call_model_fn(self, features, labels, mode):
    kwargs = {}
    if "labels" in self._model_fn_args:
      kwargs["labels"] = labels
    if "mode" in self._model_fn_args:
      kwargs["mode"] = mode
    if "params" in self._model_fn_args:
      kwargs["params"] = self.params
    if "config" in self._model_fn_args:
      kwargs["config"] = self._config
    with tf.variable_scope(self._scope, reuse=tf.AUTO_REUSE):
      return self._model_fn(features=features, **kwargs)

  def _session(self):
    graph = tf.get_default_graph()
    if self._sess is None or self._sess.graph is not graph:
      if self._sess is not None:
        self._sess.close()
      self._sess = tf.Session(graph=graph,
                              config=getattr(self._config, "session_config",
                                             None))
      _open_sessions.append(self._sess)
      self._initialized = set()
    return self._sess

  def _init_new_variables(self, sess):
    new = [v for v in tf.global_variables() + tf.local_variables()
           if v.name not in self._initialized]
    if new:
      sess.run(tf.variables_initializer(new))
      self._initialized.update(v.name for v in new)
    sess.run(tf.tables_initializer())

  # -- public API --
  def train(self, input_fn, hooks=None, steps=None, max_steps=None,
            saving_listeners=None):
    global_step = tf.train.get_or_create_global_step()
    features, labels = _split_input(input_fn())
    spec = self._call_model_fn(features, labels, ModeKeys.TRAIN)
    sess = self._session()
    self._init_new_variables(sess)
    fetches = [spec.train_op] + ([spec.loss] if spec.loss is not None else [])
    done = 0
    while steps is None or done < steps:
      if max_steps is not None and sess.run(global_step) >= max_steps:
        break
      try:
        sess.run(fetches)
      except tf.errors.OutOfRangeError:
        break
      done += 1
    self._trained = True
    return self

  def predict(self, input_fn, predict_keys=None, hooks=None,
              checkpoint_path=None, yield_single_examples=True):
    tf.train.get_or_create_global_step()
    features, _ = _split_input(input_fn())
    spec = self._call_model_fn(features, None, ModeKeys.PREDICT)
    sess = self._session()
    if not self._trained:
      _logger.warning("predict() called before any train(): weights are at "
                      "their initial values (TF1 would have raised).")
    self._init_new_variables(sess)
    preds = spec.predictions
    if isinstance(preds, dict) and predict_keys:
      preds = {k: v for k, v in preds.items() if k in predict_keys}
    while True:
      try:
        batch = sess.run(preds)
      except tf.errors.OutOfRangeError:
        return
      if not yield_single_examples:
        yield batch
        continue
      if isinstance(batch, dict):
        n = len(next(iter(batch.values())))
        for i in range(n):
          yield {k: v[i] for k, v in batch.items()}
      else:
        for row in batch:
          yield row

  def evaluate(self, input_fn, steps=None, hooks=None, checkpoint_path=None,
               name=None):
    global_step = tf.train.get_or_create_global_step()
    features, labels = _split_input(input_fn())
    spec = self._call_model_fn(features, labels, ModeKeys.EVAL)
    sess = self._session()
    self._init_new_variables(sess)
    metric_ops = dict(spec.eval_metric_ops or {})
    update_ops = [op for _, op in metric_ops.values()]
    losses = []
    done = 0
    while steps is None or done < steps:
      try:
        out = sess.run([spec.loss] + update_ops)
      except tf.errors.OutOfRangeError:
        break
      losses.append(out[0])
      done += 1
    result = {k: sess.run(v) for k, (v, _) in metric_ops.items()}
    result["loss"] = float(np.mean(losses)) if losses else float("nan")
    result["global_step"] = sess.run(global_step)
    return result
